"""Run: one scoring run as the driver sees it, one object for its state.

The driver plans and commits; workers write the rows (`batchscore.outputs.write`). What reaches the
driver is one `PartStats` record per part file (a dict, as JSON):

    name, bytes, rows, errors     the part file, its size and row counts
    by_code, examples             errors by code; up to 20 (id, error) examples
    files                         index ranges [[a, b), ...] of the listed image files it holds
    containers                    {index: [rows held, rows announced or None]} of containers
    failed                        index ranges of inputs with at least one error row
    duplicates                    listed files seen more than once within the part

`Run` owns the staging folder, the lease, the error budget, the parts, the progress and the
row accounting (`Coverage`): one place that counts rows. Memory on the driver grows with the
number of parts and containers, not with the number of images.
"""

from __future__ import annotations

import bisect
import itertools
import logging

from batchscore.driver.budget import ErrorBudget
from batchscore.driver.progress import Progress
from batchscore.exceptions import SinkError
from batchscore.inputs.listing import Listing
from batchscore.outputs.lease import Lease
from batchscore.outputs.staging import Staging

log = logging.getLogger("batchscore")


class Coverage:
    """Which listed inputs the parts hold: merged index ranges of image files, and rows per
    container. A range added twice (a part written twice, a row duplicated) is counted in
    `duplicates`; nothing per image is kept."""

    def __init__(self):
        self.starts: list[int] = []  # disjoint, sorted [start, end) ranges of file indexes
        self.ends: list[int] = []
        self.containers: dict[int, list] = {}  # index -> [rows, announced or None]
        self.duplicates = 0

    def add(self, stats: dict) -> None:
        for a, b in stats["files"]:
            self.add_range(a, b)
        for key, (rows, announced) in stats["containers"].items():
            held = self.containers.setdefault(int(key), [0, None])
            held[0] += rows
            if announced is not None:
                held[1] = announced
        self.duplicates += stats["duplicates"]

    def add_range(self, a: int, b: int) -> None:
        i = bisect.bisect_right(self.starts, a)
        # merge with every overlapping or touching range, counting overlaps as duplicates
        lo, hi = a, b
        j = i - 1
        if j >= 0 and self.ends[j] >= a:
            i = j
        k = i
        while k < len(self.starts) and self.starts[k] <= hi:
            self.duplicates += max(0, min(self.ends[k], b) - max(self.starts[k], a))
            lo, hi = min(lo, self.starts[k]), max(hi, self.ends[k])
            k += 1
        self.starts[i:k], self.ends[i:k] = [lo], [hi]

    def container(self, index: int, known: int) -> tuple[int, int | None]:
        """(rows held, rows expected) of a container: expected from its Parquet footer
        (`known`, the listing's row count, -1 when unknown) or the count its reader
        announced (None while unknown)."""
        held, announced = self.containers.get(index, (0, None))
        return held, int(known) if known >= 0 else announced

    def files(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))

    def covers(self, index: int) -> bool:
        i = bisect.bisect_right(self.starts, index) - 1
        return i >= 0 and index < self.ends[i]


class Run:
    """A run's driver-side state: staging, lease, budget, parts, progress and coverage."""

    def __init__(self, run_id: str, listing: Listing, staging: Staging, lease: Lease,
                 max_error_fraction: float, progress_seconds: float):
        self.run_id, self.listing, self.staging, self.lease = run_id, listing, staging, lease
        self.containers = listing.kind != "file"
        known = listing.known_rows
        self.budget = ErrorBudget(max_error_fraction, known)
        self.coverage = Coverage()
        self.parts: list[dict] = []
        self.kept_rows = 0
        self.rewritten = self.discarded = 0  # by resume: parts rewritten without incomplete inputs, half-written
        self.progress = Progress(total=known, every_seconds=progress_seconds)

    @property
    def rows(self) -> int:
        return self.budget.rows

    def keep(self, stats: dict) -> None:
        """A part kept from a resumed run: counted, but not progress."""
        self._count(stats)
        self.kept_rows += stats["rows"]
        self.progress.total = None if self.progress.total is None else self.progress.total - stats["rows"]

    def add(self, stats: dict) -> None:
        """A part a worker just wrote."""
        self._count(stats)
        self.progress.update(stats["rows"], stats["errors"])

    def _count(self, stats: dict) -> None:
        self.parts.append(stats)
        self.coverage.add(stats)
        self.budget.add_counts(stats["rows"], stats["errors"], stats["by_code"], stats["examples"])

    def check(self) -> None:
        """Raises `SinkError` unless the parts hold one row per image of the listing (`check_rows`)."""
        check_rows(self.listing, self.coverage, self.rows)

    def part_files(self) -> list[dict]:
        """The manifest's `files`: each part's name, rows, bytes and the Ray node that wrote it."""
        return [{"name": p["name"], "rows": p["rows"], "bytes": p["bytes"], "node": p.get("node")} for p in self.parts]



def check_rows(listing: Listing, coverage: Coverage, rows: int) -> None:
    """One row per image, every row from a listed input, or the run fails before commit.

    Image files: every listed index exactly once. Containers: the rows each one's
    footer (Parquet) or reader (tar shards, request files) announced.

    Raises:
        SinkError: rows are missing, duplicated or from unlisted inputs; nothing is committed.
    """
    problems, n = [], listing.count
    cov = coverage
    if cov.duplicates:
        problems.append(f"{cov.duplicates} duplicate rows")
    if listing.container_rows is not None:
        unlisted = sorted(i for i in cov.containers if not 0 <= i < n)
        wrong, empty = [], []
        for i, known in enumerate(listing.container_rows):
            held, expected = cov.container(i, known)
            if (expected is not None or held) and held != expected:
                wrong.append((i, held, expected))
            if known < 0 and not held:
                empty.append(i)
        if wrong:
            named = [(name, held, expected) for name, (_, held, expected)
                     in zip(listing.ids([i for i, _, _ in wrong[:3]]), wrong)]
            problems.append(f"{len(wrong)} input(s) gave the wrong number of rows (input, got, expected), "
                            f"e.g. {named}")
        if empty:
            log.warning("%d input file(s) held no image rows: %s", len(empty), listing.ids(empty[:5]))
    else:
        unlisted = [[s, e] for s, e in zip(cov.starts, cov.ends) if s < 0 or e > n]
        missing = n - sum(max(0, min(e, n) - max(s, 0)) for s, e in zip(cov.starts, cov.ends))
        if missing:
            gaps = listing.ids(list(itertools.islice((i for i in range(n) if not cov.covers(i)), 3)))
            problems.append(f"{missing} input(s) gave no row, e.g. {gaps}")
    if unlisted:
        problems.append(f"rows from unlisted inputs (listing index {unlisted[:3]})")
    if problems:
        known = listing.known_rows if listing.known_rows is not None else int(
            listing.container_rows.clip(min=0).sum())
        raise SinkError(f"expected one row per input ({n} inputs, {known} rows known in advance) "
                        f"but wrote {rows} rows: {'; '.join(problems)}; nothing was committed")
