"""A function called from a thread every few seconds while a block runs (the lease's renewal,
the progress line while a part is awaited)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def repeating(seconds: float, fn: Callable[[], bool | None], name: str) -> Iterator[None]:
    """Calls `fn` every `seconds` from a daemon thread named `name` until the block ends (the
    thread is joined on leaving) or `fn` returns False."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(seconds):
            if fn() is False:
                return

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
