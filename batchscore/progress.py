"""Progress lines for long runs, readable in a non-TTY log (one line every few seconds)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("batchscore")


class Progress:
    def __init__(self, total: int | None, every_seconds: float):
        self.total = total
        self.every = every_seconds
        self.done = self.errors = 0
        self.start = time.monotonic()
        self.first_row_seconds: float | None = None
        self.first_batch_rows = 0
        self.updates = 0
        self.last_row_seconds = 0.0
        self._last = self.start

    def update(self, rows: int, errors: int) -> None:
        now = time.monotonic()
        if self.first_row_seconds is None and rows:
            self.first_row_seconds = now - self.start
            self.first_batch_rows = rows
            log.info("first rows after %.2fs", self.first_row_seconds)
        if rows:
            self.last_row_seconds = now - self.start
            self.updates += 1
        self.done += rows
        self.errors += errors
        if now - self._last >= self.every:
            self._last = now
            log.info("%s", self.line())

    @property
    def steady_rate(self) -> float:
        """Rows per second between the first and the last part written (start-up excluded);
        0.0 (not measured) with fewer than three parts: between two parts that arrive together
        the "rate" is noise (131,019 images/s was recorded once)."""
        span = self.last_row_seconds - (self.first_row_seconds or 0.0)
        return (self.done - self.first_batch_rows) / span if span > 0 and self.updates >= 3 else 0.0

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """E.g. `progress: 120/500 images (24.0%), 3 errors, 18.2 images/s, eta 21s`; without a
        known total (tar shards, request files) the count and rate only."""
        rate = self.rate
        head = f"progress: {self.done} images, {self.errors} errors, {rate:.1f} images/s"
        if self.total is None:
            return head
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"progress: {self.done}/{self.total} images ({pct:.1f}%), {self.errors} errors, "
                f"{rate:.1f} images/s, eta {eta}")


def log_from_worker() -> None:
    """Gives batchscore's logger a stderr handler in a Ray worker, where Ray shows it in the
    driver's output (prefixed with the actor's name and pid); the driver has its own."""
    logger = logging.getLogger("batchscore")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
