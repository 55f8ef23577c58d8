"""Sink: staged Parquet part files, then the commit: move, `_manifest.json`, `_SUCCESS` last.

Layout of an output directory (any fsspec URI):

    _staging/_lease                                  while a run is going (batchscore.lease)
    _staging/<run_id>/_run.json                      what the run is (config fingerprint), for --resume
    _staging/<run_id>/part-<run_id>-00000.parquet   while the run is going
    part-<run_id>-00000.parquet                      after commit
    _manifests/<run_id>.json                         each committed run's manifest, kept
    _manifest.json                                   the same, for the current run
    _SUCCESS                                         written last: the committed run's id; the
                                                     commit point (a single-object write)

Every table is cast to the schema in `schemas/predictions.v1.json` (plus the configured
passthrough columns, as nullable strings, after `run_id`) before it is written, so
the files hold plain Arrow types (never Ray tensor extension types) and required columns
are never null. Readers trust only the files the manifest lists.

A part file is closed every `rows_per_file` rows or `part_seconds` seconds, whichever comes
first; a closed part is complete (its Parquet footer is written) and is what `--resume`
keeps. Its key-value metadata `batchscore.container_rows` records the row count of every
container (tar shard, request file) whose last row reached the driver while it was open.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore import fs as fsutil

SCHEMA_FILE = Path(__file__).parent / "schemas" / "predictions.v1.json"
MANIFEST = "_manifest.json"
MANIFESTS = "_manifests"
SUCCESS = "_SUCCESS"
STAGING = "_staging"
RUN_INFO = "_run.json"
CONTAINER_ROWS_KEY = "batchscore.container_rows"

log = logging.getLogger("batchscore")

_TYPES = {"string": pa.string(), "float32": pa.float32(), "int32": pa.int32(), "int64": pa.int64()}


class SinkError(RuntimeError):
    """Output could not be written or does not match the schema."""


def load_schema(path: Path = SCHEMA_FILE, passthrough: tuple[str, ...] = ()) -> pa.Schema:
    """The output Arrow schema, from its JSON description, plus passthrough columns (strings)."""
    spec = json.loads(path.read_text())
    fields = [pa.field(f["name"], _arrow_type(f["type"]), nullable=f["nullable"]) for f in spec["fields"]]
    fields += [pa.field(name, pa.string(), nullable=True) for name in passthrough]
    return pa.schema(fields, metadata={"batchscore.schema": f"{spec['name']}.v{spec['version']}"})


def _arrow_type(name: str) -> pa.DataType:
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(_arrow_type(name[5:-1]))
    try:
        return _TYPES[name]
    except KeyError:
        raise ValueError(f"schema type {name!r}: expected one of {sorted(_TYPES)} or list<...>") from None


@dataclass(frozen=True)
class PartFile:
    name: str
    rows: int
    bytes: int


class StagedWriter:
    """Writes tables as Parquet part files under `<output>/_staging/<run_id>/`.

    `run_info` is written as `_run.json` when the staging folder is new; a resumed run passes
    the parts it keeps as `existing` and numbering continues after them.
    """

    def __init__(self, output: str, run_id: str, constants: dict[str, str], rows_per_file: int,
                 passthrough: tuple[str, ...] = (), part_seconds: float = float("inf"),
                 run_info: dict | None = None, existing: list[PartFile] = ()):
        self.fs, self.root = fsutil.resolve(output)
        self.run_id = run_id
        self.staging = staging_dir(self.root, run_id)
        self.schema = load_schema(passthrough=passthrough)
        self.constants = constants
        self.rows_per_file = rows_per_file
        self.part_seconds = part_seconds
        self.parts: list[PartFile] = list(existing)
        self._next = 1 + max((_part_index(p.name) for p in existing), default=-1)
        self._file = self._writer = None
        self._rows_in_file = 0
        self._opened = 0.0
        self._container_rows: dict[str, int] = {}
        if fsutil.is_local(self.fs):
            self.fs.makedirs(self.staging, exist_ok=True)  # object stores have no folders to make
        try:
            # Fail now, not hours later when the first part file closes, if the output is not
            # writable (a missing bucket, no permission).
            if not existing or not self.fs.exists(f"{self.staging}/{RUN_INFO}"):
                self.fs.pipe_file(f"{self.staging}/{RUN_INFO}",
                                  json.dumps(run_info or {"run_id": run_id}, indent=2).encode())
        except Exception as e:
            raise SinkError(f"output {output!r} is not writable: {type(e).__name__}: {e}") from e

    def write(self, table: pa.Table, container_rows: dict[str, int] | None = None) -> None:
        """Appends rows; `container_rows` are the row counts of containers whose last row is here."""
        table = self.conform(table)
        self._container_rows.update(container_rows or {})
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._open()
            n = min(table.num_rows - start, self.rows_per_file - self._rows_in_file)
            self._writer.write_table(table.slice(start, n))
            self._rows_in_file += n
            start += n
            if self._rows_in_file >= self.rows_per_file:
                self._close_part()
        if self._writer is not None and time.monotonic() - self._opened >= self.part_seconds:
            self._close_part()  # bounds the work a crash loses to about part_seconds

    def conform(self, table: pa.Table) -> pa.Table:
        """Adds the constant columns and casts to the schema; raises `SinkError` on a mismatch."""
        for name, value in self.constants.items():
            table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
        missing = [n for n in self.schema.names if n not in table.column_names]
        if missing:
            raise SinkError(f"output batch lacks column(s) {missing}; expected {self.schema.names}, "
                            f"got {table.column_names}")
        table = table.select(self.schema.names)
        try:
            table = table.cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise SinkError(f"output batch does not match {SCHEMA_FILE.name}: expected {self.schema}, "
                            f"got {table.schema}: {e}") from e
        for f in self.schema:
            if not f.nullable and table.column(f.name).null_count:
                raise SinkError(f"column {f.name!r} must not be null, but {table.column(f.name).null_count} rows are")
        return table

    def write_text(self, name: str, text: str) -> str:
        """Writes a small file beside the staged parts; returns its URI."""
        path = f"{self.staging}/{name}"
        with self.fs.open(path, "w") as f:
            f.write(text)
        return fsutil.full_uri(self.fs, path)

    def close(self) -> list[PartFile]:
        if self._writer is not None:
            self._close_part()
        return list(self.parts)

    def _open(self) -> None:
        name = f"part-{self.run_id}-{self._next:05d}.parquet"
        self._next += 1
        self._file = self.fs.open(f"{self.staging}/{name}", "wb")
        self._writer = pq.ParquetWriter(self._file, self.schema)
        self._name = name
        self._rows_in_file = 0
        self._opened = time.monotonic()

    def _close_part(self) -> None:
        if self._container_rows:
            self._writer.add_key_value_metadata({CONTAINER_ROWS_KEY: json.dumps(self._container_rows)})
        self._writer.close()
        self._file.close()
        size = self.fs.info(f"{self.staging}/{self._name}")["size"]
        self.parts.append(PartFile(self._name, self._rows_in_file, int(size)))
        self._writer = self._file = None
        self._container_rows = {}


def staging_dir(root: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/{STAGING}/{run_id}"


def _part_index(name: str) -> int:
    return int(name.rsplit("-", 1)[-1].split(".", 1)[0])


@dataclass
class StagedRun:
    """An uncommitted run's staging folder: its `_run.json` and its part files, checked."""

    run_id: str
    info: dict
    parts: list[PartFile] = field(default_factory=list)       # complete: their footers read
    broken: list[str] = field(default_factory=list)           # half-written: no valid footer
    container_rows: dict[str, int] = field(default_factory=dict)


