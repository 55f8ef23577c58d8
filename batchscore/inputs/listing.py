"""Listing: turn the configured inputs into a stable, de-duplicated list of entries to read.

An entry is one image file (`kind="file"`, from a directory, a glob, a file or a manifest
row) or one container that a reader expands in a worker: a WebDataset tar shard, a Parquet
file with an image-bytes column, or an Azure ML request file. All entries of a run have one
kind, chosen by `input_format` or detected from the file endings:

    auto: image files if any are listed, else .tar/.tgz shards, else .json request files,
          else .csv/.jsonl manifests, else .parquet (image bytes if it has `image_column`,
          a manifest if it has `uri_column`).

A path that exists as written is that path, even with `[`, `?` or `*` in its name; only a
path that does not exist is expanded as a glob (folders it matches are listed whole).
Directories are listed recursively, and on
object stores one level of sub-prefixes is listed in parallel; under them, hidden files (a
path part starting with '.') and batchscore's own output files (`MARKERS`, by name) are
skipped and counted, and a folder with nothing else is an error. Files that do not belong to
the chosen format are counted and logged, never dropped silently. Manifest rows are URIs
read as written; a manifest without rows (a header only) is an error. `passthrough` is
refused unless the inputs are manifests, Parquet files or tar shards. The result is sorted, so the same inputs give the same listing.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from batchscore.config import PASSTHROUGH_FORMATS, default, passthrough_refused
from batchscore.driver.progress import option  # messages in the caller's terms: --formats or formats
from batchscore.exceptions import ListingError
from batchscore.inputs import formats
from batchscore.inputs import fs as fsutil
from batchscore.outputs import output

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")
# batchscore's own files and folders in an output: never inputs, wherever a listed folder
# holds them. Skipped by these names; any other name starting with '_' is ordinary.
MARKERS = output.MARKERS
_LIST_THREADS = 16
ENDINGS = {
    "tar": (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz"),
    "azureml": (".json",),
    "manifest": (".csv", ".jsonl", ".ndjson"),
    "parquet": (".parquet",),
}


@dataclass(frozen=True)
class Entry:
    """One thing to read. `rows` is how many output rows it gives, when known in advance."""

    id: str
    uri: str
    kind: str = "file"
    size: int | None = None
    rows: int | None = 1
    passthrough: dict[str, str | None] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class ListingSpec:
    """What the listing needs of a job (`batchscore.plan.listing_spec` makes it from the config).

    Attributes:
        input: Folders, globs, files or manifests, as local paths or URIs.
        input_format: auto, files, tar, parquet, manifest or azureml (`ScoreConfig.input_format`).
        endings: Lower-case file endings that make a listed file an image.
        image_column, id_column, uri_column, passthrough: As in `ScoreConfig`.
    """

    input: tuple[str, ...]
    input_format: str = default("input_format")
    endings: frozenset[str] = formats.endings(default("formats"))
    image_column: str = default("image_column")
    id_column: str | None = default("id_column")
    uri_column: str = default("uri_column")
    passthrough: tuple[str, ...] = default("passthrough")


def list_inputs(spec: ListingSpec) -> list[Entry]:
    """Every input of `spec` as `Entry` objects, in listing order (see `listed`).

    One Python object per input: for tools and tests. A run keeps its listing columnar
    (`Listing`) and writes it to its staging folder for the workers to read.
    """
    return listed(spec).entries()


def listed(spec: ListingSpec) -> Listing:
    """Lists every input of `spec` as one `Listing` of one kind, sorted by id.

    Raises:
        ListingError: An input does not exist or matches nothing, no entry is left, the
            format cannot be told, a manifest has no rows, a manifest or Parquet file lacks
            a configured column, or `passthrough` is set for inputs that have nothing to pass.
    """
    files = _list_files(spec.input)
    fmt = spec.input_format if spec.input_format != "auto" else _detect(files, spec)
    if spec.passthrough and fmt not in PASSTHROUGH_FORMATS:
        what = "plain image files" if fmt == "files" else f"{fmt} inputs"
        raise ListingError(passthrough_refused(spec.passthrough, f"the inputs {list(spec.input)} are {what}"))
    chosen, skipped = [], collections.Counter()
    for uri, size in files:
        if _ending(uri) in _endings(fmt, spec):
            chosen.append((uri, size))
        else:
            skipped[_ending(uri) or "(none)"] += 1
    del files
    if skipped:
        what = "images" if fmt == "files" else f"{fmt} inputs"
        hint = (f"to score them, add their format to {option('formats')} (or their ending to {option('extensions')})"
                if fmt == "files" else f"set {option('input_format')} to choose another kind of input")
        log.warning("skipped %d listed file(s) that are not %s: %s (%s)", sum(skipped.values()), what,
                    ", ".join(f"{ext} x{n}" for ext, n in skipped.most_common()), hint)
    if not chosen:
        raise ListingError(f"inputs {list(spec.input)}: no {fmt} input found "
                           f"(endings {sorted(_endings(fmt, spec))})")
    if fmt == "files":
        table = _table([uri for uri, _ in chosen], sizes=[size for _, size in chosen])
    elif fmt == "manifest":
        table = _from_manifests([uri for uri, _ in chosen], spec)
    elif fmt == "parquet":
        table = _parquet_entries(chosen, spec)
    else:
        table = _table([uri for uri, _ in chosen], sizes=[size for _, size in chosen], rows=None)
    kind = "file" if fmt in ("files", "manifest") else fmt
    result = Listing(fmt, kind, table)
    log.info("input format %s: %d %s", fmt, result.count, "images" if kind == "file" else "files")
    return result


_GROUPS_PER_SHARD = 64  # row groups (read tasks) per listing shard: a small footer to read per task


class Listing:
    """A run's inputs, columnar: a table of `id, uri, size, rows[, passthrough]` (one row per
    input, sorted by id; `passthrough` a struct of the configured columns, as strings).

    The driver keeps no Python object per input: the table is Arrow (about the bytes of its
    strings), and once `write` has put it into the run's staging folder as Parquet listing
    shards it is dropped; the workers read their slice of a shard (`read.read_batch`). What
    stays on the driver: the count, the hash, the kind, and for containers the rows each
    one is known to hold (an int64 array, -1 where unknown).
    """

    def __init__(self, fmt: str, kind: str, table: pa.Table):
        self.format, self.kind, self.table = fmt, kind, table
        self.count = table.num_rows
        # sha256: the manifest's inputs_sha256; ids_sha256: which inputs, in which order (what
        # --resume needs unchanged: parts count inputs by position; a fixed file may change size)
        self.sha256, self.ids_sha256 = _hash(table)
        rows = table.column("rows")
        self.known_rows = (pc.sum(rows).as_py() or 0) if rows.null_count == 0 else None
        self.container_rows = (None if kind == "file"
                               else pc.fill_null(rows, -1).to_numpy(zero_copy_only=False).astype("int64"))
        self.shards: list[str] = []
        self.groups: list[tuple[int, int, int, int]] = []  # (shard, row group, first index, end index)
        self._fs = None

    @classmethod
    def of(cls, entries: list[Entry], fmt: str | None = None) -> Listing:
        """A listing of `entries` (of one kind, in this order): for tools and tests."""
        kind = entries[0].kind
        names = sorted({k for e in entries for k in e.passthrough})
        passthrough = pa.StructArray.from_arrays(
            [pa.array([e.passthrough.get(k) for e in entries], pa.string()) for k in names], names=names) if names else None
        table = _table([e.id for e in entries], sizes=[e.size for e in entries], passthrough=passthrough,
                       row_counts=[e.rows for e in entries])
        table = table.set_column(1, "uri", pa.array([e.uri for e in entries], pa.string()))
        return cls(fmt or ("files" if kind == "file" else kind), kind, table)

    def write(self, fs, folder: str, bounds: list[int]) -> None:
        """Writes the listing into `folder` as Parquet shards, one row group per read task
        (`bounds`: the task boundaries, [0, ..., count]), and drops the table from memory."""
        fsutil.remove_tree(fs, folder)
        if fsutil.is_local(fs):
            fs.makedirs(folder, exist_ok=True)
        spans = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        self.shards, self.groups, self._fs = [], [], fs
        for n in range(0, len(spans), _GROUPS_PER_SHARD):
            path = f"{folder}/listing-{n // _GROUPS_PER_SHARD:05d}.parquet"
            with fs.open(path, "wb") as f, pq.ParquetWriter(f, self.table.schema) as writer:
                for k, (a, b) in enumerate(spans[n:n + _GROUPS_PER_SHARD]):
                    writer.write_table(self.table.slice(a, b - a), row_group_size=b - a)
                    self.groups.append((len(self.shards), k, a, b))
            self.shards.append(fsutil.full_uri(fs, path))
        self.table = None

    def ids(self, indexes: list[int]) -> list[str]:
        """The ids of a few inputs (for messages), from the table or the shards."""
        out = []
        for i in indexes:
            if self.table is not None:
                out.append(self.table.column("id")[i].as_py())
                continue
            shard, group, a, _ = next(g for g in self.groups if g[2] <= i < g[3])
            out.append(self._group(shard, group, ["id"]).column("id")[i - a].as_py())
        return out

    def id_column(self) -> pa.ChunkedArray:
        """Every input's id, in listing order (Arrow; read back from the shards once written)."""
        if self.table is not None:
            return self.table.column("id")
        return pa.chunked_array([c for s, g, _, _ in self.groups for c in self._group(s, g, ["id"]).column("id").chunks],
                                type=pa.string())

    def _group(self, shard: int, group: int, columns: list[str]) -> pa.Table:
        return read_group(self.shards[shard], group, columns)

    def entries(self) -> list[Entry]:
        """The listing as `Entry` objects (one per input: for tools and tests)."""
        table = self.table if self.table is not None else pa.concat_tables(
            self._group(s, g, None) for s, g, _, _ in self.groups)
        out = []
        for row in table.to_pylist():
            out.append(Entry(id=row["id"], uri=row["uri"], kind=self.kind, size=row["size"], rows=row["rows"],
                             passthrough=row.get("passthrough") or {}))
        return out


