"""Sizing: is the model actor fed? Measured decode and model rates → one log line.

Each inference actor times itself: the seconds inside its calls (decode on the device when
there is one, the forward passes, top-k) against the wall time since its first batch was
done, and sums the CPU tasks' decode seconds that came with its rows. `assess` turns that
into a line such as

    GPU busy 41%: decode-bound: add CPUs or use decode_device=cuda (model 2950 images/s when busy,
    decode 380 images/s per CPU: ~8 decode CPUs per actor keep it busy)

A pure function of the measured figures, so it is tested without timing anything.
docs/operations.md says how to read it and sizes L4, A100 and H100 nodes with it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# Below this share of wall time busy, the actor waits on its input: decode-bound.
BUSY_ENOUGH = 0.8


@dataclass(frozen=True)
class Assessment:
    busy: float  # share of wall time the actor was in its calls
    model_images_per_second: float  # while busy
    decode_images_per_cpu_second: float | None  # the CPU tasks' decode rate per CPU they hold
    decode_cpus_needed: float | None  # CPUs of decode tasks that keep the actor busy
    line: str


def assess(*, images: int, busy_seconds: float, wall_seconds: float, decode_seconds: float, decode_cpus: float,
           on_gpu: bool, decode_device: str) -> Assessment:
    """The sizing figures and line of one actor.

    Args:
        images: Images scored in the window.
        busy_seconds: Seconds inside the actor's calls in the window.
        wall_seconds: The window's length.
        decode_seconds: The CPU decode tasks' seconds for those images (their rows carry it).
        decode_cpus: CPUs each decode task holds (`decode_cpus`): a task at 0.5 CPU shares
            its core, so its seconds count half.
        on_gpu: Whether the actor runs on a GPU (the line says "GPU", else "model actor").
        decode_device: "cpu" when JPEGs are decoded in the CPU tasks, else where they are.
    """
    who = "GPU" if on_gpu else "model actor"
    busy = min(1.0, busy_seconds / wall_seconds) if wall_seconds > 0 else 0.0
    model_rate = images / busy_seconds if busy_seconds > 0 else 0.0
    per_cpu = images / (decode_seconds * decode_cpus) if decode_seconds > 0 and decode_cpus > 0 else None
    needed = model_rate / per_cpu if per_cpu else None
    rates = f"model {model_rate:.0f} images/s when busy"
    if per_cpu:
        rates += f", CPU decode tasks {per_cpu:.0f} images/s per CPU: ~{math.ceil(needed)} decode CPUs per actor keep it busy"
    if busy >= BUSY_ENOUGH:
        line = f"{who} busy {busy:.0%}: model-bound ({rates})"
    elif decode_device == "cpu" and on_gpu:
        line = f"{who} busy {busy:.0%}: add CPUs or use decode_device=cuda ({rates})"
    elif decode_device == "cpu":
        line = f"{who} busy {busy:.0%}: add CPUs for decode ({rates})"
    else:
        line = (f"{who} busy {busy:.0%} with JPEGs decoded on the {'GPU' if on_gpu else 'actor'}: add CPUs for "
                f"reading and the other formats, or look at the input's storage ({rates})")
    return Assessment(busy, model_rate, per_cpu, needed, line)


class BusyClock:
    """Counts an actor's busy and wall time from the end of its first call (warm-up and the
    batch size probe's first shapes are not its steady state) and says when a line is due."""

    def __init__(self, every_seconds: float = 30.0, clock=time.monotonic):
        self.every, self.clock = every_seconds, clock
        self.since: float | None = None
        self.last_line: float | None = None
        self.images = 0
        self.busy = self.decode = 0.0
        self._entered = 0.0

    def enter(self) -> None:
        self._entered = self.clock()

    def leave(self, images: int, decode_seconds: float) -> bool:
        """Ends a call of `images` images; True when a sizing line is due."""
        now = self.clock()
        if self.since is None:
            self.since = self.last_line = now
            return False
        self.images += images
        self.busy += now - self._entered
        self.decode += decode_seconds
        if now - self.last_line >= self.every:
            self.last_line = now
            return True
        return False

    def figures(self) -> dict:
        """The keyword arguments of `assess` this clock measured."""
        return {"images": self.images, "busy_seconds": self.busy,
                "wall_seconds": (self.clock() - self.since) if self.since is not None else 0.0,
                "decode_seconds": self.decode}
