"""Progress and messages for the person running a job: log lines every few seconds (readable
in a non-TTY log), a tqdm bar for Python callers (a widget in Jupyter), and messages in the
caller's terms (`--overwrite` on the command line, `overwrite=True` from Python).

The CLI configures logging itself and runs inside `cli_terms()`. `batchscore.score` and the
other Python entry points run inside `python_caller()`: it shows the library's log lines
when nothing else would (no handler on the root or `batchscore` logger) and, in Jupyter or
on a terminal, a progress bar instead of the periodic progress lines.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator

from batchscore.driver.repeating import repeating

log = logging.getLogger("batchscore")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Seconds of parts the ETA's rate is measured over: recent enough to follow the run's pace,
# and never the start-up (Ray, model load) before the first rows.
RATE_WINDOW_SECONDS = 60.0
# The least time between the parts a rate is taken from: parts that come together (two within
# milliseconds) gave "123502.0 images/s, eta 0s".
MIN_RATE_SPAN_SECONDS = 1.0

_cli = contextvars.ContextVar("batchscore_cli", default=False)
_bar = contextvars.ContextVar("batchscore_bar", default=False)


class Progress:
    """Counts the rows of a run as parts arrive; says where it stands.

    Args:
        total: Rows expected, or None when unknown until read (tar shards, request files).
        every_seconds: Seconds between progress log lines.
        clock: Seconds, monotonic (tests pass a fake one).
        bar: A tqdm-like bar to update instead of logging periodic lines; by default one from
            `tqdm.auto` when the caller is Python in Jupyter or on a terminal (`python_caller`).
    """

    def __init__(self, total: int | None, every_seconds: float, *, clock: Callable[[], float] = time.monotonic,
                 bar=None):
        self.clock = clock
        self.every = every_seconds
        self.done = self.errors = 0
        self.start = clock()
        self.first_row_seconds: float | None = None
        self.first_batch_rows = 0
        self.updates = 0
        self.last_row_seconds = 0.0
        self._last = self.start
        self._samples: collections.deque[tuple[float, int]] = collections.deque()  # (seconds, done) per part
        self._logged: str | None = None
        self._finished = False
        self.bar = bar if bar is not None else (_new_bar(total) if _bar.get() else None)
        self._total = total
        self._lock = threading.Lock()  # `update` and `finish` in the driver's thread, `tick` in the timer's

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:  # resume: kept rows are not progress
        self._total = value
        if self.bar is not None:
            self.bar.total = value
            self.bar.refresh()

    def update(self, rows: int, errors: int) -> None:
        with self._lock:
            self._update(rows, errors)

    def _update(self, rows: int, errors: int) -> None:
        now = self.clock()
        if self.first_row_seconds is None and rows:
            self.first_row_seconds = now - self.start
            self.first_batch_rows = rows
            log.info("first rows after %.2fs", self.first_row_seconds)
        if rows:
            self.last_row_seconds = now - self.start
            self.updates += 1
        self.done += rows
        self.errors += errors
        if rows:
            self._sample(now)
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix(errors=self.errors, refresh=False)
            return  # the bar shows it; `finish` logs the final line
        if now - self._last >= self.every and not self.complete:
            self._last = now
            self._log(self.line())

    def tick(self) -> None:
        """The line again when none was logged for `every_seconds` (a bar: redrawn), saying how
        long the run has waited for its next part: rows are counted as parts come, and a part
        of 2,000 ViT-B/16 rows takes minutes on a CPU. Nothing once all rows are in."""
        with self._lock:
            now = self.clock()
            if self._finished or self.complete or now - self._last < self.every:
                return
            self._last = now
            if self.bar is not None:
                self.bar.refresh()
                return
            waited = now - self.start - (self.last_row_seconds if self.updates else 0.0)
            self._log(f"{self.line()} ({'next' if self.updates else 'first'} part: {waited:.0f}s so far)")

    @contextlib.contextmanager
    def ticking(self) -> Iterator[Progress]:
        """`tick` from a thread every `every_seconds` while the block runs."""
        with repeating(self.every, self.tick, "batchscore-progress"):
            yield self

    def _sample(self, now: float) -> None:
        self._samples.append((now - self.start, self.done))
        # Keep one sample older than the window: the rate's reference point.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.start - RATE_WINDOW_SECONDS:
            self._samples.popleft()

    @property
    def complete(self) -> bool:
        return self.total is not None and self.done >= self.total

    @property
    def recent_rate(self) -> float | None:
        """Rows per second over the last RATE_WINDOW_SECONDS of parts (from the part before
        the window), counted from the first rows on: None until two parts came at least
        MIN_RATE_SPAN_SECONDS apart. The first part's rows arrive after the start-up and are
        not part of any rate."""
        if len(self._samples) < 2:
            return None
        (t0, done0), (t1, done1) = self._samples[0], self._samples[-1]
        return (done1 - done0) / (t1 - t0) if t1 - t0 >= MIN_RATE_SPAN_SECONDS else None

    @property
    def steady_rate(self) -> float:
        """Rows per second between the first and the last part written (start-up excluded);
        0.0 (not measured) with fewer than three parts, or when they span less than
        MIN_RATE_SPAN_SECONDS or a quarter of the time to the last part: parts that arrive
        together at the end of a short run give noise, not a rate (4,161 images/s for a run
        of 142, docs/benchmarks.md)."""
        span = self.last_row_seconds - (self.first_row_seconds or 0.0)
        enough = span >= max(MIN_RATE_SPAN_SECONDS, self.last_row_seconds / 4)
        return (self.done - self.first_batch_rows) / span if enough and self.updates >= 3 else 0.0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        """Rows per second since the progress started (start-up included)."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """While running, e.g. `progress: 120/500 images (24.0%), 3 errors, 18.2 images/s, eta
        21s`, with the recent rate (`recent_rate`; `eta ?` before it is known); once all rows
        are in, `progress: 500/500 images (100.0%), 3 errors in 31.0s, 16.1 images/s`, the
        rate being the images over the seconds on the line. Without a known total (tar shards,
        request files) no percentage or ETA."""
        count = f"{self.done}/{self.total} images ({self._pct():.1f}%)" if self.total is not None else \
            f"{self.done} images"
        if self.complete or self._finished:
            elapsed = round(self.elapsed, 1)  # the rate is over the seconds as printed
            rate = self.done / elapsed if elapsed > 0 else 0.0
            return f"progress: {count}, {self.errors} errors in {elapsed:.1f}s, {rate:.1f} images/s"
        recent = self.recent_rate
        head = f"progress: {count}, {self.errors} errors"
        if recent is None:
            return head + (", eta ?" if self.total is not None else "")
        head += f", {recent:.1f} images/s"
        if self.total is None:
            return head
        eta = (self.total - self.done) / recent if recent > 0 else None
        return head + (f", eta {eta:.0f}s" if eta is not None else ", eta ?")

    def _pct(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def finish(self) -> None:
        """Ends the progress: closes the bar and logs the final line, once (a run's last
        periodic line is never repeated)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            if self.bar is not None:
                self.bar.close()
            self._log(self.line())

    def _log(self, line: str) -> None:
        if line != self._logged:
            self._logged = line
            log.info("%s", line)


