"""Write: the pipeline's last stage, run in CPU tasks where the rows are made.

Each call takes a batch of scored rows (`id, labels, probs, error, error_code, meta`), turns
`meta` into the `source` and passthrough columns, adds the run's constant columns, casts to
the output schema (`batchscore.outputs.output`), writes ONE Parquet part file (one row group) into
the run's staging folder, and returns one small row: the part's statistics (`PartStats`).
That row is all the driver ever sees of the part; the rows themselves never leave the worker.

The part's name is a hash of its ids, so a write task that Ray retries rewrites the same
file instead of adding a second one. The statistics are also stored in the part's Parquet
footer (key `batchscore.part`), which is what `--resume` reads back.

Row accounting without a row per image on the driver: every listed input has an `index` (its
position in the run's listing). A part records the index ranges of the image files it holds,
and for containers (tar shards, Parquet and request files) the rows it holds of each and,
with the container's last row, the count its reader announced. The driver merges these into
`batchscore.driver.run.Coverage`.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from batchscore.driver.budget import EXAMPLES
from batchscore.exceptions import SinkError
from batchscore.inputs import fs as fsutil
from batchscore.outputs import output
from batchscore.outputs.staging import PART_STATS_KEY, staging_dir
from batchscore.reporting import evaluation


@dataclass(frozen=True)
class PartSpec:
    """Where and how the workers write: the output, the run, its constant columns."""

    output: str
    run_id: str
    model: str
    passthrough: tuple[str, ...] = ()
    containers: bool = False  # the run's inputs are containers (a row's index may repeat)
    evaluate: object = None  # batchscore.reporting.evaluation.EvalSpec: ground truth to count the rows against
    task: str = "classify"  # classify writes schema v1; embed and classify+embed v2 (`embedding`)
    embed_dim: int = 0
    embed_dtype: str = "float32"


def write_part(batch: pa.Table, *, spec: PartSpec) -> pa.Table:
    """Writes `batch` as one part file; returns one row, `part`: its `PartStats` as JSON.

    Raises:
        SinkError: the rows do not fit the output schema, or the file could not be written
            (Ray retries the task; a run whose write keeps failing fails).
    """
    table, stats = conform(batch, spec)
    stats["node"] = ray.get_runtime_context().get_node_id()  # provenance: which node wrote it
    fs, root = fsutil.resolve(spec.output)
    stats = put_part(fs, staging_dir(root, spec.run_id), spec.run_id, table, stats)
    return pa.table({"part": [json.dumps(stats)]})


def put_part(fs, folder: str, run_id: str, table: pa.Table, stats: dict) -> dict:
    """Writes `table` (in the output schema) as one part file, one row group, with `stats` in
    its footer; returns `stats` with the part's `name` and `bytes`.

    Raises:
        SinkError: the file could not be written.
    """
    name = f"part-{run_id}-{_digest(table.column('id').to_pylist())}.parquet"
    stats = {**stats, "name": name}
    metadata = {**(table.schema.metadata or {}), PART_STATS_KEY.encode(): json.dumps(stats).encode()}
    try:
        with fs.open(f"{folder}/{name}", "wb") as f:
            pq.write_table(table.replace_schema_metadata(metadata), f, row_group_size=max(1, table.num_rows))
            stats["bytes"] = f.tell()
    except Exception as e:
        raise SinkError(f"writing part {folder}/{name}: {type(e).__name__}: {e}") from e
    return stats


def conform(batch: pa.Table, spec: PartSpec) -> tuple[pa.Table, dict]:
    """The rows in the output schema, and their statistics (everything but name and bytes)."""
    metas = [json.loads(m) for m in batch.column("meta").to_pylist()]
    table = batch.drop_columns(["meta"])
    table = table.append_column("source", pa.array([m["source"] for m in metas], pa.string()))
    table = table.append_column("model", pa.array([spec.model] * table.num_rows, pa.string()))
    table = table.append_column("run_id", pa.array([spec.run_id] * table.num_rows, pa.string()))
    for name in spec.passthrough:
        table = table.append_column(name, pa.array([m["passthrough"].get(name) for m in metas], pa.string()))
    schema = output.schema_for(spec.task, spec.passthrough, spec.embed_dim, spec.embed_dtype)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise SinkError(f"output batch lacks column(s) {missing}; expected {schema.names}, got {table.column_names}")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SinkError(f"output batch does not match {output.schema_name(spec.task)}: expected {schema}, "
                               f"got {table.schema}: {e}") from e
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise SinkError(f"column {f.name!r} must not be null, but {table.column(f.name).null_count} rows are")
    return table, statistics(table, metas, spec.containers, spec.evaluate)


def statistics(table: pa.Table, metas: list[dict], containers: bool, evaluate=None) -> dict:
    """See `PartStats` in batchscore.driver.run: counts, errors, and which inputs the rows cover; and
    `scores` and `evaluation` (`batchscore.reporting.evaluation.part_statistics`: the report's counts)."""
    ids, errors = table.column("id").to_pylist(), table.column("error").to_pylist()
    by_code = collections.Counter(c for c in table.column("error_code").to_pylist() if c is not None)
    examples = [{"id": i, "error": e} for i, e in zip(ids, errors) if e is not None][:EXAMPLES]
    failed = sorted({m["index"] for m, e in zip(metas, errors) if e is not None})
    stats = {"rows": table.num_rows, "errors": sum(by_code.values()), "by_code": dict(by_code),
             "examples": examples, "failed": ranges(failed), "duplicates": 0, "files": [], "containers": {}}
    if containers:
        held: dict[int, list] = {}
        for m in metas:
            entry = held.setdefault(m["index"], [0, None])
            entry[0] += 1
            if "rows" in m:
                entry[1] = m["rows"]
        stats["containers"] = {str(k): v for k, v in sorted(held.items())}
    else:
        unique = sorted({m["index"] for m in metas})
        stats["duplicates"] = len(metas) - len(unique)
        stats["files"] = ranges(unique)
    stats.update(evaluation.part_statistics(table, evaluate))
    return stats


def ranges(sorted_unique: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] → [[0, 3], [5, 7]]: half-open ranges of consecutive integers."""
    out: list[list[int]] = []
    for i in sorted_unique:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _digest(ids: list[str]) -> str:
    """16 hex digits of sha256 over the part's ids: the same rows, the same part name."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
