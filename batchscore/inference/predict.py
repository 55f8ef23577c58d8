"""Predict: the inference actor. `__init__` loads the model once; `__call__` scores a batch.

Input batches hold uint8 pixels [N, 3, H, W]; they are moved to the device (pinned and
non-blocking on CUDA), rescaled and normalised there in float32 as the checkpoint says, cast
to the model dtype and run under `torch.inference_mode`. Rows that already carry an error
skip the model. The device and dtype are chosen at run time by `resolve_runtime`, so the
CUDA path is the same code as the CPU path.

Each layout loads its own way (`Predictor._load`): transformers' `AutoModel*` classes with
safetensors and no remote code, or timm (`batchscore.checkpoints.timm_models.build`). One forward pass gives
what the run's `TaskSpec` asks for: logits (→ top-k), an embedding (pooler output, final [CLS]
token or mean of the patch tokens, optionally L2-normalised), or both. For a transformers
classifier the embedding is read from its base model's output by a forward hook, so the
logits are exactly those of the classifier's own forward.

The forward batch size is measured, not guessed, unless the config fixes it: `BatchSizer`
runs the first batches in chunks of each candidate size, times them and keeps the fastest
per image (on this 2-core CPU that is 8 for ViT-B/16 but 32 for ViT-Ti/16,
docs/benchmarks.md). The probe scores real images, so it costs no extra start-up time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from batchscore.checkpoints import timm_models
from batchscore.checkpoints.checkpoint import ModelInfo, TaskSpec
from batchscore.checkpoints.models import local_path
from batchscore.config import default
from batchscore.decoding.device_decode import DeviceDecoder
from batchscore.driver.progress import log_from_worker
from batchscore.errors import code_of, error
from batchscore.inference import feed, sizing
from batchscore.inference.postprocess import Postprocessor, Thresholds

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Forward batch sizes the probe tries when `batch_size` is not set. On CPU oneDNN is fastest
# at small batches (the activations stay in cache); a GPU wants larger ones.
CPU_BATCH_CANDIDATES = (8, 16, 32)
GPU_BATCH_CANDIDATES = feed.GPU_BATCH_CANDIDATES  # up to 1,024 on a large GPU: feed.gpu_batch_candidates


def embedding_column(vectors: np.ndarray, valid: np.ndarray, dim: int, dtype: str) -> pa.FixedSizeListArray:
    """[valid rows, dim] vectors → a fixed_size_list<dtype>[dim] column over all rows, null where not valid."""
    full = np.zeros((len(valid), dim), np.float32)
    full[valid] = vectors
    values = pa.array(full.reshape(-1).astype(np.float16 if dtype == "float16" else np.float32))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def batch_candidates(batch_size: int | None, on_gpu: bool, gpu_memory_gib: float | None = None) -> tuple[int, ...]:
    """The forward batch sizes to try: the fixed one, or the probe's candidates (on a GPU, by
    its memory: up to 1,024 from 40 GiB, see `feed.gpu_batch_candidates`)."""
    if batch_size is not None:
        return (batch_size,)
    return feed.gpu_batch_candidates(gpu_memory_gib) if on_gpu else CPU_BATCH_CANDIDATES


def resolve_runtime(device: str, dtype: str):
    """Chooses the torch device and dtype.

    Args:
        device: auto (CUDA when visible, else CPU), cpu or cuda.
        dtype: auto (fp16 on CUDA, bf16 on a CPU with native bf16, else fp32), fp32, bf16 or fp16.

    Raises:
        RuntimeError: CUDA was asked for but this process sees no GPU.
    """
    import torch  # lazy: torch in the actors only; the driver imports this module without it

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
    import torch  # lazy: torch in the actors only; the driver imports this module without it

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def actor_cpus() -> float | None:
    """CPUs Ray assigned to this process, or None outside a Ray worker."""
    try:
        import ray  # lazy: predict also runs outside Ray (in-process scoring, tests)

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


@dataclass(frozen=True)
class PredictSpec:
    """What the inference actor does with its model (`batchscore.plan` resolves it once).

    Attributes:
        device: auto (CUDA when this process sees one), cpu or cuda.
        dtype: auto (fp16 on CUDA, bf16 on a CPU with native bf16, else fp32), fp32, bf16 or fp16.
        top_k: Labels per row, most probable first; 0 keeps every class.
        batch_size: Images per forward pass; None = measured (`BatchSizer`).
        thresholds: A sigmoid head's per-label thresholds; None for a softmax head.
        feeding: How batches reach the model (`feed.FeedOptions`).
        task: What a row holds (`TaskSpec`: classify, embed or both).
    """

    device: str = default("device")
    dtype: str = default("dtype")
    top_k: int = default("top_k")
    batch_size: int | None = default("batch_size")
    thresholds: Thresholds | None = None
    feeding: feed.FeedOptions = field(default_factory=feed.FeedOptions)
    task: TaskSpec = field(default_factory=lambda: TaskSpec("classify"))


class Predictor:
    """Callable class for `Dataset.map_batches` with an actor pool: `Predictor(model, spec)`."""

    def __init__(self, model: ModelInfo, spec: PredictSpec):
        began = time.monotonic()
        import torch  # lazy: torch in the actors only; the driver imports this module without it

        cpus = actor_cpus()
        if cpus:
            log_from_worker()
            # Ray sets OMP_NUM_THREADS=1 in workers; give torch the CPUs this actor holds.
            torch.set_num_threads(max(1, math.ceil(cpus)))
        self.device, self.dtype = resolve_runtime(spec.device, spec.dtype)
        self.task = spec.task
        self.layout, self.has_head = model.layout, model.has_head
        self._base_out: list = []  # a transformers classifier's base-model output, caught by a hook
        net, self.pooler = self._load(model)
        self.net = net.to(self.device, self.dtype).eval()
        if self.pooler is not None:
            self.pooler = self.pooler.to(self.device, self.dtype).eval()
        # Chunked forward with overlapped copies, JPEGs decoded here when asked (batchscore.inference.feed).
        self.feeding = feeding = spec.feeding
        self.net = feed.maybe_compile(self.net, feeding.compile)
        self.feeder = feed.Feeder(self.device, compiled=feeding.compile)
        self.decoder = None
        if feeding.decode_on_device:
            self.decoder = DeviceDecoder(model.preprocess, self.device, feeding.max_image_pixels, feeding.formats)
        self.clock = sizing.BusyClock(feeding.sizing_seconds)
        preprocess = model.preprocess
        self.scale = preprocess.rescale_factor
        self.mean = self.std = None
        if preprocess.mean is not None:
            self.mean = torch.tensor(preprocess.mean, device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(preprocess.std, device=self.device).view(1, 3, 1, 1)
        self.post = (Postprocessor(model.labels, spec.top_k, model.multi_label, spec.thresholds)  # thresholds: sigmoid
                     if self.task.classifies else None)
        self.sizer = BatchSizer(batch_candidates(spec.batch_size, self.device.type == "cuda",
                                                 feed.device_memory_gib(self.device)))
        log.info("predictor ready in %.1fs: %s (%s) on %s as %s, task %s%s, %d torch threads, batch size %s",
                 time.monotonic() - began, model.tag, model.layout, self.device, self.dtype, self.task.task,
                 f" (pool {self.task.pool}, dim {self.task.dim})" if self.task.embeds else "",
                 torch.get_num_threads(), self.sizer.chosen or f"measured among {self.sizer.candidates}")

    def _load(self, model: ModelInfo):
        """(the network on the CPU in fp32, an extra pooler module or None), from the checkpoint's own files."""
        if model.layout in ("timm", "npz"):
            return timm_models.build(model, local_path(model))
        import transformers  # lazy: the timm and .npz layouts do without it
        from transformers import AutoModel, AutoModelForImageClassification

        transformers.utils.logging.disable_progress_bar()
        auto, extra = AutoModelForImageClassification, {}
        if not model.has_head:
            auto = AutoModel
            if not model.has_pooler:
                extra["add_pooling_layer"] = False  # no pooler weights: do not build a random one
        net, info = auto.from_pretrained(
            local_path(model), dtype=self.dtype,
            use_safetensors=model.weights_format == "safetensors", weights_only=True, local_files_only=True,
            trust_remote_code=False, output_loading_info=True, attn_implementation="sdpa", **extra,
        )
        missing = sorted(info["missing_keys"])
        if missing:
            raise RuntimeError(f"model {model.ref!r}: weights missing from the checkpoint: {missing[:10]} "
                               "(they would be random); refusing to score")
        if model.has_head and self.task.embeds:
            net.base_model.register_forward_hook(lambda module, args, out: self._base_out.append(out))
        return net, None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch  # lazy: torch in the actors only; the driver imports this module without it

        self.clock.enter()
        errors = list(batch["error"])
        pixels = batch.get("pixels")
        if self.decoder is not None:  # JPEGs decoded here, on the model's device
            pixels, errors = self.decoder(batch)
        valid = np.array([not e for e in errors], dtype=bool)
        k = self.post.k if self.post else 0
        idx, probs = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        vectors = np.zeros((0, self.task.dim), np.float32)
        if valid.any():
            pixels = pixels[torch.from_numpy(valid).to(pixels.device)] if isinstance(pixels, torch.Tensor) \
                else np.ascontiguousarray(pixels[valid])
            size = self.sizer.next_size()
            began = time.perf_counter()
            with torch.inference_mode():
                outputs = self.feeder.run(pixels, size, lambda x: self.forward(self.normalize(x)))
                logits = torch.cat([logits for logits, _ in outputs]) if self.post else None
                if self.task.embeds:
                    vectors = torch.cat([vector for _, vector in outputs]).float().cpu().numpy()
                # A NaN or inf output (an fp16 overflow, a broken checkpoint) is that row's error,
                # never a row of NaN probabilities, nor a failed run.
                finite = torch.isfinite(logits).all(dim=1).cpu().numpy() if logits is not None \
                    else np.ones(int(valid.sum()), dtype=bool)
                if self.task.embeds:
                    finite &= np.isfinite(vectors).all(axis=1)
                if not finite.all():
                    bad = np.flatnonzero(valid)[~finite]
                    for i in bad:
                        errors[i] = error("predict.nonfinite", f"the model's output holds NaN or inf ({self.dtype})")
                    valid[bad] = False
                    vectors = vectors[finite] if self.task.embeds else vectors
                    logits = logits[torch.from_numpy(finite).to(logits.device)] if logits is not None else None
                if self.post:  # top-k on the device, one copy to the host
                    idx, probs = self.post(logits)
            self.sizer.record(size, len(finite), time.perf_counter() - began)
        decoded = batch.get("decode_seconds")
        if self.clock.leave(len(errors), float(np.sum(decoded)) if decoded is not None else 0.0):
            log.info("%s", sizing.assess(**self.clock.figures(), decode_cpus=self.feeding.decode_cpus,
                                         on_gpu=self.device.type == "cuda",
                                         decode_device=self.feeding.decode_device).line)
        if self.post:
            table = self.post.table(batch["id"], errors, idx, probs, batch["meta"])
        else:
            errs = [str(e) if e else None for e in errors]
            table = pa.table({"id": pa.array([str(i) for i in batch["id"]], pa.string()),
                              "error": pa.array(errs, pa.string()),
                              "error_code": pa.array([code_of(e) for e in errs], pa.string()),
                              "meta": pa.array([str(m) for m in batch["meta"]], pa.string())})
        if self.task.embeds:
            table = table.append_column("embedding", embedding_column(vectors, valid, self.task.dim, self.task.dtype))
        return table

    def forward(self, x):
        """(logits or None, embedding [N, D] float32 or None) of one normalised batch: one forward pass."""
        import torch  # lazy: torch in the actors only; the driver imports this module without it

        task, logits, tokens, pooled = self.task, None, None, None
        if self.layout == "transformers":
            self._base_out.clear()
            if self.has_head:  # a classifier: its base model's output comes from the hook
                out = self.net(pixel_values=x)
                logits = out.logits if self.post else None
                base = self._base_out[-1] if self._base_out else None
            else:
                base = self.net(pixel_values=x)
            if task.embeds:
                tokens, pooled = base.last_hidden_state, getattr(base, "pooler_output", None)
        else:
            tokens = self.net.forward_features(x)
            if self.post:
                logits = self.net.forward_head(tokens)
            if task.pool == "pooler":
                pooled = (self.pooler(tokens[:, 0]).tanh() if self.pooler is not None
                          else self.net.forward_head(tokens, pre_logits=True))
        if not task.embeds:
            return logits, None
        if task.pool == "pooler":
            vector = pooled
        elif tokens.dim() != 3:
            raise RuntimeError(f"embed_pool {task.pool} needs a token sequence, but the model's features have shape "
                               f"{tuple(tokens.shape)}; use embed_pool pooler")
        elif task.pool == "cls":
            vector = tokens[:, 0]
        else:  # mean of the patch tokens: the last (H/p)*(W/p) of the sequence, after any prefix tokens
            vector = tokens[:, tokens.shape[1] - self._patches(x, tokens):].mean(dim=1)
        if vector is None or vector.shape[-1] != task.dim:
            raise RuntimeError(f"the model's {task.pool} embedding has shape "
                               f"{None if vector is None else tuple(vector.shape)}, expected [N, {task.dim}]")
        vector = vector.float()
        if task.normalize:
            vector = torch.nn.functional.normalize(vector, dim=-1)
        return logits, vector

    def _patches(self, x, tokens) -> int:
        """Patch tokens in the sequence: all but the prefix ([CLS], distillation, register tokens)."""
        prefix = getattr(self.net, "num_prefix_tokens", None)  # timm
        if prefix is None:
            patch = getattr(self.net.config, "patch_size", None)
            patch = patch[0] if isinstance(patch, (list, tuple)) else patch
            return (x.shape[-2] // patch) * (x.shape[-1] // patch)
        return tokens.shape[1] - prefix

    def normalize(self, pixels):
        """uint8 [N, 3, H, W] on the host → normalised model-dtype tensor on the device."""
        import torch  # lazy: torch in the actors only; the driver imports this module without it

        if self.device.type == "cuda" and pixels.device.type == "cpu":  # else staged by the Feeder
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        x = pixels.to(self.device, torch.float32)
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.to(self.dtype)