def staged_runs(output: str) -> list[StagedRun]:
    """Uncommitted runs under `<output>/_staging/`, oldest first (run ids start with their UTC time)."""
    fs, root = fsutil.resolve(output)
    base = f"{root.rstrip('/')}/{STAGING}"
    try:
        folders = sorted(i["name"].rstrip("/").rsplit("/", 1)[-1] for i in fs.ls(base, detail=True)
                         if i["type"] == "directory")
    except FileNotFoundError:
        return []
    runs = []
    for run_id in folders:
        staging = f"{base}/{run_id}"
        try:
            info = json.loads(fs.cat_file(f"{staging}/{RUN_INFO}"))
        except (FileNotFoundError, ValueError):
            info = {}
        run = StagedRun(run_id, info)
        for path in sorted(fs.glob(f"{staging}/part-*.parquet")):
            name = path.rsplit("/", 1)[-1]
            try:
                meta = pq.read_metadata(fs.open(path, "rb"))
            except Exception:  # noqa: BLE001 - no footer: the part was being written when the run died
                run.broken.append(name)
                continue
            run.parts.append(PartFile(name, meta.num_rows, int(fs.info(path)["size"])))
            kv = meta.metadata or {}
            if CONTAINER_ROWS_KEY.encode() in kv:
                run.container_rows.update(json.loads(kv[CONTAINER_ROWS_KEY.encode()]))
        runs.append(run)
    return runs


