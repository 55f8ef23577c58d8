"""Resume: continue a run that died from the part files it completed.

The newest staged run under `<output>/_staging/` is continued when it was started with the
same result-affecting settings and weights (its `_run.json` fingerprint); otherwise resuming
is refused with the settings that differ. Its part files are checked: a part without a
valid Parquet footer was being written when the run died and is deleted. The rows kept are
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

import collections
import logging
from dataclasses import dataclass, field

from batchscore import listing, sink
from batchscore.budget import ErrorBudget
from batchscore.config import ScoreConfig

log = logging.getLogger("batchscore")

# Settings that change which rows a run writes or what is in them. Runs that differ in
# these cannot share part files; the rest (resources, batch sizes, progress) may change.
RESULT_SETTINGS = ("input", "input_format", "image_column", "id_column", "uri_column", "passthrough", "model",
                   "allow_pickle", "top_k", "dtype", "max_image_pixels", "extensions", "formats")


class ResumeError(RuntimeError):
    """The staged run cannot be continued with these settings."""


def fingerprint(config: ScoreConfig, weights_sha256: str) -> dict:
    settings = config.to_dict()
    return {"schema": "batchscore.predictions.v1", "weights_sha256": weights_sha256,
            **{k: settings[k] for k in RESULT_SETTINGS}}


@dataclass
class Kept:
    """What a resumed run keeps: counted into the run's totals and checks."""

    run_id: str
    rows: int = 0
    parts_kept: int = 0
    parts_rewritten: int = 0
    parts_broken: int = 0
    complete: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)
    sources: collections.Counter = field(default_factory=collections.Counter)
    container_rows: dict[str, int] = field(default_factory=dict)


def latest(output: str, expected: dict) -> sink.StagedRun | None:
    """The newest staged run of `output`, if any; raises `ResumeError` if it is incompatible."""
    runs = sink.staged_runs(output)
    if not runs:
        return None
    run = runs[-1]
    found = run.info.get("fingerprint")
    if found != expected:
        if not found:
            raise ResumeError(f"cannot resume run {run.run_id} in {output}: its {sink.RUN_INFO} is missing or "
                              "unreadable; run without --resume to start a new run")
        diff = {k: (found.get(k), expected.get(k)) for k in sorted(set(found) | set(expected))
                if found.get(k) != expected.get(k)}
        details = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume run {run.run_id} in {output}: it was started with other settings "
                          f"({details}); re-run with the same settings, or without --resume to start a new run")
    return run


def adopt(run: sink.StagedRun, writer: sink.StagedWriter, entries: list[listing.Entry],
          budget: ErrorBudget) -> Kept:
    """Keeps the complete inputs' rows of `run` in `writer` (staging of the same run id)."""
    kept = Kept(run.run_id, parts_broken=len(run.broken))
    for name in run.broken:
        log.warning("resume: discarding half-written part %s", name)
        writer.fs.rm(f"{writer.staging}/{name}")
    listed = {e.id: e for e in entries}
    counts: collections.Counter[str] = collections.Counter()
    failed: set[str] = set()
    columns = {}  # part name -> its id, source and error columns, read once
    for part in run.parts:
        t = sink.read_staged_part(writer, part, ["id", "source", "error"])
        columns[part.name] = t
        sources, errors = t.column("source").to_pylist(), t.column("error").to_pylist()
        counts.update(sources)
        failed.update(s for s, e in zip(sources, errors) if e is not None)
    for source, n in counts.items():
        entry = listed.get(source)
        expected = None if entry is None else entry.rows if entry.rows is not None else run.container_rows.get(source)
        if expected == n and source not in failed:
            kept.complete.add(source)
    kept.container_rows = {s: n for s, n in run.container_rows.items() if s in kept.complete}
    for part in run.parts:
        table = columns[part.name]
        mask = [s in kept.complete for s in table.column("source").to_pylist()]
        if all(mask):
            kept.parts_kept += 1
        else:  # drop the incomplete inputs' rows: read, delete, write again (a crash here only costs work)
            full = sink.read_staged_part(writer, part).filter(mask)
            sink.drop_staged_part(writer, part.name)
            table = table.filter(mask)
            if full.num_rows:
                writer.write(full.drop_columns(["model", "run_id"]), kept.container_rows)
            kept.parts_rewritten += 1
        ids, errors = table.column("id").to_pylist(), table.column("error").to_pylist()
        kept.rows += len(ids)
        kept.ids.update(ids)
        kept.sources.update(table.column("source").to_pylist())
        budget.add(ids, errors)
    log.info("resume: run %s keeps %d rows of %d complete inputs (%d parts kept, %d rewritten, %d half-written "
             "discarded)", run.run_id, kept.rows, len(kept.complete), kept.parts_kept, kept.parts_rewritten,
             kept.parts_broken)
    return kept
