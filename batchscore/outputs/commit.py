"""Commit: a run's staged parts into the output, its manifests, then `_SUCCESS`, the commit point.

Runs on the driver once every part is written and the rows are checked against the inputs.
"""

from __future__ import annotations

import json

from batchscore.inputs import fs as fsutil
from batchscore.outputs.output import MANIFEST, MANIFESTS, STAGING, SUCCESS
from batchscore.outputs.staging import Staging


def commit(staging: Staging, parts: list[str], manifest: dict, check=lambda: None) -> str:
    """Commits a run: `parts` (names in `staging`) into the output, its manifests, then `_SUCCESS`.

    Until `_SUCCESS` is rewritten, a run already committed in the output (overwrite) stays
    committed and readable: the new parts have new names, and its own manifest is kept in
    `_manifests/`. Part files no longer committed are deleted only after the new run is
    committed. `check()` runs first and again just before the commit point, and may raise
    to stop the commit (the lease check). Returns the manifest's URI.
    """
    fs, root = staging.fs, staging.root
    check()
    for name in parts:
        fsutil.move_file(fs, f"{staging.dir}/{name}", f"{root}/{name}")
    text = json.dumps(manifest, indent=2, sort_keys=True)
    if fsutil.is_local(fs):
        fs.makedirs(f"{root}/{MANIFESTS}", exist_ok=True)
    fs.pipe_file(f"{root}/{MANIFESTS}/{manifest['run_id']}.json", text.encode())
    fs.pipe_file(f"{root}/{MANIFEST}", text.encode())
    check()
    fs.pipe_file(f"{root}/{SUCCESS}", (manifest["run_id"] + "\n").encode())  # the commit point
    fsutil.remove_tree(fs, f"{root}/{STAGING}")  # this run's, and those of dead runs (one writer: the lease)
    # Now no reader needs the previous run's parts, nor parts a crashed commit moved in
    # without committing them. (One writer per output at a time is assumed.)
    keep = set(parts)
    for path in fsutil.files_in(fs, root, prefix="part-", suffix=".parquet"):
        if path.rsplit("/", 1)[-1] not in keep:
            fsutil.remove_file(fs, path)
    return fsutil.full_uri(fs, f"{root}/{MANIFEST}")
