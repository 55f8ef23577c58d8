"""Output: the layout of an output directory, its schema, and reading what a run committed.

Layout of an output directory (any fsspec URI):

    _staging/_lease                                  while a run is going (batchscore.outputs.lease)
    _staging/<run_id>/_run.json                      what the run is (config fingerprint), for --resume
    _staging/<run_id>/part-<run_id>-<hash>.parquet  written by workers while the run is going
    part-<run_id>-<hash>.parquet                     after commit
    _manifests/<run_id>.json                         each committed run's manifest, kept
    _manifest.json                                   the same, for the current run
    _SUCCESS                                         written last: the committed run's id; the
                                                     commit point (a single-object write)

Every part holds the schema in `schemas/predictions.v1.json` (a run that classifies) or
`schemas/predictions.v2.json` (a run whose task embeds: v1 plus a fixed-size `embedding`
column, and labels/probs only when it also classifies), plus the configured passthrough
columns (nullable strings, after `run_id`): plain Arrow types only, so pandas, pyarrow, DuckDB
and polars read them without Ray. Readers trust only the files the manifest lists.

The write side is `batchscore.outputs.write` (in workers), the staging area `batchscore.outputs.staging`, the
commit `batchscore.outputs.commit`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.exceptions import SinkError
from batchscore.inputs import fs as fsutil

SCHEMA_FILE = Path(__file__).parents[1] / "schemas" / "predictions.v1.json"
SCHEMA_NAME = "batchscore.predictions.v1"
SCHEMA_FILE_V2 = Path(__file__).parents[1] / "schemas" / "predictions.v2.json"
SCHEMA_NAME_V2 = "batchscore.predictions.v2"
MANIFEST = "_manifest.json"
MANIFESTS = "_manifests"
SUCCESS = "_SUCCESS"
STAGING = "_staging"
ERRORS = "_errors.json"
REPORT = "_report.html"  # the run report (`batchscore.reporting.report`), written after the commit
# batchscore's own files and folders in an output: never inputs, wherever a listed folder holds them.
MARKERS = frozenset({SUCCESS, MANIFEST, MANIFESTS, STAGING, REPORT})

_TYPES = {"string": pa.string(), "float32": pa.float32(), "float16": pa.float16(), "int32": pa.int32(),
          "int64": pa.int64()}


def load_schema(path: Path = SCHEMA_FILE, passthrough: tuple[str, ...] = (), *, task: str | None = None,
                embed_dim: int = 0, embed_dtype: str = "float32") -> pa.Schema:
    """The output Arrow schema, from its JSON description, plus passthrough columns (strings).

    A field with `tasks` is kept only for those tasks (all of them when `task` is None); the
    embedding's `{embed_dim}` and `{embed_dtype}` are filled in from the run."""
    spec = json.loads(path.read_text())
    fields = [pa.field(f["name"], _arrow_type(f["type"].format(embed_dim=embed_dim, embed_dtype=embed_dtype)),
                       nullable=f["nullable"])
              for f in spec["fields"] if task is None or task in f.get("tasks", [task])]
    fields += [pa.field(name, pa.string(), nullable=True) for name in passthrough]
    return pa.schema(fields, metadata={"batchscore.schema": f"{spec['name']}.v{spec['version']}"})


def schema_for(task: str = "classify", passthrough: tuple[str, ...] = (), embed_dim: int = 0,
               embed_dtype: str = "float32") -> pa.Schema:
    """The schema a run of `task` writes: v1 for classify, v2 (with `embedding`) when it embeds."""
    if task == "classify":
        return load_schema(SCHEMA_FILE, passthrough)
    return load_schema(SCHEMA_FILE_V2, passthrough, task=task, embed_dim=embed_dim, embed_dtype=embed_dtype)


def schema_name(task: str) -> str:
    return SCHEMA_NAME if task == "classify" else SCHEMA_NAME_V2


def _arrow_type(name: str) -> pa.DataType:
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(_arrow_type(name[5:-1]))
    if name.startswith("fixed_size_list<") and name.endswith("]"):  # fixed_size_list<float32>[768]
        inner, size = name[len("fixed_size_list<"):-1].split(">[")
        return pa.list_(_arrow_type(inner), int(size))
    try:
        return _TYPES[name]
    except KeyError:
        raise ValueError(f"schema type {name!r}: expected one of {sorted(_TYPES)} or list<...>") from None


def read_manifest(output: str) -> dict | None:
    """The manifest of the committed run in `output`, or None when nothing is committed.

    `_SUCCESS` names the committed run; its manifest is `_manifests/<run_id>.json` (kept for
    every committed run). `_manifest.json` is the same document for people and tools, and
    is trusted only when its run id is the one `_SUCCESS` names.

    Raises:
        SinkError: `_SUCCESS` names a run whose manifest is missing.
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


def read_committed(output: str) -> pa.Table:
    """The committed rows of `output`, read from exactly the files its manifest lists.

    Raises:
        SinkError: nothing is committed in `output`, or a listed part is missing or holds
            another number of rows than the manifest says.
    """
    manifest = read_manifest(output)
    if manifest is None:
        raise SinkError(f"{output}: no committed run ({SUCCESS} is missing)")
    fs, root = fsutil.resolve(output)
    tables = []
    for part in manifest["files"]:
        path = f"{root.rstrip('/')}/{part['name']}"
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            raise SinkError(f"{output}: run {manifest['run_id']} lists part {part['name']}, which is missing") from None
        if table.num_rows != part["rows"]:
            raise SinkError(f"{output}: part {part['name']} holds {table.num_rows} rows, its run's manifest "
                            f"says {part['rows']}: the file was changed after the commit")
        version = (table.schema.metadata or {}).get(b"batchscore.schema")  # v1, or v2 with embeddings
        metadata = {b"batchscore.schema": version} if version else load_schema().metadata
        tables.append(table.replace_schema_metadata(metadata))  # not one part's statistics
    return pa.concat_tables(tables, promote_options="default") if tables else load_schema().empty_table()
