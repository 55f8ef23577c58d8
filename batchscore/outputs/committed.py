"""The committed-run reader: the manifest of the run committed in an output (named in its
`_SUCCESS`), its part files one at a time, and its `scores` (counted from the parts for runs
committed before manifests held them).

`batchscore.reporting.report` and `batchscore.reporting.drift` read committed runs through this module; neither
imports the other's way of reading them.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from batchscore.exceptions import NotCommitted
from batchscore.inputs import fs as fsutil
from batchscore.outputs.output import STAGING, SUCCESS, read_manifest
from batchscore.reporting import evaluation


def manifest_of(output: str) -> dict:
    """The manifest of the run committed in `output`.

    Raises:
        NotCommitted: `output` holds no committed run (no `_SUCCESS`), or does not exist.
    """
    manifest = read_manifest(output)
    if manifest is None:
        fs, root = fsutil.resolve(output)
        if fsutil.is_local(fs) and not fs.exists(root):
            raise NotCommitted(f"{output}: no committed run ({SUCCESS} is missing): there is no such folder "
                               f"({fsutil.full_uri(fs, root)})")
        raise NotCommitted(f"{output}: no committed run ({SUCCESS} is missing); "
                           f"a run in progress or one that failed keeps its files under {STAGING}/")
    return manifest


def with_scores(manifest: dict, output: str, table=None) -> dict:
    """`manifest` with its `scores` (runs committed before they existed: counted from the part
    files, one at a time, three columns each)."""
    if manifest.get("scores") is not None:
        return manifest
    tables = [table] if table is not None else parts(output, manifest, ["labels", "probs", "error"])
    counted = [{"scores": evaluation.scores(t), "rows": t.num_rows} for t in tables]
    return {**manifest, "scores": evaluation.score_summary(evaluation.merge(counted))}


def parts(output: str, manifest: dict, columns: list[str]):
    """The committed part files of `manifest`, one table at a time, only `columns`."""
    fs, root = fsutil.resolve(output)
    for part in manifest["files"]:
        with fs.open(f"{root.rstrip('/')}/{part['name']}", "rb") as f:
            yield pq.read_table(f, columns=columns)
