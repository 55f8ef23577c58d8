"""Staging: a run's folder under `<output>/_staging/<run_id>/` while it is going.

It holds `_run.json` (what the run is: its settings fingerprint and the hash of its listed names,
for `--resume`), `_listing/` (the listing shards the read tasks read), the part files the workers write (`batchscore.outputs.write`), and `_errors.json` when the run blew its error
budget. `staged_runs` finds the uncommitted runs of an output and reads each part's
statistics from its Parquet footer, so resuming never reads the rows of a complete part.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.exceptions import SinkError
from batchscore.inputs import fs as fsutil
from batchscore.outputs.output import STAGING

RUN_INFO = "_run.json"
LISTING_FOLDER = "_listing"
PART_STATS_KEY = "batchscore.part"

log = logging.getLogger("batchscore")


def staging_dir(root: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/{STAGING}/{run_id}"


class Staging:
    """One run's staging folder on the driver: created (and the output proven writable) at once."""

    def __init__(self, output: str, run_id: str, info: dict | None = None):
        self.output = output
        self.fs, self.root = fsutil.resolve(output)
        self.root = self.root.rstrip("/")
        self.run_id = run_id
        self.dir = staging_dir(self.root, run_id)
        self.listing_dir = f"{self.dir}/{LISTING_FOLDER}"  # the listing shards (`listing.Listing.write`)
        if fsutil.is_local(self.fs):
            self.fs.makedirs(self.dir, exist_ok=True)  # object stores have no folders to make
        try:
            # Fail now, not hours later when the first part is written, if the output is not
            # writable (a missing bucket, no permission).
            if info is not None or not self.fs.exists(f"{self.dir}/{RUN_INFO}"):
                self.fs.pipe_file(f"{self.dir}/{RUN_INFO}", json.dumps(info or {"run_id": run_id}, indent=2).encode())
        except Exception as e:
            raise SinkError(f"output {output!r} is not writable: {type(e).__name__}: {e}") from e

    def write_text(self, name: str, text: str) -> str:
        """Writes a small file beside the staged parts; returns its URI."""
        path = f"{self.dir}/{name}"
        with self.fs.open(path, "w") as f:
            f.write(text)
        return fsutil.full_uri(self.fs, path)

    def read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(f"{self.dir}/{name}", "rb") as f:
            return pq.read_table(f, columns=columns)

    def drop_part(self, name: str) -> None:
        fsutil.remove_file(self.fs, f"{self.dir}/{name}")


@dataclass
class StagedRun:
    """An uncommitted run's staging folder: its `_run.json` and its part files, checked."""

    run_id: str
    info: dict
    parts: list[dict] = field(default_factory=list)  # complete: the statistics in their footers
    broken: list[str] = field(default_factory=list)  # half-written or foreign: no readable statistics


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
        for path in fsutil.files_in(fs, staging, prefix="part-", suffix=".parquet"):
            name = path.rsplit("/", 1)[-1]
            try:
                with fs.open(path, "rb") as f:
                    kv = pq.read_metadata(f).metadata or {}
                stats = json.loads(kv[PART_STATS_KEY.encode()])
                stats["bytes"] = int(fs.size(path))
            except Exception:  # noqa: BLE001 - no footer: the part was being written when the run died
                run.broken.append(name)
                continue
            run.parts.append(stats)
        runs.append(run)
    return runs
