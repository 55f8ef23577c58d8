"""Lease: one writer per output directory at a time.

`<output>/_staging/_lease` is created create-only (`If-None-Match: *` on S3, `ifGenerationMatch=0` on
GCS, `O_EXCL` on local disks) before a run stages anything, renewed by the driver while it
runs, checked again just before the commit point, and deleted when the run ends. A second run
on the same output finds the lease and fails with `OutputBusy`, naming the holder.

A lease whose holder stopped renewing it for `ttl_seconds` (or, on the same host, whose
process is gone) is stale: the next run takes it over, so a killed driver never blocks the
re-run. Limits (docs/reliability.md): a store that ignores the create-only precondition (the
GCS emulator does; real GCS and S3 honour it) leaves a race between two runs that start within
the same moment; the read-back after creating and the check before `_SUCCESS` then still let
only the run named in the lease commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time

from batchscore.driver.repeating import repeating
from batchscore.exceptions import OutputBusy, SinkError
from batchscore.inputs import fs as fsutil

LEASE = "_staging/_lease"  # inside _staging/: a killed run leaves nothing else behind
TTL_SECONDS = 600.0

log = logging.getLogger("batchscore")


class Lease:
    def __init__(self, output: str, run_id: str, ttl_seconds: float = TTL_SECONDS):
        self.fs, root = fsutil.resolve(output)
        self.output, self.run_id, self.ttl = output, run_id, ttl_seconds
        self.path = f"{root.rstrip('/')}/{LEASE}"
        self.uri = fsutil.full_uri(self.fs, self.path)
        self._renewed = 0.0
        self.lost: Exception | None = None  # what the heartbeat thread of `held` met, if anything

    def acquire(self) -> Lease:
        """Creates the lease, taking over a stale one; raises `OutputBusy` if another run holds it."""
        if fsutil.is_local(self.fs):
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        for attempt in range(2):
            try:
                self.fs.pipe_file(self.path, self._body(), mode="create")
                break
            except FileExistsError:
                holder = self.read()
                if holder is None:
                    continue  # released meanwhile
                stale = self._stale_reason(holder)
                if stale is None or attempt:
                    raise OutputBusy(self._busy_message(holder)) from None
                log.warning("taking over the lease of run %s on %s: %s", holder.get("run_id"), self.output, stale)
                fsutil.remove_file(self.fs, self.path)
            except Exception as e:  # a missing bucket, no permission: say so before any work is done
                raise SinkError(f"output {self.output!r} is not writable: {type(e).__name__}: {e}") from e
        self.check()  # stores that ignore the precondition: whoever wrote last holds it
        self._renewed = time.monotonic()
        return self

    def renew(self, every_seconds: float | None = None) -> None:
        """Refreshes the heartbeat (at most every `every_seconds`, default ttl/4)."""
        if time.monotonic() - self._renewed < (every_seconds if every_seconds is not None else self.ttl / 4):
            return
        self.check()
        self.fs.pipe_file(self.path, self._body())
        self._renewed = time.monotonic()

    @contextlib.contextmanager
    def held(self):
        """Renews the lease every ttl/4 from a thread while the block runs: the driver may wait
        long for one part's record (a part of 2,000 ViT-B/16 rows takes minutes on a CPU).

        Raises:
            OutputBusy: (on leaving the block) the lease was lost meanwhile.
        """
        self.lost = None

        def beat() -> bool:
            try:
                self.renew(every_seconds=0)
            except Exception as e:  # noqa: BLE001 - raised in the driver's thread below
                self.lost = e
                return False
            return True

        with repeating(self.ttl / 4, beat, "batchscore-lease"):
            yield self
        if self.lost is not None:
            raise self.lost

    def check(self) -> None:
        """Raises `OutputBusy` unless this run holds the lease."""
        holder = self.read()
        if holder is None or holder.get("run_id") != self.run_id:
            raise OutputBusy(f"run {self.run_id} lost the lease on {self.output}: "
                             + (self._busy_message(holder) if holder else f"{self.uri} was deleted")
                             + "; nothing was committed")

    def release(self) -> None:
        """Deletes the lease if this run still holds it."""
        try:
            holder = self.read()
            if holder is not None and holder.get("run_id") == self.run_id:
                fsutil.remove_file(self.fs, self.path)
        except Exception as e:  # noqa: BLE001 - a lease left behind goes stale; never mask the run's outcome
            log.warning("could not release the lease %s: %s", self.uri, e)

    def busy(self) -> str | None:
        """Why a run could not take this lease now (another live run holds it), or None.
        Reads only (`batchscore validate`)."""
        holder = self.read()
        if holder is None or self._stale_reason(holder) is not None:
            return None
        return self._busy_message(holder)

    def read(self) -> dict | None:
        try:
            if hasattr(self.fs, "invalidate_cache"):
                self.fs.invalidate_cache(self.path)
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"run_id": "?", "heartbeat": 0.0}  # unreadable: no valid heartbeat, so stale

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": now, "ttl_seconds": self.ttl}).encode()

    def _stale_reason(self, holder: dict) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age > float(holder.get("ttl_seconds", self.ttl)):
            return f"no heartbeat for {age:.0f}s"
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
            return f"its process {holder.get('pid')} on this host is gone"
        return None

    def _busy_message(self, holder: dict) -> str:
        age = time.time() - float(holder.get("heartbeat", 0.0))
        return (f"output {self.output} is being written by run {holder.get('run_id')} "
                f"(host {holder.get('host')}, pid {holder.get('pid')}, last heartbeat {age:.0f}s ago); "
                f"wait for it to finish, or delete {self.uri} if that run is dead "
                f"(it is also taken over once {holder.get('ttl_seconds', self.ttl):.0f}s pass without a heartbeat)")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
