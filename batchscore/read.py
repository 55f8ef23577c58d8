"""Read: listing entries → rows of {id, data (bytes), error, meta}, one per image.

`read_batch` is a plain generator function run in the CPU tasks that also decode (Ray fuses
the two, so bytes never pass through the object store). It reads each entry by kind:

    file     the object's bytes                                  id = its URI
    tar      WebDataset shard, streamed: one row per sample      id = <shard URI>#<image member>
             (members sharing a key; the first image member is the sample's image; a
             sample without one is an error row `<shard URI>#<key>`)
    parquet  `image_column` bytes, batch by batch                id = `id_column`, or <file>#<row>
    azureml  {"input_data": [...]} or the pandas-split form,      id = <file>#<index>
             each item base64 image bytes or an image URL

Nothing that goes wrong with one image fails the job: it becomes that row's error
(`read.<code>: <reason>`, codes in `batchscore.errors`). Transient failures are retried with exponential backoff; missing and
forbidden objects are not. "No error" is "" inside the pipeline, never None: Ray turns an
all-None object column into floats between stages.

`meta` is a JSON string carried untouched through decode and predict to the driver: the
entry the row came from (`source`, the one-row-per-input check and the output's `source`
column), its passthrough values, and on a container's last row the container's row count
(`rows`): rows may reach the driver in any order, so a container is complete once that many
of its rows arrived. That is how a tar shard's loss is caught, and what `--resume` trusts.
"""

from __future__ import annotations

import base64
import binascii
import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from batchscore import formats
from batchscore import fs as fsutil
from batchscore.errors import error as _error
from batchscore.listing import Entry

RETRY_BASE_SECONDS = 0.5
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_URL_PREFIXES = ("http://", "https://", "gs://", "s3://", "file://")


@dataclass(frozen=True)
class ReadOptions:
    image_column: str = "image"
    id_column: str | None = None
    passthrough: tuple[str, ...] = ()
    retries: int = 3
    batch_size: int = 32


def dataset(entries: list[Entry], files_per_block: int) -> ray.data.Dataset:
    """The listing as a dataset: blocks of exactly `files_per_block` files (the last may be
    short), containers one to a block.

    Each block is one read/decode task, and its rows reach the model actor, and leave it, as
    one bundle. Blocks of one model batch keep the first output rows early: 64-file blocks
    made ViT-B/16's first rows wait for 4 batches, and `from_items`' even split (300 files
    into blocks of 30 for batches of 32) had Ray Data bundle two blocks into each actor call.
    """
    items = [{"id": e.id, "uri": e.uri, "kind": e.kind,
              "meta": json.dumps({"source": e.id, "passthrough": e.passthrough})} for e in entries]
    per_block = files_per_block if entries[0].kind == "file" else 1
    return ray.data.from_arrow([pa.Table.from_pylist(items[i:i + per_block]) for i in range(0, len(items), per_block)])


def read_batch(batch: dict[str, np.ndarray], *, options: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches of `options.batch_size` rows: id, data, error, meta."""
    out = _Batcher(options.batch_size)
    for id_, uri, kind, meta in zip(batch["id"], batch["uri"], batch["kind"], batch["meta"]):
        id_, uri, meta = str(id_), str(uri), str(meta)
        if kind == "file":
            data, error = fetch(uri, options.retries)
            out.add(id_, data, error, meta)
        else:  # a container's rows come from the container entry itself: source = its id
            reader = {"tar": read_tar, "parquet": read_parquet, "azureml": read_azureml}[kind]
            previous, count = None, 0
            for row in reader(uri, options):
                if previous is not None:
                    out.add(*_container_row(id_, *previous))
                previous, count = row, count + 1
                yield from out.full()
            if previous is not None:
                out.add(*_container_row(id_, *previous, total=count))
        yield from out.full()
    yield from out.rest()


def _container_row(source: str, row_id: str, data: bytes, error: str, passthrough: dict,
                   total: int | None = None) -> tuple[str, bytes, str, str]:
    meta = {"source": source, "passthrough": passthrough}
    if total is not None:
        meta["rows"] = total
    return row_id, data, error, json.dumps(meta)


def unpack_meta(table, passthrough: tuple[str, ...]):
    """On the driver: replaces `meta` by `source` and the passthrough columns.

    Returns:
        (table, {container id: its row count} for the containers whose last row is here).
    """
    metas = [json.loads(m) for m in table.column("meta").to_pylist()]
    table = table.drop_columns(["meta"]).append_column("source", pa.array([m["source"] for m in metas], pa.string()))
    for name in passthrough:
        table = table.append_column(name, pa.array([m["passthrough"].get(name) for m in metas], pa.string()))
    return table, {m["source"]: m["rows"] for m in metas if "rows" in m}


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

def read_tar(uri: str, options: ReadOptions) -> Iterator[tuple[str, bytes, str, dict]]:
    """Streams a shard; yields (id, image bytes, error, passthrough) per sample."""
    samples = 0
    try:
        fs, path = fsutil.resolve(uri)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if key is not None and k != key:
                    yield _sample(uri, key, members, options)
                    samples, members = samples + 1, {}
                key = k
                members[ext] = (member.name, tar.extractfile(member).read())
            if key is not None:
                yield _sample(uri, key, members, options)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield uri, b"", _error("read.bad_container",
                               f"tar shard unreadable after {samples} samples: {type(e).__name__}: {e}"), {}


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset keys: 'dir/000123.seg.png' → ('dir/000123', 'seg.png')."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample(uri: str, key: str, members: dict, options: ReadOptions) -> tuple[str, bytes, str, dict]:
    passthrough = {c: members[c][1].decode("utf-8", "replace") if c in members else None
                   for c in options.passthrough}
    for ext, (name, data) in members.items():
        if "." + ext.rsplit(".", 1)[-1] in formats.IMAGE_ENDINGS:
            return f"{uri}#{name}", data, "", passthrough
    found = ", ".join("." + e for e in members)
    return f"{uri}#{key}", b"", _error("read.no_image", f"sample has no image member (members: {found})"), passthrough


# -- Parquet with an image-bytes column -------------------------------------------------

def read_parquet(uri: str, options: ReadOptions) -> Iterator[tuple[str, bytes, str, dict]]:
    """Yields one row per Parquet row; a file that fails midway yields error rows for the rest."""
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys([options.image_column, *filter(None, [options.id_column]), *options.passthrough]))
    row, total = 0, None
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
                    if options.id_column and ids[i] is None:
                        error = error or _error("read.bad_id", f"null id in column {options.id_column!r}")
                    row_id = str(ids[i]) if ids[i] is not None else f"{uri}#{row}"
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
    for index, value in items:
        row_id = f"{uri}#{index}"
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