def _new_bar(total: int | None):
    # lazy: tqdm only where a bar is drawn; `import batchscore` imports this module
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="images", desc="batchscore", dynamic_ncols=True, leave=True)


# -- the caller's terms -------------------------------------------------------------------------

@contextlib.contextmanager
def cli_terms() -> Iterator[None]:
    """Messages inside this block speak to a command-line user (`--overwrite`)."""
    token = _cli.set(True)
    try:
        yield
    finally:
        _cli.reset(token)


def bar_shown() -> bool:
    """True where a run's progress is a tqdm bar (a Python caller in Jupyter or on a terminal)."""
    return _bar.get()


def overwrite_hint() -> str:
    """How the caller asks to score an output again: `--overwrite` or `overwrite=True`."""
    return "--overwrite" if _cli.get() else "overwrite=True"


def option(name: str, value=None) -> str:
    """A setting as the caller writes it: `--max-error-fraction 0.1` on the command line,
    `max_error_fraction=0.1` from Python and in job files (the name alone without a value)."""
    if _cli.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is None else f"{flag} {value}"
    return name if value is None else f"{name}={value}"


@contextlib.contextmanager
def python_caller() -> Iterator[None]:
    """Feedback for a call from Python (a notebook, a script) that did not set up logging.

    While the block runs: batchscore's INFO lines go to stderr when nothing else would show
    them (no handler on the root or the `batchscore` logger, level unset), through a handler
    that stays silent once the caller adds a root handler (no line printed twice); and in
    Jupyter or on a terminal, progress is a tqdm bar (`tqdm.auto`) instead of periodic lines.
    A caller's own logging setup is left as it is.
    """
    logger = logging.getLogger("batchscore")
    quiet = not logger.handlers and not logging.getLogger().handlers and logger.level == logging.NOTSET
    handler = _FallbackHandler() if quiet else None
    if handler:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    token = _bar.set(_in_notebook() or _isatty(sys.stderr)) if not _cli.get() else None
    try:
        yield
    finally:
        if token is not None:
            _bar.reset(token)
        if handler:
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)


class _FallbackHandler(logging.StreamHandler):
    """stderr (looked up at each line, as Jupyter replaces it), through `tqdm.write` so a
    bar on a terminal is redrawn below the line; silent when the root logger has a handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the caller configured logging after all: the root's handler prints it
        try:
            from tqdm.auto import tqdm  # lazy: as in `_new_bar`

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging never raises into the run
            self.handleError(record)


def _in_notebook() -> bool:
    """True in a Jupyter kernel (where `tqdm.auto` draws a widget)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell else None
    except Exception:  # noqa: BLE001
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def log_from_worker() -> None:
    """Gives batchscore's logger a stderr handler in a Ray worker, where Ray shows it in the
    driver's output (prefixed with the actor's name and pid); the driver has its own."""
    logger = logging.getLogger("batchscore")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
