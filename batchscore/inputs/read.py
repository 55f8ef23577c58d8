"""Read: listing entries → rows of {id, data (bytes), error, meta}, one per image.

`read_batch` is a plain generator function run in the CPU tasks that also decode (Ray fuses
the two, so bytes never pass through the object store). It reads each entry by kind:

    file     the object's bytes                                  id = its URI
    tar      WebDataset shard, streamed: a row per image member  id = <shard URI>#<member name>
             (members sharing a key, adjacent, are a sample; its other members' passthrough
             goes on each of its image rows; a sample without an image member is an error
             row `<shard URI>#<key>`, a repeated member name one `<shard URI>#<name>~N`)
    parquet  `image_column` bytes, batch by batch                id = `id_column`, or <file>#<row>
    azureml  {"input_data": [...]} or the pandas-split form,      id = <file>#<index>
             each item base64 image bytes or an image URL

Nothing that goes wrong with one image fails the job: it becomes that row's error
(`read.<code>: <reason>`, codes in `batchscore.errors`). Transient failures are retried with exponential backoff; missing and
forbidden objects are not. "No error" is "" inside the pipeline, never None: Ray turns an
all-None object column into floats between stages.

`meta` is a JSON string carried untouched through decode and predict to the write stage
(`batchscore.outputs.write`): the entry the row came from (`source`, the output's `source` column),
its listing `index` (the row accounting), its passthrough values, and on a container's last
row the container's row count (`rows`): rows may be written in any order and in several
parts, so a container is complete once that many of its rows are written. That is how a tar
shard's loss is caught, and what `--resume` trusts.
A tar shard's count is the one `read_tar` tallies from the member headers it saw, not the
number of rows it yielded, so a row lost between the two fails the run too.
"""

from __future__ import annotations

import base64
import binascii
import json
import tarfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from batchscore.config import default
from batchscore.errors import error as _error
from batchscore.inputs import formats, listing
from batchscore.inputs import fs as fsutil
from batchscore.inputs.listing import Entry

RETRY_BASE_SECONDS = 0.5
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_URL_PREFIXES = ("http://", "https://", "gs://", "s3://", "file://")


@dataclass(frozen=True)
class ReadOptions:
    image_column: str = default("image_column")
    id_column: str | None = default("id_column")
    passthrough: tuple[str, ...] = default("passthrough")
    retries: int = default("read_retries")
    batch_size: int = default("decode_batch_size")


def dataset(run_listing: listing.Listing, todo: np.ndarray | None) -> ray.data.Dataset:
    """The read tasks of a run (`tasks`) as a dataset of one row per task, one block per task."""
    # One block per task. The stage that reads them must take one block per task
    # (`batch_size=None` through the fused read/decode stage, pipeline.build_dataset).
    return ray.data.from_arrow([pa.Table.from_pylist([task]) for task in tasks(run_listing, todo)])


def tasks(run_listing: listing.Listing, todo: np.ndarray | None) -> list[dict]:
    """One read task per row group of the run's listing shards (`listing.Listing.write`):
    the shard, the row group, its first index, and the index ranges of its inputs still to
    score (`todo`: a bool per input, None for all). The driver holds one such record per
    task, never one per input; `read_batch` reads the listing rows in the worker.
    """
    out = []
    for shard, group, a, b in run_listing.groups:
        if todo is None:
            ranges = [[a, b]]
        else:
            ranges = _ranges(todo[a:b], a)
            if not ranges:
                continue
        out.append({"shard": run_listing.shards[shard], "group": group, "start": a, "ranges": json.dumps(ranges),
                    "kind": run_listing.kind})
    return out


def task_bounds(count: int, containers: bool, batch: int, block: int) -> list[int]:
    """Listing indexes where read tasks start and end ([0, ..., count]).

    Image files go `batch` (one model batch) to a task for the first four tasks, so the
    first rows come after one batch, then `block` to a task: Ray Data's cost is per task
    (dispatch, metadata, scheduling on the driver), and 32-file tasks made it the driver's
    main work (~1.6 ms per image). Containers go one to a task.
    """
    if containers:
        return list(range(count + 1))
    first = min(count, 4 * batch)
    return list(range(0, first, batch)) + list(range(first, count, block)) + [count]


def _ranges(mask: np.ndarray, offset: int) -> list[list[int]]:
    """[[start, end), ...] of the True runs of `mask`, shifted by `offset`."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [[int(s) + offset, int(e) + offset] for s, e in zip(edges[::2], edges[1::2])]


def entries(task: dict) -> Iterator[tuple[int, Entry]]:
    """(listing index, entry) of one read task's inputs (its row group, within its ranges)."""
    table = listing.read_group(str(task["shard"]), int(task["group"]))
    start, kind = int(task["start"]), str(task["kind"])
    ranges = json.loads(str(task["ranges"]))
    has_passthrough = "passthrough" in table.column_names
    for a, b in ranges:
        for offset, row in enumerate(table.slice(a - start, b - a).to_pylist()):
            yield a + offset, Entry(id=row["id"], uri=row["uri"], kind=kind, size=row["size"], rows=row["rows"],
                                    passthrough=(row["passthrough"] or {}) if has_passthrough else {})


