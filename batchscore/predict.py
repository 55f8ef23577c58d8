"""Predict: the inference actor. `__init__` loads the model once; `__call__` scores a batch.

Input batches hold uint8 pixels [N, 3, H, W]; they are moved to the device (pinned and
non-blocking on CUDA), rescaled and normalised there in float32 as the checkpoint says, cast
to the model dtype and run under `torch.inference_mode`. Rows that already carry an error
skip the model. The device and dtype are chosen at run time by `resolve_runtime`, so the
CUDA path is the same code as the CPU path.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from batchscore.models import ModelInfo, local_path
from batchscore.postprocess import Postprocessor

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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


class Predictor:
    """Callable class for `Dataset.map_batches` with an actor pool."""

    def __init__(self, model: ModelInfo, device: str, dtype: str, top_k: int):
        import torch
        import transformers
        from transformers import AutoModelForImageClassification

        cpus = actor_cpus()
        if cpus:
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
        log.info("predictor ready: %s on %s as %s, %d torch threads", model.tag, self.device,
                 self.dtype, torch.get_num_threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        errors = list(batch["error"])
        valid = np.array([not e for e in errors], dtype=bool)
        k = self.post.k
        idx, probs = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if valid.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][valid]))
            with torch.inference_mode():
                logits = self.net(pixel_values=self.normalize(pixels)).logits
            idx, probs = self.post(logits)
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
