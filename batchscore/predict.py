"""Predict: the inference actor. `__init__` loads the model once; `__call__` scores a batch.

Input batches hold uint8 pixels [N, 3, H, W]; they are moved to the device (pinned and
non-blocking on CUDA), rescaled and normalised there in float32 as the checkpoint says, cast
to the model dtype and run under `torch.inference_mode`. Rows that already carry an error
skip the model. The device and dtype are chosen at run time by `resolve_runtime`, so the
CUDA path is the same code as the CPU path.

The forward batch size is measured, not guessed, unless the config fixes it: `BatchSizer`
runs the first batches in chunks of each candidate size, times them and keeps the fastest
per image (on this 2-core CPU that is 8 for ViT-B/16 but 32 for ViT-Ti/16,
docs/benchmarks.md). The probe scores real images, so it costs no extra start-up time.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa

from batchscore.models import ModelInfo, local_path
from batchscore.postprocess import Postprocessor
from batchscore.progress import log_from_worker

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Forward batch sizes the probe tries when `batch_size` is not set. On CPU oneDNN is fastest
# at small batches (the activations stay in cache); a GPU wants larger ones.
CPU_BATCH_CANDIDATES = (8, 16, 32)
GPU_BATCH_CANDIDATES = (16, 32, 64, 128)


def batch_candidates(batch_size: int | None, on_gpu: bool) -> tuple[int, ...]:
    """The forward batch sizes to try: the fixed one, or the probe's candidates."""
    if batch_size is not None:
        return (batch_size,)
    return GPU_BATCH_CANDIDATES if on_gpu else CPU_BATCH_CANDIDATES


def resolve_runtime(device: str, dtype: str):
    """Chooses the torch device and dtype.

    Args:
        device: auto (CUDA when visible, else CPU), cpu or cuda.
        dtype: auto (fp16 on CUDA, bf16 on a CPU with native bf16, else fp32), fp32, bf16 or fp16.

    Raises:
        RuntimeError: CUDA was asked for but this process sees no GPU.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda, but torch sees no CUDA device in this process "
                           "(was the actor given a GPU? set gpus_per_actor)")
    if dtype == "auto":
        if device == "cuda":
            dtype = "fp16"
        else:
            dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    return torch.device(device), getattr(torch, _DTYPES[dtype])


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively here (AVX512-BF16 or AMX); else bf16 is emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def actor_cpus() -> float | None:
    """CPUs Ray assigned to this process, or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return None


class BatchSizer:
    """Chooses the forward batch size by timing real batches at each candidate size.

    The batches Ray Data hands the actor hold `max(candidates)` images. While probing, each
    batch runs in chunks of one candidate size, the candidates taking turns, `rounds`
    batches each; the first batch of each size is not counted (oneDNN and cuDNN build their
    kernels per input shape on first use). Each size is scored by its best time per image
    (other processes on the node only ever slow a batch down), and the fastest wins for the
    rest of the run.
    """

    def __init__(self, candidates: tuple[int, ...], rounds: int = 3):
        self.candidates = tuple(candidates)
        self.rounds = rounds
        self.seconds_per_image: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.chosen: int | None = self.candidates[0] if len(self.candidates) == 1 else None
        self._turn = 0
        self._warm: set[int] = set()  # sizes whose first (uncounted) batch has run

    def next_size(self) -> int:
        """The chunk size for the next batch."""
        if self.chosen is not None:
            return self.chosen
        return self.candidates[self._turn % len(self.candidates)]

    def record(self, size: int, images: int, seconds: float) -> None:
        """Counts one batch of `images` images run in chunks of `size` in `seconds`."""
        if self.chosen is not None or images == 0:
            return
        if size in self._warm:
            self.seconds_per_image[size].append(seconds / images)
        self._warm.add(size)
        self._turn += 1
        if all(len(v) >= self.rounds - 1 for v in self.seconds_per_image.values()):
            best = {c: min(v) for c, v in self.seconds_per_image.items()}
            self.chosen = min(best, key=best.get)
            log.info("forward batch size %d chosen; images/s by size: %s", self.chosen,
                     ", ".join(f"{c}: {1 / t:.1f}" for c, t in best.items()))


def chunks(n: int, size: int):
    """(start, stop) slices of `size` covering `n` images; the last may be short."""
    return [(start, min(n, start + size)) for start in range(0, n, size)]


class Predictor:
    """Callable class for `Dataset.map_batches` with an actor pool."""

    def __init__(self, model: ModelInfo, device: str, dtype: str, top_k: int, batch_size: int | None = None):
        began = time.monotonic()
        import torch
        import transformers
        from transformers import AutoModelForImageClassification

        cpus = actor_cpus()
        if cpus:
            log_from_worker()
            # Ray sets OMP_NUM_THREADS=1 in workers; give torch the CPUs this actor holds.
            torch.set_num_threads(max(1, math.ceil(cpus)))
        self.device, self.dtype = resolve_runtime(device, dtype)
        transformers.utils.logging.disable_progress_bar()
        net, info = AutoModelForImageClassification.from_pretrained(
            local_path(model), dtype=self.dtype, use_safetensors=model.weights_format == "safetensors",
            weights_only=True, local_files_only=True, trust_remote_code=False, output_loading_info=True,
            attn_implementation="sdpa",
        )
        missing = sorted(info["missing_keys"])
        if missing:
            raise RuntimeError(f"model {model.ref!r}: weights missing from the checkpoint: {missing[:10]} "
                               "(they would be random); refusing to score")
        self.net = net.to(self.device).eval()
        spec = model.preprocess
        self.scale = spec.rescale_factor
        self.mean = self.std = None
        if spec.mean is not None:
            self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        self.post = Postprocessor(model.labels, top_k, model.multi_label)
        self.sizer = BatchSizer(batch_candidates(batch_size, self.device.type == "cuda"))
        log.info("predictor ready in %.1fs: %s on %s as %s, %d torch threads, batch size %s",
                 time.monotonic() - began, model.tag, self.device, self.dtype, torch.get_num_threads(),
                 self.sizer.chosen or f"measured among {self.sizer.candidates}")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        errors = list(batch["error"])
        valid = np.array([not e for e in errors], dtype=bool)
        k = self.post.k
        idx, probs = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if valid.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][valid]))
            size, parts = self.sizer.next_size(), []
            began = time.perf_counter()
            with torch.inference_mode():
                for start, stop in chunks(len(pixels), size):
                    logits = self.net(pixel_values=self.normalize(pixels[start:stop])).logits
                    parts.append(self.post(logits))  # top-k to host numpy: a GPU syncs here
            self.sizer.record(size, len(pixels), time.perf_counter() - began)
            idx = np.concatenate([p[0] for p in parts])
            probs = np.concatenate([p[1] for p in parts])
        return self.post.table(batch["id"], errors, idx, probs, batch["meta"])

    def normalize(self, pixels):
        """uint8 [N, 3, H, W] on the host → normalised model-dtype tensor on the device."""
        import torch

        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        x = pixels.to(self.device, torch.float32)
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.to(self.dtype)