def read_staged_part(writer: StagedWriter, part: PartFile, columns: list[str] | None = None) -> pa.Table:
    with writer.fs.open(f"{writer.staging}/{part.name}", "rb") as f:
        return pq.read_table(f, columns=columns)


def drop_staged_part(writer: StagedWriter, name: str) -> None:
    writer.fs.rm(f"{writer.staging}/{name}")
    writer.parts = [p for p in writer.parts if p.name != name]


def read_manifest(output: str) -> dict | None:
    """The manifest of the committed run in `output`, or None when nothing is committed.

    `_SUCCESS` names the committed run; its manifest is `_manifests/<run_id>.json` (kept for
    every committed run). `_manifest.json` is the same document for people and tools, and
    is trusted only when its run id is the one `_SUCCESS` names.
    """
    fs, root = fsutil.resolve(output)
    root = root.rstrip("/")
    try:
        run_id = fs.cat_file(f"{root}/{SUCCESS}").decode().strip()
    except FileNotFoundError:
        return None
    for path in (f"{root}/{MANIFESTS}/{run_id}.json", f"{root}/{MANIFEST}"):
        try:
            manifest = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            continue
        if manifest.get("run_id") == run_id:
            return manifest
    raise SinkError(f"{output}: {SUCCESS} names run {run_id!r} but no manifest of that run was found")


def commit(writer: StagedWriter, manifest: dict, check=lambda: None) -> str:
    """Commits a run: parts into the output, its manifests, then `_SUCCESS`, the commit point.

    Until `_SUCCESS` is rewritten, a run already committed in the output (overwrite) stays
    committed and readable: the new parts have new names, and its own manifest is kept in
    `_manifests/`. Part files no longer committed are deleted only after the new run is
    committed. `check()` runs first and again just before the commit point, and may raise
    to stop the commit (the lease check). Returns the manifest's URI.
    """
    fs, root = writer.fs, writer.root.rstrip("/")
    check()
    for part in writer.parts:
        _move(fs, f"{writer.staging}/{part.name}", f"{root}/{part.name}")
    text = json.dumps(manifest, indent=2, sort_keys=True)
    if fsutil.is_local(fs):
        fs.makedirs(f"{root}/{MANIFESTS}", exist_ok=True)
    fs.pipe_file(f"{root}/{MANIFESTS}/{manifest['run_id']}.json", text.encode())
    fs.pipe_file(f"{root}/{MANIFEST}", text.encode())
    check()
    fs.pipe_file(f"{root}/{SUCCESS}", (manifest["run_id"] + "\n").encode())  # the commit point
    _remove_staging(fs, f"{root}/{STAGING}")  # this run's, and those of dead runs (one writer: the lease)
    # Now no reader needs the previous run's parts, nor parts a crashed commit moved in
    # without committing them. (One writer per output at a time is assumed.)
    keep = {p.name for p in writer.parts}
    for path in fs.glob(f"{root}/part-*.parquet"):
        if path.rsplit("/", 1)[-1] not in keep:
            fs.rm(path)
    return fsutil.full_uri(fs, f"{root}/{MANIFEST}")


def _move(fs, src: str, dst: str) -> None:
    """A rename on local disks; copy then delete on object stores, where a move is exactly
    that (gcsfs's `mv` first tries an API that emulators and flat buckets refuse, with retries)."""
    if fsutil.is_local(fs):
        fs.mv(src, dst)
    else:
        fs.copy(src, dst)
        fs.rm(src)


def _remove_staging(fs, staging: str) -> None:
    if fs.exists(staging):
        fs.rm(staging, recursive=True)


def read_committed(output: str) -> pa.Table:
    """The committed rows of `output`, read from exactly the files its manifest lists."""
    manifest = read_manifest(output)
    if manifest is None:
        raise SinkError(f"{output}: no committed run ({SUCCESS} is missing)")
    fs, root = fsutil.resolve(output)
    tables = []
    for part in manifest["files"]:
        with fs.open(f"{root.rstrip('/')}/{part['name']}", "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else load_schema().empty_table()
