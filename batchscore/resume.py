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

import pyarrow as pa

from batchscore import write
from batchscore.config import ScoreConfig
from batchscore.listing import Entry
from batchscore.output import SCHEMA_NAME
from batchscore.run import Coverage, Run
from batchscore.staging import RUN_INFO, StagedRun, staged_runs

log = logging.getLogger("batchscore")

# Settings that change which rows a run writes or what is in them. Runs that differ in
# these cannot share part files; the rest (resources, batch sizes, progress) may change.
RESULT_SETTINGS = ("input", "input_format", "image_column", "id_column", "uri_column", "passthrough", "model",
                   "allow_pickle", "top_k", "dtype", "max_image_pixels", "extensions", "formats")


class ResumeError(RuntimeError):
    """The staged run cannot be continued with these settings."""


def fingerprint(config: ScoreConfig, weights_sha256: str) -> dict:
    """The settings a staged run must share to be resumed. Local paths are made absolute, so
    `small` typed in /data and `/data/small` are the same input, and `small` typed elsewhere
    is not."""
    settings = config.to_dict()
    settings["input"] = [_absolute(p) for p in settings["input"]]
    settings["model"] = settings["model"] and _absolute(settings["model"])
    return {"schema": SCHEMA_NAME, "weights_sha256": weights_sha256,
            **{k: settings[k] for k in RESULT_SETTINGS}}


def differences(previous: dict, config: ScoreConfig) -> dict[str, tuple]:
    """{setting: (then, now)} for the result settings in which a committed run's recorded
    config (`previous`, from its manifest) differs from `config` (local paths compared absolute)."""
    now = fingerprint(config, "")
    then = {k: previous[k] for k in RESULT_SETTINGS if k in previous}
    if "input" in then:
        then["input"] = [_absolute(p) for p in then["input"]]
    if then.get("model"):
        then["model"] = _absolute(then["model"])
    return {k: (then[k], now[k]) for k in then if then[k] != now[k]}


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def latest(output: str, expected: dict) -> StagedRun | None:
    """The newest staged run of `output`, if any; raises `ResumeError` if it is incompatible."""
    runs = staged_runs(output)
    if not runs:
        return None
    run = runs[-1]
    found = run.info.get("fingerprint")
    if found != expected:
        if not found:
            raise ResumeError(f"cannot resume run {run.run_id} in {output}: its {RUN_INFO} is missing or "
                              "unreadable; run without --resume to start a new run")
        diff = {k: (found.get(k), expected.get(k)) for k in sorted(set(found) | set(expected))
                if found.get(k) != expected.get(k)}
        details = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume run {run.run_id} in {output}: it was started with other settings "
                          f"({details}); re-run with the same settings, or without --resume to start a new run")
    return run


def adopt(staged: StagedRun, run: Run) -> list[tuple[int, Entry]]:
    """Keeps the complete inputs' rows of `staged` in `run` (the same run id and staging);
    returns the (index, entry) pairs still to score."""
    entries, staging = run.entries, run.staging
    for name in staged.broken:
        log.warning("resume: discarding half-written part %s", name)
        staging.drop_part(name)
    held, failed = Coverage(), Coverage()
    for stats in staged.parts:
        held.add(stats)
        for a, b in stats["failed"]:
            failed.add_range(a, b)
    complete = _complete(entries, held, failed, run.containers)
    rewritten = 0
    for stats in staged.parts:
        inputs = [int(k) for k in stats["containers"]] + [i for a, b in stats["files"] for i in range(a, b)]
        if all(i in complete for i in inputs):
            run.keep(stats)
            continue
        rewritten += 1
        kept = _rewrite(stats, complete, run, held)
        if kept is not None:
            run.keep(kept)
    todo = [(i, e) for i, e in enumerate(entries) if i not in complete]
    log.info("resume: run %s keeps %d rows of %d complete inputs (%d parts, %d rewritten without incomplete "
             "inputs, %d half-written discarded)", run.run_id, run.kept_rows, len(complete), len(staged.parts),
             rewritten, len(staged.broken))
    run.rewritten, run.discarded = rewritten, len(staged.broken)
    return todo


def _complete(entries: list[Entry], held: Coverage, failed: Coverage, containers: bool) -> set[int]:
    """Indexes of the inputs whose rows are all in the staged parts, none an error."""
    if not containers:
        return {i for i in range(len(entries)) if held.covers(i) and not failed.covers(i)}
    done = set()
    for i, e in enumerate(entries):
        rows, expected = held.container(i, e)
        if expected is not None and rows == expected and not failed.covers(i):
            done.add(i)
    return done


def _rewrite(stats: dict, complete: set[int], run: Run, held: Coverage) -> dict | None:
    """Rewrites a part without the rows of incomplete inputs; its new statistics, or None if
    nothing is left. (Read, write the rest, then delete: a crash here only costs work.)"""
    staging = run.staging
    index = {e.id: i for i, e in enumerate(run.entries)}
    table = staging.read_part(stats["name"])
    sources = table.column("source").to_pylist()
    keep = [s in index and index[s] in complete for s in sources]
    table = table.filter(pa.array(keep))
    result = None
    if table.num_rows:
        metas = [{"index": index[s]} for s, k in zip(sources, keep) if k]
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
