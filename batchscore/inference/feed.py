"""Feed: getting a batch of pixels onto the model's device and through the model, in chunks.

The predict stage's plumbing between Ray Data's batch and the forward pass:

- **Batch candidates by GPU memory.** The probe (`predict.BatchSizer`) tries forward batch
  sizes up to 1,024 on a GPU of 40 GiB or more (ViT-B/16 wants hundreds at once there), up
  to 512 on 20-40 GiB (L4, A10G), 256 below; the driver reads the GPU's type from Ray's
  `accelerator_type:<name>` resource to size the batches it hands each actor.
- **Overlapped copies.** On CUDA each chunk of host pixels is copied into one of two pinned
  staging buffers (allocated once, reused), then to the device on a copy stream, while the
  model runs the previous chunk on the compute stream (`overlap_schedule`). Pixels already
  on the device (decoded there, `batchscore.decoding.device_decode`) skip the copy. On a CPU the
  same schedule runs with views instead of copies.
- **One copy back per batch.** Each chunk's logits stay on the device; the caller runs
  top-k once on them all, so the host waits on the GPU once per batch, not per chunk.
- **torch.compile**, when asked for: the first forward at each chunk size is what compiles;
  its time is logged and kept in `compile_seconds`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from batchscore.config import default

log = logging.getLogger(__name__)

GPU_BATCH_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class FeedOptions:
    """What the inference actor needs beyond the model to take its batches.

    Attributes:
        decode_on_device: Batches come from `device_decode.check_batch` (JPEGs as bytes, to
            decode on the actor's device), not from `decode.decode_batch` (pixels).
        max_image_pixels, formats: For the CPU fallback of images the device decoder refuses.
        compile: Run the model through `torch.compile`.
        decode_cpus: CPUs each decode task holds (for the sizing line).
        decode_device: As configured and resolved ("cpu", "cuda" or "torchvision"), for the sizing line.
        sizing_seconds: Seconds between the actor's sizing lines.
    """

    decode_on_device: bool = False
    max_image_pixels: int = default("max_image_pixels")
    formats: tuple[str, ...] = default("formats")
    compile: bool = default("compile")
    decode_cpus: float = default("decode_cpus")
    decode_device: str = "cpu"
    # BATCHSCORE_SIZING_SECONDS (read on the driver) shortens it for benches and short runs.
    sizing_seconds: float = field(default_factory=lambda: float(os.environ.get("BATCHSCORE_SIZING_SECONDS", "30")))
# GiB of memory per GPU by the names Ray gives them (`accelerator_type:<name>` resources).
ACCELERATOR_MEMORY_GIB = {
    "T4": 16, "V100": 16, "P100": 16, "P4": 8, "K80": 12, "A10G": 24, "L4": 24, "L40S": 48, "A100": 40,
    "A100-40G": 40, "A100-80G": 80, "H100": 80, "H20": 96, "H200": 141, "B200": 180, "B300": 288,
    "GB200": 186, "GB300": 288, "RTX": 96,
}


def gpu_batch_candidates(memory_gib: float | None) -> tuple[int, ...]:
    """The forward batch sizes the probe tries on a GPU with `memory_gib` GiB (None: unknown)."""
    if memory_gib is None:
        top = 256
    elif memory_gib >= 40:
        top = 1024
    elif memory_gib >= 20:
        top = 512
    elif memory_gib >= 12:
        top = 256
    else:
        top = 128
    return tuple(c for c in GPU_BATCH_CANDIDATES if c <= top)


def accelerator_memory_gib(resources: dict[str, float]) -> float | None:
    """The smallest GPU memory among the accelerator types in Ray's cluster `resources`
    (the batch must fit the smallest GPU an actor may land on); None when no type is known."""
    known = []
    for key in resources:
        if key.startswith("accelerator_type:"):
            name = key.split(":", 1)[1]
            gib = ACCELERATOR_MEMORY_GIB.get(name) or ACCELERATOR_MEMORY_GIB.get(name.split("_")[0])
            if gib is None:
                return None  # an unknown GPU among them: size for the unknown
            known.append(gib)
    return min(known) if known else None


def queue_mb(decoded_queue_mb: int, batch: int, hw: tuple[int, int]) -> int:
    """MiB of object store per actor: `decoded_queue_mb`, but at least three actor batches of
    uint8 pixels (one being scored, two waiting), so a GPU taking 1,024 at a time is not starved."""
    return max(decoded_queue_mb, math.ceil(3 * batch * 3 * hw[0] * hw[1] / 2**20))


def device_memory_gib(device) -> float | None:
    """GiB of memory of a CUDA `device` (None on a CPU)."""
    import torch  # lazy: torch in the inference actor only; the driver imports this module without it

    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def overlap_schedule(n_chunks: int, ahead: int = 1) -> list[tuple[str, int]]:
    """The order of copies and computes for `n_chunks` chunks, `ahead` copies in flight.

    Chunk i + ahead + 1 is copied right after chunk i's forward is queued, so its copy
    (host → pinned buffer → device, on the copy stream) runs while the GPU computes chunk i;
    it reuses chunk i's staging buffer (`ahead + 1` buffers in all) once chunk i's copy is done.
    """
    steps = [("copy", i) for i in range(min(n_chunks, ahead + 1))]
    for i in range(n_chunks):
        steps.append(("compute", i))
        if i + ahead + 1 < n_chunks:
            steps.append(("copy", i + ahead + 1))
    return steps


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) slices of `size` covering `n` images; the last may be short."""
    return [(start, min(n, start + size)) for start in range(0, n, size)]


class Feeder:
    """Runs `forward` over a batch in chunks, copies overlapped with compute on CUDA.

    Args:
        device: The model's torch device.
        compiled: The model was wrapped by `torch.compile`: log each chunk size's first call.
        ahead: Chunks whose copy runs ahead of the compute (staging buffers: ahead + 1).
    """

    def __init__(self, device, compiled: bool = False, ahead: int = 1):
        import torch  # lazy: torch in the inference actor only; the driver imports this module without it

        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ahead = ahead
        self.compiled = compiled
        self.compile_seconds: dict[int, float] = {}
        self._pinned: list = [None] * (ahead + 1)
        self._copied: list = [None] * (ahead + 1)  # the event of each buffer's last copy
        self.trace: list[tuple[str, int]] = []  # the steps of the last batch, as run

    def run(self, pixels, size: int, forward) -> list:
        """`forward(uint8 [n, 3, H, W] on the device)` for each chunk of `size`; its outputs in order.

        `pixels` is a host numpy array (or CPU tensor), or a tensor already on the device.
        """
        import torch  # lazy: torch in the inference actor only; the driver imports this module without it

        host = not isinstance(pixels, torch.Tensor) or pixels.device.type == "cpu"
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        parts = spans(len(pixels), size)
        staged: dict[int, tuple] = {}
        outputs = []
        self.trace = []
        for step, i in overlap_schedule(len(parts), self.ahead):
            self.trace.append((step, i))
            start, stop = parts[i]
            if step == "copy":
                staged[i] = self._stage(pixels, start, stop, i, size) if host and self.cuda else \
                    (pixels[start:stop], None)
                continue
            x, copied = staged.pop(i)
            if copied is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(copied)
                x.record_stream(stream)  # allocated on the copy stream, used on this one
            outputs.append(self._forward(forward, x, stop - start))
        return outputs

    def _stage(self, pixels, start: int, stop: int, i: int, size: int):
        """Host chunk → pinned buffer (i % slots) → device on the copy stream; (tensor, event)."""
        import torch  # lazy: torch in the inference actor only; the driver imports this module without it

        slot = i % len(self._pinned)
        shape = (size, *pixels.shape[1:])
        if self._pinned[slot] is None or tuple(self._pinned[slot].shape) != shape:
            self._pinned[slot] = torch.empty(shape, dtype=pixels.dtype, pin_memory=True)
            self._copied[slot] = None
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # its previous copy has left the buffer
        buffer = self._pinned[slot][: stop - start]
        buffer.copy_(pixels[start:stop])
        with torch.cuda.stream(self.copy_stream):
            x = buffer.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self._copied[slot] = done
        return x, done

    def _forward(self, forward, x, n: int):
        if not self.compiled or n in self.compile_seconds:
            return forward(x)
        import torch  # lazy: torch in the inference actor only; the driver imports this module without it

        began = time.perf_counter()
        out = forward(x)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.compile_seconds[n] = time.perf_counter() - began
        log.info("torch.compile: batch %d compiled and ran in %.1fs", n, self.compile_seconds[n])
        return out


def maybe_compile(net, enabled: bool):
    """`torch.compile(net)` when enabled (shapes static: one graph per chunk size, each
    compiled on its first batch; fix `batch_size` to compile once)."""
    if not enabled:
        return net
    import torch  # lazy: torch in the inference actor only; the driver imports this module without it

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    return torch.compile(net, dynamic=False)
