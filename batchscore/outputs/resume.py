"""Resume: continue a run that died from the part files it completed.

The newest staged run under `<output>/_staging/` is continued when it was started with the
same result-affecting settings and weights (its `_run.json` fingerprint); otherwise resuming
is refused with the settings that differ. Its part files are checked from their footers
only (the statistics the workers stored there): a part without them was being written when
the run died and is deleted. The rows kept are
those of *complete* inputs only:

    image file           its one row
    Parquet file         as many rows as its footer lists
    tar shard, request   as many rows as its count says (recorded in the part holding
                         its last row; without that count it is scored again)

Inputs with an error row are scored again too: the cause may be gone (a run that blew its
error budget on a wrong permission is resumed after the fix). Rows of incomplete inputs, of
inputs with errors and of inputs no longer listed are dropped (a part holding any is
rewritten without them), so the committed result has exactly the rows of a clean run.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.driver.run import Coverage, Run
from batchscore.exceptions import ResumeError
from batchscore.inputs.listing import Listing
from batchscore.outputs import write
from batchscore.outputs.output import SCHEMA_NAME
from batchscore.outputs.staging import RUN_INFO, StagedRun, staged_runs

log = logging.getLogger("batchscore")

# Settings that change which rows a run writes or what is in them. Runs that differ in
# these cannot share part files; the rest (resources, batch sizes, progress) may change.
RESULT_SETTINGS = ("input", "input_format", "image_column", "id_column", "uri_column", "passthrough", "model",
                   "allow_pickle", "top_k", "dtype", "max_image_pixels", "extensions", "formats",
                   "task", "embed_pool", "embed_normalize", "embed_dtype", "model_arch",
                   "decode_device")  # JPEG decoders differ slightly (docs/architecture.md)
# Multi-label rows hold the labels at or above their thresholds: these decide rows too. The
# fingerprint holds the file's contents (sha256); a committed run is compared by the file named.
THRESHOLD_SETTINGS = ("threshold", "thresholds")


def fingerprint(settings: dict, weights_sha256: str, thresholds_sha256: str | None) -> dict:
    """The settings a staged run must share to be resumed, from a run's recorded settings
    (`ScoreConfig.to_dict()`), its weights' and its thresholds file's sha256 (None without
    one). Local paths are made absolute, so `small` typed in /data and `/data/small` are the
    same input, and `small` typed elsewhere is not."""
    # Multi-label rows hold the labels at or above their thresholds: the default and the file's contents.
    thresholds = {"threshold": settings.get("threshold"), "thresholds_sha256": thresholds_sha256}
    return {"schema": SCHEMA_NAME, "weights_sha256": weights_sha256, **_result_settings(settings), **thresholds}


def _result_settings(settings: dict) -> dict:
    out = {k: settings[k] for k in RESULT_SETTINGS if k in settings}
    if "input" in out:
        out["input"] = [_absolute(p) for p in out["input"]]
    if out.get("model"):
        out["model"] = _absolute(out["model"])
    return out


def differences(previous: dict, settings: dict) -> dict[str, tuple]:
    """{setting: (then, now)} for the settings that decide rows (the result settings and the
    thresholds) in which a committed run's recorded config (`previous`, from its manifest)
    differs from `settings` (`ScoreConfig.to_job()`; local paths compared absolute)."""
    then, now = _compared(previous), _compared(settings)
    return {k: (then[k], now[k]) for k in then if k in now and then[k] != now[k]}


def _compared(settings: dict) -> dict:
    out = {**_result_settings(settings), **{k: settings[k] for k in THRESHOLD_SETTINGS if k in settings}}
    if out.get("thresholds"):
        out["thresholds"] = _absolute(out["thresholds"])
    return out


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def latest(output: str, expected: dict, inputs: Listing | None = None) -> StagedRun | None:
    """The newest staged run of `output`, if any; raises `ResumeError` if it is incompatible:
    other result settings, or (given `inputs`) a listing of other inputs than when it started
    (parts count inputs by their position in the listing; a file that changed in place, such
    as one fixed after an error, is fine: an input with an error row is scored again)."""
    runs = staged_runs(output)
    if not runs:
        return None
    run = runs[-1]
    _same_settings(run, output, expected)
    if inputs is not None:
        _same_inputs(run, output, inputs)
    return run


def _same_settings(run: StagedRun, output: str, expected: dict, keys: set[str] | None = None) -> None:
    """Raises `ResumeError` unless `run` was started with the fingerprint `expected` (only its
    `keys`, given)."""
    found = run.info.get("fingerprint")
    if keys is not None and found:
        found, expected = {k: found.get(k) for k in keys}, {k: expected.get(k) for k in keys}
    if found != expected:
        if not found:
            raise ResumeError(f"cannot resume run {run.run_id} in {output}: its {RUN_INFO} is missing or "
                              "unreadable; run without --resume to start a new run")
        diff = {k: (found.get(k), expected.get(k)) for k in sorted(set(found) | set(expected))
                if found.get(k) != expected.get(k)}
        details = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume run {run.run_id} in {output}: it was started with other settings "
                          f"({details}); re-run with the same settings, or without --resume to start a new run")


def check_staged(output: str, inputs: Listing, expected: dict) -> None:
    """Before Ray starts: raises `ResumeError` if the newest staged run of `output` listed
    other inputs, or was started with other settings than the fingerprint `expected` (all but
    the weights' hash, which `latest` checks once the model is resolved)."""
    runs = staged_runs(output)
    if runs:
        _same_settings(runs[-1], output, expected, keys=set(expected) - {"weights_sha256"})
        _same_inputs(runs[-1], output, inputs)


def _same_inputs(run: StagedRun, output: str, inputs: Listing) -> None:
    then = run.info.get("inputs_ids_sha256")
    if then is not None and then != inputs.ids_sha256:
        raise ResumeError(f"cannot resume run {run.run_id} in {output}: its inputs changed since it started "
                          f"({run.info.get('inputs')} listed then, {inputs.count} now, or as many under other "
                          "names); run without --resume to score the inputs as they are now")


def adopt(staged: StagedRun, run: Run) -> np.ndarray:
    """Keeps the complete inputs' rows of `staged` in `run` (the same run id and staging);
    returns which inputs are still to score (a bool per listed input)."""
    staging = run.staging
    for name in staged.broken:
        log.warning("resume: discarding half-written part %s", name)
        staging.drop_part(name)
    held, failed = Coverage(), Coverage()
    for stats in staged.parts:
        held.add(stats)
        for a, b in stats["failed"]:
            failed.add_range(a, b)
    complete = _complete(run.listing, held, failed)
    n = len(complete)
    rewritten, ids = 0, None
    for stats in staged.parts:
        inside = all(0 <= int(k) < n and complete[int(k)] for k in stats["containers"]) and all(
            0 <= a and b <= n and complete[a:b].all() for a, b in stats["files"])
        if inside:
            run.keep(stats)
            continue
        rewritten += 1
        ids = run.listing.id_column() if ids is None else ids  # read back from the shards once
        kept = _rewrite(stats, complete, run, held, ids)
        if kept is not None:
            run.keep(kept)
    log.info("resume: run %s keeps %d rows of %d complete inputs (%d parts, %d rewritten without incomplete "
             "inputs, %d half-written discarded)", run.run_id, run.kept_rows, int(complete.sum()), len(staged.parts),
             rewritten, len(staged.broken))
    run.rewritten, run.discarded = rewritten, len(staged.broken)
    return ~complete


def _complete(listing: Listing, held: Coverage, failed: Coverage) -> np.ndarray:
    """A bool per listed input: all its rows are in the staged parts, none an error."""
    done = np.zeros(listing.count, dtype=bool)
    if listing.container_rows is None:
        for a, b in zip(held.starts, held.ends):
            done[max(a, 0):min(b, listing.count)] = True
    else:
        for i, known in enumerate(listing.container_rows):
            rows, expected = held.container(i, known)
            done[i] = expected is not None and rows == expected
    for a, b in zip(failed.starts, failed.ends):
        done[max(a, 0):min(b, listing.count)] = False
    return done


def _rewrite(stats: dict, complete: np.ndarray, run: Run, held: Coverage, ids: pa.ChunkedArray) -> dict | None:
    """Rewrites a part without the rows of incomplete inputs; its new statistics, or None if
    nothing is left. (Read, write the rest, then delete: a crash here only costs work.)"""
    staging = run.staging
    table = staging.read_part(stats["name"])
    # each row's listing index, from its source (the listing's `ids`, Arrow: nothing per input in Python)
    found = pc.index_in(table.column("source"), value_set=ids)
    present = pc.is_valid(found).to_numpy(zero_copy_only=False)
    index = pc.fill_null(found, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = present & complete[index]
    table = table.filter(pa.array(keep))
    result = None
    if table.num_rows:
        metas = [{"index": int(i)} for i in index[keep]]
        for m in metas:
            announced = held.containers.get(m["index"], (0, None))[1]
            if announced is not None:
                m["rows"] = announced
        result = write.put_part(staging.fs, staging.dir, run.run_id, table,
                                write.statistics(table, metas, run.containers))
        if result["name"] == stats["name"]:
            return result
    staging.drop_part(stats["name"])
    return result