def read_group(shard: str, group: int, columns: list[str] | None = None) -> pa.Table:
    """One row group of a listing shard (one read task's inputs)."""
    fs, path = fsutil.resolve(shard)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read_row_group(group, columns=columns)


def _table(ids: list[str] | pa.Array, sizes=None, rows: int | None = 1, passthrough: pa.StructArray | None = None,
           row_counts=None) -> pa.Table:
    """The listing table: `uri` is the `id` (the same Arrow buffers)."""
    ids = pa.array(ids, type=pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    n = len(ids)
    columns = {"id": ids, "uri": ids,
               "size": pa.array(sizes if sizes is not None else [None] * n, type=pa.int64()),
               "rows": pa.array(row_counts if row_counts is not None else [rows] * n, type=pa.int64())}
    if passthrough is not None:
        columns["passthrough"] = passthrough
    return pa.table(columns)


def _hash(table: pa.Table) -> tuple[str, str]:
    """(sha256 of what was listed: ids, sizes, known row counts; sha256 of the ids alone)."""
    h, ids_h = hashlib.sha256(), hashlib.sha256()
    for batch in table.select(["id", "size", "rows"]).to_batches(max_chunksize=65_536):
        ids, sizes, rows = (batch.column(i).to_pylist() for i in range(3))
        h.update("".join(f"{i}\t{s}\t{r}\n" for i, s, r in zip(ids, sizes, rows)).encode())
        ids_h.update("".join(f"{i}\n" for i in ids).encode())
    return h.hexdigest(), ids_h.hexdigest()


# -- files ------------------------------------------------------------------------------

def _list_files(inputs: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """(uri, size) of every file the inputs name, de-duplicated and sorted.

    A path that exists as written is that path, whatever characters its name holds
    (`photo[1].jpg`, `what?.jpg`, `dir[1]/`); only a path that does not exist is expanded as a
    glob (write `[[]` for a literal `[` inside a glob). Under a folder or a glob's fixed part,
    hidden files (a path part starting with '.') and batchscore's own markers (`MARKERS`, by
    name) are skipped and counted; a named file is always taken.
    """
    found: dict[str, int | None] = {}
    skipped: collections.Counter[str] = collections.Counter()
    for spec in inputs:
        fs, path = fsutil.resolve(spec)
        if fs.isdir(path):
            kept, left = _visible(_find(fs, path), path.rstrip("/"))
            skipped += left
            if not kept:
                raise ListingError(_empty_folder(spec, left))
            log.info("input %r: a path as written: a folder of %d file(s)", spec, len(kept))
        elif fs.isfile(path):
            kept = [fs.info(path)]
            log.info("input %r: a path as written: one file", spec)
        elif any(c in _GLOB_CHARS for c in path):
            matched = list(fs.glob(path, detail=True).values())
            matched = _through_links(fs, matched) if fsutil.is_local(fs) else matched
            folders = [i["name"] for i in matched if i["type"] == "directory"]  # `dt=2026-11-*`: listed whole
            found_files = [i for i in matched if _is_file(i)] + [i for d in folders for i in _find(fs, d)]
            kept, left = _visible(found_files, _glob_root(path))
            skipped += left
            if not kept:
                raise ListingError(f"input {spec!r}: no such path, and the glob matched no file"
                                   + (f" but {_not_read(left)}" if left else "") + _looked(fs, path, spec))
            log.info("input %r: no such path, expanded as a glob: %d file(s)%s", spec, len(kept),
                     f" (in {len(folders)} matched folder(s))" if folders else "")
        else:
            raise ListingError(f"input {spec!r}: no such file or directory{_looked(fs, path, spec)}")
        for info in kept:
            found.setdefault(fsutil.full_uri(fs, info["name"]), info.get("size"))
    if skipped:
        say = log.warning if skipped["hidden"] else log.info
        say("skipped %s under the inputs", _not_read(skipped))
    return sorted(found.items())


def _looked(fs, path: str, spec: str) -> str:
    """` (looked for /abs/path)` for a local input given relative, where the message would
    not otherwise say which folder it was relative to."""
    where = fsutil.full_uri(fs, path)
    return f" (looked for {where})" if fsutil.is_local(fs) and where != spec else ""


def _find(fs, path: str) -> list[dict]:
    """Recursive listing; on object stores the first level of prefixes is listed in parallel.
    Folder placeholder objects (`prefix/`, zero bytes) are folders, not files."""
    if fsutil.is_local(fs):
        return _through_links(fs, fs.find(path, detail=True).values())
    top = fs.ls(path, detail=True)
    files = [i for i in top if _is_file(i)]
    dirs = [i["name"] for i in top if i["type"] == "directory"]
    if path.rstrip("/") in (d.rstrip("/") for d in dirs):  # a placeholder listed as the folder itself
        return [i for i in fs.find(path, detail=True).values() if _is_file(i)]
    with ThreadPoolExecutor(max_workers=_LIST_THREADS) as pool:
        for listed in pool.map(lambda d: fs.find(d, detail=True), dirs):
            files.extend(i for i in listed.values() if _is_file(i))
    return files


def _is_file(info: dict) -> bool:
    return info["type"] == "file" and not info["name"].endswith("/")


def _through_links(fs, infos) -> list[dict]:
    """Local symbolic links (fsspec lists them as type 'other'): a link to a file is that file,
    under the link's own path (Hugging Face and DVC caches are folders of such links); a link
    to a folder is not followed (cycles), and is said so; a broken link stays, and reads as
    `read.not_found`."""
    out = []
    for info in infos:
        if info.get("islink") and info["type"] not in ("file", "directory"):
            try:
                target = fs.info(info["name"])  # follows the link
            except FileNotFoundError:
                target = {"type": "file"}
            if target["type"] == "directory":
                log.warning("not following %s: a symbolic link to a folder (give it as an input to score it)",
                            info["name"])
                continue
            info = {**info, "type": target["type"], "size": target.get("size", info.get("size"))}
        out.append(info)
    return out


def _visible(infos: list[dict], root: str) -> tuple[list[dict], collections.Counter[str]]:
    """The files under `root` that are neither hidden nor batchscore's markers, and how many
    of each of those were left out."""
    kept, left = [], collections.Counter()
    for info in infos:
        reason = _skip_reason(info["name"][len(root):] if info["name"].startswith(root) else info["name"])
        if reason:
            left[reason] += 1
        else:
            kept.append(info)
    return kept, left


def hidden(path: str) -> bool:
    """A hidden file: a part of its path starts with '.' (`.DS_Store`, macOS `._IMG.jpg` twins,
    `.thumbs/`). The one rule for folders, globs and tar shard members."""
    return any(part.startswith(".") and part not in (".", "..") for part in path.split("/"))


def _skip_reason(relative: str) -> str | None:
    """'hidden' (`hidden`), 'marker' (a part named like one of batchscore's own files or
    folders) or None. Names starting with '_' are ordinary files."""
    parts = [part for part in relative.split("/") if part]
    if hidden(relative):
        return "hidden"
    if any(part in MARKERS for part in parts):
        return "marker"
    return None


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: what listed names are relative to."""
    first = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
    return pattern[:first].rsplit("/", 1)[0] if "/" in pattern[:first] else ""


def _not_read(left: collections.Counter[str]) -> str:
    said = []
    if left["hidden"]:
        said.append(f"{left['hidden']} hidden file(s) (a path part starting with '.')")
    if left["marker"]:
        said.append(f"{left['marker']} of batchscore's own file(s) ({', '.join(sorted(MARKERS))})")
    return " and ".join(said)


def _empty_folder(spec: str, left: collections.Counter[str]) -> str:
    if not left:
        return f"input {spec!r}: the folder holds no files"
    return f"input {spec!r}: the folder holds no files but {_not_read(left)}, which are not read"


_ending = formats.ending


def _endings(fmt: str, spec: ListingSpec) -> set[str]:
    if fmt == "files":
        return set(spec.endings)
    if fmt == "manifest":
        return set(ENDINGS["manifest"]) | set(ENDINGS["parquet"])
    return set(ENDINGS[fmt])


def _detect(files: list[tuple[str, int | None]], spec: ListingSpec) -> str:
    endings = {_ending(uri) for uri, _ in files}
    for fmt in ("files", "tar", "azureml", "manifest"):
        if endings & _endings(fmt, spec) - set(ENDINGS["parquet"]):
            return fmt
    parquets = [uri for uri, _ in files if _ending(uri) == ".parquet"]
    if parquets:
        names = _parquet_schema(parquets[0]).names
        if spec.image_column in names:
            return "parquet"
        if spec.uri_column in names:
            return "manifest"
        raise ListingError(f"{parquets[0]}: cannot tell the input format: expected a column "
                           f"{spec.image_column!r} (image bytes) or {spec.uri_column!r} (image URIs), "
                           f"found {names}; set {option('input_format')}, {option('image_column')} or "
                           f"{option('uri_column')}")
    raise ListingError(f"cannot tell the input format of {len(files)} file(s) with endings {sorted(endings)}; "
                       f"set {option('input_format')}")


# -- manifests --------------------------------------------------------------------------

def _from_manifests(manifests: list[str], spec: ListingSpec) -> pa.Table:
    """The manifests' URIs (relative ones joined to the manifest's folder), each once (its
    first row kept), sorted; columnar throughout: a million rows cost tens of MB."""
    columns = [spec.uri_column, *spec.passthrough]
    tables = []
    for manifest in manifests:
        table = _manifest_table(manifest, columns, spec)
        uri = table.column(spec.uri_column)
        empty = pc.or_kleene(pc.is_null(uri), pc.equal(uri, ""))
        if pc.any(empty).as_py():
            n = pc.index(empty, True).as_py()
            raise ListingError(f"manifest {manifest}: data row {n + 1} has an empty {spec.uri_column!r}; "
                               "every row must name an image")
        base = manifest.rsplit("/", 1)[0]
        relative = pc.and_(pc.invert(pc.match_substring(uri, "://")), pc.invert(pc.starts_with(uri, "/")))
        uri = pc.if_else(relative, pc.binary_join_element_wise(base, uri, "/"), uri)  # relative to the manifest
        tables.append(table.set_column(0, "uri", _normalized(uri)))
    table = pa.concat_tables(tables).combine_chunks()
    del tables
    table = table.take(pc.sort_indices(table, sort_keys=[("uri", "ascending")]))  # stable: first row first
    uri = table.column("uri").combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(uri.slice(1), uri.slice(0, len(uri) - 1))])
    duplicates = len(first) - pc.sum(first).as_py()
    if duplicates:
        repeated = uri.filter(pc.invert(first)).unique()[:3].to_pylist()
        log.warning("manifests list %d URI(s) more than once, e.g. %s; each is scored once, with the columns of its "
                    "first row (in the order the manifests were given)", duplicates, repeated)
        table = table.filter(first)
    passthrough = None
    if spec.passthrough:
        passthrough = pa.StructArray.from_arrays([table.column(c).combine_chunks() for c in spec.passthrough],
                                                 names=list(spec.passthrough))
    return _table(table.column("uri"), passthrough=passthrough)


def _normalized(uris: pa.ChunkedArray) -> pa.ChunkedArray:
    """Paths with `.` or `..` parts written as the path they name (`/data/m/../a.jpg` is
    `/data/a.jpg`), so one image is one id however a manifest spells it; URLs keep their
    scheme (`gs://b/x/../a.jpg` is `gs://b/a.jpg`). Only the rows that hold such a part are
    touched."""
    dotted = pc.match_substring_regex(uris, r"(^|/)\.\.?(/|$)")
    if not pc.any(dotted).as_py():
        return uris

    def clean(uri: str) -> str:
        scheme, sep, path = uri.rpartition("://")
        return f"{scheme}{sep}{posixpath.normpath(path)}" if sep else posixpath.normpath(uri)

    values = uris.to_pylist()
    for i in pc.indices_nonzero(dotted).to_pylist():
        values[i] = clean(values[i])
    return pa.chunked_array([pa.array(values, pa.string())])


def _manifest_table(uri: str, columns: list[str], spec: ListingSpec) -> pa.Table:
    """`columns` of a CSV, JSON-lines or Parquet manifest, as strings (null where a value is
    missing or null).

    Raises:
        ListingError: no rows, a column missing, a line that is not JSON, a CSV row with the
            wrong number of fields.
    """
    fs, path = fsutil.resolve(uri)
    ending = _ending(uri)
    if ending == ".parquet":
        with fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
            _require(uri, columns, names)
            f.seek(0)
            table = pq.read_table(f, columns=columns)
        table = pa.table({c: _strings(table.column(c)) for c in columns})
    elif ending == ".csv":
        with fs.open(path, "rb") as f:
            data = f.read()
        data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8", "replace"))), [])
        if not data.strip() or not header:
            table = pa.table({c: pa.array([], pa.string()) for c in columns})
        else:
            _require(uri, columns, header)
            try:
                table = pcsv.read_csv(io.BytesIO(data), convert_options=pcsv.ConvertOptions(
                    column_types={name: pa.string() for name in header}, include_columns=columns))
            except pa.ArrowInvalid as e:
                raise ListingError(f"manifest {uri}: not a CSV file of one URI per row: {e}") from None
    else:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
        values: dict[str, list] = {c: [] for c in columns}
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ListingError(f"manifest {uri} line {n + 1}: not JSON: {e}") from None
            missing = [c for c in columns if c not in row]
            if missing:
                raise ListingError(f"manifest {uri} line {n + 1}: expected column(s) {missing}, found {sorted(row)}")
            for c in columns:
                values[c].append(None if row[c] is None else str(row[c]))
        del text
        table = pa.table({c: pa.array(v, pa.string()) for c, v in values.items()})
    if not table.num_rows:
        raise ListingError(f"manifest {uri}: has no rows (empty, or a header only); expected one row "
                           f"per image with its URI in column {spec.uri_column!r}")
    return table


def _require(uri: str, columns: list[str], names: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise ListingError(f"manifest {uri}: expected column(s) {missing}, found {sorted(names)}")


def _strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A Parquet manifest's column as strings, each value as Python's `str` writes it."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    return pa.chunked_array([pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())])


# -- parquet with image bytes -----------------------------------------------------------

def _parquet_schema(uri: str):
    fs, path = fsutil.resolve(uri)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def _parquet_entries(files: list[tuple[str, int | None]], spec: ListingSpec) -> pa.Table:
    """One row per file, with its row count from the footer (read in parallel)."""
    def footer(item):
        uri, size = item
        fs, path = fsutil.resolve(uri)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        names = meta.schema.to_arrow_schema().names
        needed = [spec.image_column, *([spec.id_column] if spec.id_column else []), *spec.passthrough]
        missing = [c for c in needed if c not in names]
        if missing:
            raise ListingError(f"{uri}: expected column(s) {missing}, found {names}")
        return meta.num_rows

    with ThreadPoolExecutor(max_workers=_LIST_THREADS) as pool:
        counts = list(pool.map(footer, files))
    return _table([uri for uri, _ in files], sizes=[size for _, size in files], row_counts=counts)