def read_batch(batch: dict[str, np.ndarray], *, options: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches of `options.batch_size` rows: id, data, error, meta, from read tasks
    (`dataset`). `meta` carries each row's source, listing index and passthrough values."""
    out = _Batcher(options.batch_size)
    for task in (dict(zip(batch, values)) for values in zip(*batch.values())):
        for index, entry in entries(task):
            if entry.kind == "file":
                data, error = fetch(entry.uri, options.retries)
                meta = json.dumps({"source": entry.id, "index": index, "passthrough": entry.passthrough})
                out.add(entry.id, data, error, meta)
            else:  # a container's rows come from the container entry itself: source = its id
                yield from _container(entry, index, options, out)
            yield from out.full()
    yield from out.rest()


def _container(entry: Entry, index: int, options: ReadOptions, out: _Batcher) -> Iterator[dict[str, np.ndarray]]:
    reader = {"tar": read_tar, "parquet": read_parquet, "azureml": read_azureml}[entry.kind]
    rows = _Announced(reader(entry.uri, options))
    previous, count = None, 0
    for row in rows:
        if previous is not None:
            out.add(*_container_row(entry.id, index, *previous))
        previous, count = row, count + 1
        yield from out.full()
    total = count if rows.total is None else rows.total
    if previous is None and total:  # rows announced, none yielded: no row would carry the count
        previous = (entry.id, b"", _error("internal", f"reader announced {total} rows but yielded none"), {})
    if previous is not None:
        out.add(*_container_row(entry.id, index, *previous, total=total))


class _Announced:
    """A container reader's rows, keeping the generator's return value: the row count it
    announces (`read_tar`: from the headers it saw), or None to announce the rows it yielded."""

    def __init__(self, rows: Generator[tuple[str, bytes, str, dict], None, int | None]):
        self.rows, self.total = rows, None

    def __iter__(self) -> Iterator[tuple[str, bytes, str, dict]]:
        self.total = yield from self.rows


def _container_row(source: str, index: int, row_id: str, data: bytes, error: str, passthrough: dict,
                   total: int | None = None) -> tuple[str, bytes, str, str]:
    meta = {"source": source, "index": index, "passthrough": passthrough}
    if total is not None:
        meta["rows"] = total
    return row_id, data, error, json.dumps(meta)


class _Batcher:
    def __init__(self, size: int):
        self.size, self.rows = size, []

    def add(self, id_: str, data: bytes, error: str, meta: str) -> None:
        self.rows.append((id_, data, error, meta))

    def full(self) -> Iterator[dict[str, np.ndarray]]:
        while len(self.rows) >= self.size:
            chunk, self.rows = self.rows[: self.size], self.rows[self.size:]
            yield self._batch(chunk)

    def rest(self) -> Iterator[dict[str, np.ndarray]]:
        if self.rows:
            yield self._batch(self.rows)
            self.rows = []

    @staticmethod
    def _batch(rows) -> dict[str, np.ndarray]:
        ids, data, errors, metas = zip(*rows)
        col = lambda values: np.array(list(values), dtype=object)  # noqa: E731
        return {"id": col(ids), "data": col(data), "error": col(errors), "meta": col(metas)}


def fetch(uri: str, retries: int) -> tuple[bytes, str]:
    """(bytes, "") or (b"", "read.<code>: <reason>"); transient failures retried with backoff."""
    last: Exception | None = None
    for attempt in range(retries):
        try:
            fs, path = fsutil.resolve(uri)
            with fs.open(path, "rb") as f:
                return f.read(), ""
        except FileNotFoundError as e:
            return b"", _error("read.not_found", f"{type(e).__name__}: {e}")
        except _PERMANENT as e:
            return b"", _error("read.forbidden", f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - network and service errors: try again
            last = e
            if attempt + 1 < retries:
                time.sleep(RETRY_BASE_SECONDS * 2**attempt)
    return b"", _error("read.failed", f"failed after {retries} attempts: {type(last).__name__}: {last}")


# -- WebDataset tar shards --------------------------------------------------------------

def read_tar(uri: str, options: ReadOptions) -> Generator[tuple[str, bytes, str, dict], None, int]:
    """Streams a shard: yields (id, image bytes, error, passthrough) rows; returns the number
    of rows the member headers it saw call for, which `read_batch` announces.

    A sample is a run of consecutive members with the same key (`_split_key`, WebDataset's
    rule). Each image member (its name's last ending in `formats.IMAGE_ENDINGS`, any case)
    is a row `<uri>#<member name>`; the sample's other members give every row of the sample
    its passthrough values (`.cls` → `cls`). A sample without an image member is one error
    row `<uri>#<key>` (read.no_image). A member name already seen in the shard is an error
    row `<uri>#<name>~N` (read.bad_id, N its occurrence), and so is a second member with a
    passthrough extension in one sample (`a.CLS` after `a.cls`): the first one is used. A
    key that comes back after other keys starts a new sample, with only its own members. An
    image-named link or device member is an error row (read.no_image). A shard that cannot
    be read to its end gives one error row `<uri>` (read.bad_container) for the rest.

    The count is tallied from the headers, apart from building the rows, so a member lost
    between the two leaves the shard short of its count, and the run's check fails.
    """
    announced = samples = 0
    seen: dict[str, int] = {}  # member name -> times seen in the shard
    closed: set[str] = set()  # keys of the samples done
    ids = _Ids()
    try:
        fs, path = fsutil.resolve(uri)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            sample = None
            for member in tar:
                if member.isdir() or listing.hidden(member.name):  # macOS `._x.jpg`, `__MACOSX/`, `.thumbs/`
                    continue
                key, ext = _split_key(member.name)
                if sample is not None and key != sample.key:
                    announced += sample.due + (not sample.has_image)
                    yield from _sample_rows(uri, sample, ids, options)
                    samples += 1
                    closed.add(sample.key)
                    sample = None
                if sample is None:
                    sample = _Sample(key, again=key in closed)
                seen[member.name] = seen.get(member.name, 0) + 1
                sample.add(member, ext, seen[member.name], tar, options)
            if sample is not None:
                announced += sample.due + (not sample.has_image)
                yield from _sample_rows(uri, sample, ids, options)
    except (tarfile.TarError, OSError, EOFError) as e:  # the sample being read and the rest: one row
        yield uri, b"", _error("read.bad_container",
                               f"tar shard unreadable after {samples} samples: {type(e).__name__}: {e}"), {}
        return announced + 1
    return announced


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset keys: 'dir/000123.seg.png' → ('dir/000123', 'seg.png'): the key ends at the
    first dot of the base name, so 'IMG_2023.05.01.jpg' → ('IMG_2023', '05.01.jpg')."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _Sample:
    """One sample's members as their headers are read. `due` counts the rows they call for
    (one per image member, one per member not used), kept apart from `rows`."""

    def __init__(self, key: str, again: bool):
        self.key, self.again = key, again
        self.due, self.has_image = 0, False
        self.exts: list[str] = []  # every member's extension, in order
        self.rows: list[tuple[str, bytes, str]] = []  # (id after '#', data, error)
        self.values: dict[str, tuple[str, bytes]] = {}  # passthrough extension -> (member name, bytes)

    def add(self, member: tarfile.TarInfo, ext: str, occurrence: int, tar: tarfile.TarFile,
            options: ReadOptions) -> None:
        name, image = member.name, formats.ending(member.name) in formats.IMAGE_ENDINGS
        self.exts.append(ext)
        self.has_image |= image
        if occurrence > 1:
            self.due += 1
            self.rows.append((f"{name}~{occurrence}", b"", _error(
                "read.bad_id", f"member name {name!r} appears again in the shard (occurrence {occurrence}); "
                               "only the first is read")))
        elif image and not member.isfile():
            self.due += 1
            what = (f"a hard link to {member.linkname!r}" if member.islnk() else
                    f"a symbolic link to {member.linkname!r}" if member.issym() else "not a regular file")
            self.rows.append((name, b"", _error("read.no_image", f"member {name!r} is {what}, not the image's bytes")))
        elif image:
            self.due += 1
            self.rows.append((name, tar.extractfile(member).read(), ""))
        elif ext in options.passthrough and member.isfile():
            if ext in self.values:
                self.due += 1
                self.rows.append((name, b"", _error(
                    "read.bad_id", f"the sample already has a .{ext} member ({self.values[ext][0]!r}); "
                                   "only the first is read")))
            else:
                self.values[ext] = (name, tar.extractfile(member).read())


def _sample_rows(uri: str, sample: _Sample, ids: _Ids,
                 options: ReadOptions) -> Iterator[tuple[str, bytes, str, dict]]:
    """The rows of a sample, each with the sample's passthrough values."""
    passthrough = {c: sample.values[c][1].decode("utf-8", "replace").strip() if c in sample.values else None
                   for c in options.passthrough}
    for row_id, data, error in sample.rows:
        yield ids.take(f"{uri}#{row_id}"), data, error, passthrough
    if not sample.has_image:
        reason = f"sample has no image member (members: {', '.join('.' + e for e in sample.exts)})"
        if sample.again:
            reason += f"; its key {sample.key!r} came earlier in the shard too: a sample's members must be adjacent"
        yield ids.take(f"{uri}#{sample.key}"), b"", _error("read.no_image", reason), passthrough


class _Ids:
    """The ids given in one shard: a repeated one gets `~2`, `~3`, … so no two rows share one
    (a sample without an image member whose key came earlier, without one either)."""

    def __init__(self):
        self.given: set[str] = set()

    def take(self, wanted: str) -> str:
        row_id, n = wanted, 1
        while row_id in self.given:
            n += 1
            row_id = f"{wanted}~{n}"
        self.given.add(row_id)
        return row_id


# -- Parquet with an image-bytes column -------------------------------------------------

def read_parquet(uri: str, options: ReadOptions) -> Iterator[tuple[str, bytes, str, dict]]:
    """Yields one row per Parquet row; a file that fails midway yields error rows for the rest."""
    columns = list(dict.fromkeys([options.image_column, *filter(None, [options.id_column]), *options.passthrough]))
    row, total = 0, None
    first_row: dict[str, int] = {}  # id_column value -> the row that used it first
    try:
        fs, path = fsutil.resolve(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            total = pf.metadata.num_rows
            for rb in pf.iter_batches(batch_size=options.batch_size, columns=columns):
                images = rb.column(options.image_column)
                if pa.types.is_struct(images.type):  # Hugging Face datasets: {bytes, path}
                    images = images.field("bytes")
                ids = rb.column(options.id_column).to_pylist() if options.id_column else [None] * rb.num_rows
                extra = {c: rb.column(c).to_pylist() for c in options.passthrough}
                for i, data in enumerate(images.to_pylist()):
                    passthrough = {c: None if v[i] is None else str(v[i]) for c, v in extra.items()}
                    error = "" if data else _error("read.no_image", f"no image bytes in column {options.image_column!r}")
                    row_id = f"{uri}#{row}"
                    if options.id_column and ids[i] is None:
                        error = error or _error("read.bad_id", f"null id in column {options.id_column!r}")
                    elif options.id_column and str(ids[i]) in first_row:
                        error = error or _error("read.bad_id", f"id {str(ids[i])!r} in column {options.id_column!r} "
                                                               f"repeats row {first_row[str(ids[i])]} of this file")
                    elif options.id_column:
                        row_id = str(ids[i])
                        first_row[row_id] = row
                    yield row_id, data or b"", error, passthrough
                    row += 1
    except Exception as e:  # noqa: BLE001 - keep one row per listed Parquet row, flagged
        reason = _error("read.bad_container", f"Parquet file unreadable at row {row}: {type(e).__name__}: {e}")
        for r in range(row, total if total is not None else row + 1):
            yield f"{uri}#{r}", b"", reason, {}


# -- Azure ML image-classification request files ----------------------------------------

def read_azureml(uri: str, options: ReadOptions) -> Iterator[tuple[str, bytes, str, dict]]:
    """`{"input_data": [...]}` or `{"input_data": {"columns", "index", "data"}}`; base64 or URLs."""
    try:
        items = _azureml_items(uri)
    except Exception as e:  # noqa: BLE001 - the whole file is one error row
        yield uri, b"", _error("read.bad_container", f"not an Azure ML image request: {type(e).__name__}: {e}"), {}
        return
    ids = _Ids()
    for index, value in items:
        row_id = ids.take(f"{uri}#{index}")  # a repeated 'index' entry: `#<index>~2`
        if not isinstance(value, str):
            yield row_id, b"", _error("read.no_image", f"expected a base64 image or a URL, got {type(value).__name__}"), {}
        elif value.startswith(_URL_PREFIXES):
            data, error = fetch(value, options.retries)
            yield row_id, data, error, {}
        else:
            try:
                yield row_id, base64.b64decode(value, validate=True), "", {}
            except (binascii.Error, ValueError):
                yield row_id, b"", _error("read.no_image", "neither valid base64 nor a URL"), {}


def _azureml_items(uri: str) -> list[tuple[object, object]]:
    fs, path = fsutil.resolve(uri)
    with fs.open(path, "rb") as f:
        doc = json.load(f)
    data = doc["input_data"]
    if isinstance(data, list):
        return list(enumerate(data))
    if isinstance(data, dict):
        columns = data.get("columns") or ["image"]
        col = columns.index("image") if "image" in columns else 0
        rows = data["data"]
        index = data.get("index") or list(range(len(rows)))
        if len(index) != len(rows):
            raise ValueError(f"'index' has {len(index)} entries but 'data' has {len(rows)}")
        return [(i, r[col] if isinstance(r, list) else r) for i, r in zip(index, rows)]
    raise ValueError(f"'input_data' must be a list or a pandas-split object, got {type(data).__name__}")
