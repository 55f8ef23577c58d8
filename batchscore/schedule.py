"""Date partitions: nightly scoring and backfills over the same job file.

A job's `input` and `output` may hold `{date}` (YYYY-MM-DD), e.g.
`gs://bucket/images/dt={date}/` → `gs://bucket/scores/dt={date}/`. Each date is its own run
with its own output, so each commits on its own: a committed partition is a no-op, and a
partition whose run died continues from its staged part files (`resume` is always on here).

Each partition is compared with the one before it: the nearest earlier date (up to
`LOOKBACK_DAYS` back) whose output holds a committed run is the run's `baseline` (unless the
job sets one), so its `_report.html` shows the drift, and `nightly` and `backfill` return the
drift figures (`batchscore.reporting.drift`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable

from batchscore import pipeline, plan
from batchscore.config import ScoreConfig
from batchscore.exceptions import ConfigError
from batchscore.outputs.output import read_manifest
from batchscore.reporting import drift

log = logging.getLogger("batchscore")

LOOKBACK_DAYS = 31  # how far back the previous committed partition is looked for


def parse_date(value: str | dt.date) -> dt.date:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"date: expected YYYY-MM-DD, got {value!r}") from None


def yesterday_utc() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)


def date_range(start: str | dt.date, end: str | dt.date) -> list[dt.date]:
    """Every date from `start` to `end`, both included."""
    first, last = parse_date(start), parse_date(end)
    if last < first:
        raise ConfigError(f"date range: end {last} is before start {first}")
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def for_date(config: ScoreConfig, date: str | dt.date) -> ScoreConfig:
    """The config of one partition: `{date}` filled in `input`, `output` and a `baseline` that
    holds it (the same date of another output: another model's, say), resume on."""
    day = parse_date(date).isoformat()
    if "{date}" not in config.output:
        raise ConfigError(f"output: a dated job needs '{{date}}' in its output template so partitions do not "
                          f"share one output; got {config.output!r}")
    if not any("{date}" in i for i in config.input):
        raise ConfigError(f"input: a dated job needs '{{date}}' in an input template; got {list(config.input)}")
    try:
        return config.with_overrides(input=tuple(i.format(date=day) for i in config.input),
                                     output=config.output.format(date=day), resume=True,
                                     baseline=config.baseline and config.baseline.format(date=day))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"input/output templates may only use {{date}}: {e!r}") from None


def previous_partition(config: ScoreConfig, date: str | dt.date, lookback: int = LOOKBACK_DAYS) -> str | None:
    """The output of the nearest date before `date` (at most `lookback` days back) that holds
    a committed run, or None."""
    day = parse_date(date)
    for back in range(1, lookback + 1):
        candidate = config.output.format(date=(day - dt.timedelta(days=back)).isoformat())
        if read_manifest(candidate) is not None:
            return candidate
    return None


def _with_baseline(config: ScoreConfig, day: dt.date, cfg: ScoreConfig) -> ScoreConfig:
    """`cfg` (the partition's config) with the previous committed partition as its baseline,
    unless the job names one."""
    if config.baseline:
        return cfg
    return cfg.with_overrides(baseline=previous_partition(config, day))


def drift_of(cfg: ScoreConfig) -> dict | None:
    """The drift of the committed run in `cfg.output` against `cfg.baseline` (None when there
    is none: no committed partition in the `LOOKBACK_DAYS` before, or the job's baseline is
    gone since the run was checked, which is logged)."""
    if not cfg.baseline:
        log.info("drift of %s: no committed partition in the %d days before", cfg.output, LOOKBACK_DAYS)
        return None
    return drift.against(cfg.output, cfg.baseline, plan.drift_thresholds(cfg), required=False)


def nightly(config: ScoreConfig, date: str | dt.date | None = None):
    """Scores one date (default: yesterday, UTC); returns the `RunResult`, with its drift
    against the previous committed partition (`result.drift`)."""
    day = parse_date(date or yesterday_utc())
    cfg = _with_baseline(config, day, for_date(config, day))
    result = pipeline.score(cfg)
    return dataclasses.replace(result, drift=drift_of(cfg))


def backfill(config: ScoreConfig, dates: Iterable[str | dt.date], parallel: int = 1):
    """Scores each date as its own committed run, `parallel` at a time, in date order.

    A partition that fails does not stop the others; calling again with the same dates
    skips the committed ones and resumes the rest.

    Each partition is compared with the previous committed one (before it is scored, for its
    report; the returned figures once all are done, so a parallel backfill compares each with
    the date before it too).

    Returns:
        A pandas DataFrame, one row per date: partition, status (committed,
        already_committed, failed), rows, errors, seconds, output, error (the failure), and
        the drift against the previous committed partition: baseline (its output), psi, js,
        error_rate_change, confidence_change, drift_flagged (the figures past their
        thresholds), drift (all figures, as `batchscore.reporting.drift.compare` returns them).
    """
    import pandas as pd  # lazy: pandas only for backfill's table

    days = sorted({parse_date(d) for d in dates})
    if parallel < 1:
        raise ConfigError(f"parallel: expected 1 or more, got {parallel}")
    partitions = [(day, for_date(config, day)) for day in days]  # bad templates fail before any work

    def one(item) -> dict:
        day, cfg = item
        start = time.monotonic()
        try:
            result = pipeline.score(_with_baseline(config, day, cfg))
            row = {"status": result.status, "rows": result.rows, "errors": result.errors, "error": None}
        except Exception as e:  # noqa: BLE001 - one partition's failure is reported, the rest go on
            row = {"status": "failed", "rows": 0, "errors": 0, "error": f"{type(e).__name__}: {e}"}
        row = {"partition": day.isoformat(), **row, "seconds": round(time.monotonic() - start, 2),
               "output": cfg.output}
        with lock:
            finished.append(day)
            done = len(finished)
        log.info("backfill %s (%d/%d): %s, %d rows, %d errors, %.1fs%s", row["partition"], done, len(days),
                 row["status"], row["rows"], row["errors"], row["seconds"],
                 f": {row['error']}" if row["error"] else "")
        return row

    lock, finished = threading.Lock(), []
    rows: list[dict | None] = [None] * len(partitions)
    with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="batchscore-backfill") as pool:
        futures = {pool.submit(one, item): i for i, item in enumerate(partitions)}
        for future in concurrent.futures.as_completed(futures):
            rows[futures[future]] = future.result()
    for (day, cfg), row in zip(partitions, rows):
        row.update(_drift_columns(_with_baseline(config, day, cfg), row["status"]))
    columns = ["partition", "status", "rows", "errors", "seconds", "output", "error", "baseline", "psi", "js",
               "error_rate_change", "confidence_change", "drift_flagged", "drift"]
    return pd.DataFrame(rows, columns=columns)


def _drift_columns(cfg: ScoreConfig, status: str) -> dict:
    empty = {"baseline": None, "psi": None, "js": None, "error_rate_change": None, "confidence_change": None,
             "drift_flagged": [], "drift": None}
    if status == "failed" or not cfg.baseline:
        return empty
    try:
        found = drift_of(cfg)
    except Exception as e:  # noqa: BLE001 - drift is a figure, not a reason to fail the backfill
        log.warning("drift of %s against %s: %s: %s", cfg.output, cfg.baseline, type(e).__name__, e)
        return empty
    if found is None:
        return empty
    f = found["figures"]
    return {"baseline": found["baseline"], "psi": f["psi"]["value"], "js": f["js"]["value"],
            "error_rate_change": f["error_rate"]["value"], "confidence_change": f["mean_top1_probability"]["value"],
            "drift_flagged": found["flagged"], "drift": found}
