"""The GPU bench behind `bench/gpu.sh`: one run, one JSON, one Markdown table.

    bash bench/gpu.sh                 # on a 1-GPU host: ViT-B/16, 3,000 JPEGs, < 8 minutes
    bash bench/gpu.sh --dry-run       # here, on the CPU: a tiny ViT, 200 JPEGs, every step

Steps, each timed, each recorded even when it fails (its error goes into the JSON and the
others still run), in this order so the most wanted figures come first:

    env          GPU name and memory, torch/torchvision/transformers versions, CPUs, Ray or not
    images       N real-size JPEGs (~500x375, every 25th 3000x2000) from real photos
                 (scikit-image's when installed, else the ones shipped in bench/vendor, else
                 generated textures), made on every core
    forward      forward only, fp16 (GPU) on pre-normalised tensors at several batch sizes;
                 + torch.compile at the best size when time is left (its compile time)
    decode       images/s of the CPU decode path (Pillow, all cores), of torchvision's
                 decode_jpeg on one CPU core, and of batchscore's device decoder (nvJPEG)
    fidelity     device-decoded vs Pillow-decoded pixels (levels) and probabilities
    agreement    fp16 vs fp32 top-1 agreement and max |dp| on the same pixels
    pipeline     transformers.pipeline("image-classification") on the files, same dtype
    batchscore   end to end, decode_device cpu and cuda (dry run: torchvision), when
                 `import ray` works (Ray packed by bench/pack_ray.sh, unpacked by gpu.sh)

`nvidia-smi` is sampled every 0.5 s throughout; each step gets its mean and peak GPU
utilisation. The checkpoint is random-init ViT-B/16 (1,000 labels) with the published
preprocessing of google/vit-base-patch16-224: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "resample": 2, "size": 224, "feature_extractor_type": "ViTFeatureExtractor"}
MIN_STEADY_SPAN = 1.0  # s between the first and last part written, for a steady rate worth printing
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


# -- GPU utilisation --------------------------------------------------------------------

class Smi:
    """Samples `nvidia-smi` (utilisation %, memory MiB) every 0.5 s, tagged with the step."""

    def __init__(self):
        self.step = "start"
        self.samples: list[tuple[str, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((self.step, util, mem))

    def summary(self, step: str) -> dict | None:
        mine = [(u, m) for s, u, m in self.samples if s == step]
        if not mine:
            return None
        return {"gpu_util_mean": round(sum(u for u, _ in mine) / len(mine), 1),
                "gpu_util_max": max(u for u, _ in mine), "gpu_mem_mib_max": max(m for _, m in mine),
                "samples": len(mine)}

    def stop(self):
        if self.proc:
            self.proc.terminate()


# -- inputs -----------------------------------------------------------------------------

def source_photos() -> list:
    """Real photos: scikit-image's and scikit-learn's when installed, else JPEGs in
    bench/vendor/photos/ (pack_ray.sh copies them there), else generated textures."""
    from PIL import Image

    paths = []
    try:
        import skimage

        sk = Path(skimage.__file__).parent / "data"
        paths += [sk / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg",
                                   "hubble_deep_field.jpg")]
    except ImportError:
        pass
    try:
        import sklearn

        paths += sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    except ImportError:
        pass
    paths += sorted((HERE / "vendor" / "photos").glob("*.jpg"))
    photos = [Image.open(p).convert("RGB") for p in paths if p.exists()]
    if photos:
        return photos
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(6):  # smooth colour fields with fine noise: JPEG sizes close to photos'
        low = rng.random((12, 16, 3)) * 255
        img = Image.fromarray(low.astype("uint8")).resize((800, 600), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (600, 800, 3))
        photos.append(Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype("uint8")))
    return photos


def _make_image(args) -> None:
    i, path = args
    import numpy as np
    from PIL import Image

    photos = _PHOTOS
    img = photos[i % len(photos)]
    rng = np.random.default_rng(i)
    if i % 25 == 24:
        out = img.resize((3000, 2000), Image.Resampling.BICUBIC)
    else:
        w, h = min(500, img.width), min(375, img.height)
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        out = img.crop((x, y, x + w, y + h)).resize((500, 375))
    out.save(path, quality=90, progressive=(i % 10 == 5))  # 10% progressive, as on the web


_PHOTOS: list = []


def make_images(folder: Path, n: int) -> list[Path]:
    global _PHOTOS
    paths = [folder / f"img-{i:05d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    _PHOTOS = source_photos()
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:  # before torch runs anything
        pool.map(_make_image, list(enumerate(paths)), chunksize=8)
    return paths


def make_checkpoint(path: Path, tiny: bool) -> Path:
    if (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    labels = {i: f"class_{i}" for i in range(1000)}
    config = ViTConfig(**(TINY if tiny else {}), num_labels=1000, id2label=labels,
                       label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(config).eval().save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return path


# -- steps ------------------------------------------------------------------------------

def step_env(ctx) -> dict:
    import torch
    import torchvision
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "transformers": transformers.__version__, "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
           "machine": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1))
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError as e:
        out["ray"] = f"not importable ({e})"
    return out


def _load(ctx, dtype):
    import torch
    from transformers import AutoModelForImageClassification

    net = AutoModelForImageClassification.from_pretrained(str(ctx.checkpoint), dtype=dtype, attn_implementation="sdpa")
    return net.to(ctx.device).eval()


def _sync(ctx):
    import torch

    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def step_forward(ctx) -> dict:
    import torch

    net = _load(ctx, ctx.dtype)
    out, best = {}, (0.0, None)
    for size in ctx.batch_sizes:
        x = torch.randn(size, 3, 224, 224, device=ctx.device, dtype=ctx.dtype)
        try:
            with torch.inference_mode():
                for _ in range(2):
                    net(pixel_values=x)
                _sync(ctx)
                began, runs = time.perf_counter(), 0
                while runs < 3 or time.perf_counter() - began < ctx.forward_seconds:
                    net(pixel_values=x).logits.float().topk(5)
                    runs += 1
                _sync(ctx)
            rate = size * runs / (time.perf_counter() - began)
        except torch.cuda.OutOfMemoryError:
            out[str(size)] = "out of memory"
            break
        out[str(size)] = round(rate, 1)
        if rate > best[0]:
            best = (rate, size)
        del x
    result = {"images_per_second_by_batch": out, "best_batch": best[1], "best_images_per_second": round(best[0], 1)}
    if ctx.compile and ctx.time_left() > 200:
        from batchscore.inference import feed

        compiled = feed.maybe_compile(net, True)
        x = torch.randn(best[1], 3, 224, 224, device=ctx.device, dtype=ctx.dtype)
        with torch.inference_mode():
            began = time.perf_counter()
            compiled(pixel_values=x)
            _sync(ctx)
            result["compile_seconds"] = round(time.perf_counter() - began, 1)
            began, runs = time.perf_counter(), 0
            while runs < 3 or time.perf_counter() - began < ctx.forward_seconds:
                compiled(pixel_values=x)
                runs += 1
            _sync(ctx)
        result["compiled_images_per_second"] = round(best[1] * runs / (time.perf_counter() - began), 1)
    ctx.best_batch = best[1]
    return result


def _decode_cpu_worker(files: list[str]) -> float:
    from batchscore.decoding import decode

    spec = _SPEC
    began = time.perf_counter()
    for f in files:
        decode.decode_one(Path(f).read_bytes(), spec, 178_956_970)
    return time.perf_counter() - began


_SPEC = None


def step_decode(ctx) -> dict:
    global _SPEC
    import numpy as np
    import torch

    from batchscore.checkpoints import models
    from batchscore.decoding import device_decode

    _SPEC = spec = models.preprocess_spec(ctx.checkpoint)
    files = [str(p) for p in ctx.images[: ctx.decode_images]]
    out = {}
    # Pillow (batchscore's CPU path) in a thread per core: Pillow and torch release the GIL
    # while they decode and resize (a forked pool would hang on torch's OpenMP state).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = os.cpu_count()
    shards = [files[i::workers] for i in range(workers)]
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(_decode_cpu_worker, shards))
    out["cpu_pillow_all_cores"] = round(len(files) / (time.perf_counter() - began), 1)
    one = files[: max(1, len(files) // workers)]
    out["cpu_pillow_per_core"] = round(len(one) / _decode_cpu_worker(one), 1)
    # torchvision decode_jpeg + resize on one CPU core, and the device decoder
    data = [Path(f).read_bytes() for f in files]
    batch = {"id": np.array(files, dtype=object), "data": np.array(data, dtype=object),
             "error": np.array([""] * len(files), dtype=object), "meta": np.array(["{}"] * len(files), dtype=object)}
    checked = device_decode.check_batch(batch, spec=spec, max_image_pixels=178_956_970)
    out["cpu_header_check_per_core"] = round(len(files) / float(np.sum(checked["decode_seconds"])), 1)
    cpu = device_decode.DeviceDecoder(spec, "cpu", 178_956_970)
    began = time.perf_counter()
    cpu(checked)
    out["cpu_torchvision_one_core"] = round(len(files) / (time.perf_counter() - began), 1)
    torch.set_num_threads(threads)
    if ctx.device.type == "cuda":
        gpu = device_decode.DeviceDecoder(spec, ctx.device, 178_956_970)
        gpu(checked)  # warm-up: nvJPEG handles, kernels
        _sync(ctx)
        began = time.perf_counter()
        for start in range(0, len(files), 1024):
            part = {k: v[start:start + 1024] for k, v in checked.items()}
            gpu(part)
        _sync(ctx)
        out["gpu_nvjpeg"] = round(len(files) / (time.perf_counter() - began), 1)
        out["gpu_stats"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in gpu.stats.items()}
    return out


def step_fidelity(ctx) -> dict:
    import numpy as np
    import torch

    from batchscore.checkpoints import models
    from batchscore.decoding import decode, device_decode

    spec = models.preprocess_spec(ctx.checkpoint)
    # with up to 4 of the 3000x2000 ones (the CPU path decodes those at half scale: draft mode)
    files = list(dict.fromkeys(ctx.images[: ctx.fidelity_images] + ctx.images[24::25][:4]))
    batch = {"id": np.array([str(f) for f in files], dtype=object),
             "data": np.array([f.read_bytes() for f in files], dtype=object),
             "error": np.array([""] * len(files), dtype=object), "meta": np.array(["{}"] * len(files), dtype=object)}
    ref = decode.decode_batch(batch, spec=spec, max_image_pixels=178_956_970)["pixels"]
    checked = device_decode.check_batch(batch, spec=spec, max_image_pixels=178_956_970)
    ours, errors = device_decode.DeviceDecoder(spec, ctx.device, 178_956_970)(checked)
    ours = ours.cpu().numpy()
    diff = np.abs(ours.astype(int) - ref.astype(int))
    net = _load(ctx, torch.float32)

    def probs(pixels):
        x = (torch.from_numpy(pixels).to(ctx.device).float() / 255 - 0.5) / 0.5
        with torch.inference_mode():
            return torch.cat([net(pixel_values=x[i:i + 64]).logits.softmax(-1) for i in range(0, len(x), 64)])

    p_ref, p_ours = probs(ref), probs(ours)
    return {"images": len(files), "decoder": "nvJPEG" if ctx.device.type == "cuda" else "torchvision (libjpeg-turbo)",
            "errors": sum(bool(e) for e in errors), "pixel_max_levels": int(diff.max()),
            "pixel_mean_levels": round(float(diff.mean()), 4),
            "max_abs_dp_fp32": float(f"{(p_ref - p_ours).abs().max().item():.3e}"),
            "top1_agreement": round(float((p_ref.argmax(-1) == p_ours.argmax(-1)).float().mean()), 4)}


def step_agreement(ctx) -> dict:
    import numpy as np
    import torch

    from batchscore.checkpoints import models
    from batchscore.decoding import decode

    spec = models.preprocess_spec(ctx.checkpoint)
    files = ctx.images[: ctx.fidelity_images]
    batch = {"id": np.array([str(f) for f in files], dtype=object),
             "data": np.array([f.read_bytes() for f in files], dtype=object),
             "error": np.array([""] * len(files), dtype=object), "meta": np.array(["{}"] * len(files), dtype=object)}
    x = torch.from_numpy(decode.decode_batch(batch, spec=spec, max_image_pixels=178_956_970)["pixels"])
    x = ((x.float() / 255 - 0.5) / 0.5).to(ctx.device)
    out = {}
    for name, dtype in (("fp32", torch.float32), (ctx.dtype_name, ctx.dtype)):
        net = _load(ctx, dtype)
        with torch.inference_mode():
            out[name] = torch.cat([net(pixel_values=x[i:i + 64].to(dtype)).logits.float().softmax(-1)
                                   for i in range(0, len(x), 64)])
    a, b = out["fp32"], out[ctx.dtype_name]
    return {"images": len(files), "dtype": ctx.dtype_name,
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "max_abs_dp": float(f"{(a - b).abs().max().item():.3e}"),
            "note": "random-init ViT: near-uniform outputs, so agreement is a lower bound"}


def step_pipeline(ctx) -> dict:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    files = [str(p) for p in ctx.images[: ctx.pipeline_images]]
    pipe = transformers.pipeline("image-classification", model=str(ctx.checkpoint), dtype=ctx.dtype,
                                 device=ctx.device, batch_size=ctx.pipeline_batch)
    pipe(files[: ctx.pipeline_batch])  # warm-up
    began = time.perf_counter()
    rows = pipe(files, top_k=5)
    seconds = time.perf_counter() - began
    assert len(rows) == len(files)
    return {"images": len(files), "batch_size": ctx.pipeline_batch, "images_per_second": round(len(files) / seconds, 1)}


def _batchscore(ctx, decode_device: str) -> dict:
    out_dir = ctx.work / f"out-{decode_device}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "batchscore.cli", "score", "--input", str(ctx.images_dir), "--output", str(out_dir),
           "--model", str(ctx.checkpoint), "--decode-device", decode_device, "--json", "--progress-seconds", "5",
           "--decode-cpus", str(ctx.decode_cpus), "--max-error-fraction", "0.5",
           # several part files, or the manifest's steady rate (first to last part) is not measured
           "--rows-per-file", str(ctx.rows_per_file)]
    if ctx.device.type == "cpu":
        cmd += ["--device", "cpu", "--cpus-per-actor", "1"]
    env = {**os.environ, "BATCHSCORE_SIZING_SECONDS": "2", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(60, ctx.time_left() - 20))
    seconds = time.perf_counter() - began
    (ctx.work / f"batchscore-{decode_device}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"batchscore exited {proc.returncode}: {proc.stderr[-1500:]}")
    manifest = json.loads((out_dir / "_manifest.json").read_text())
    busy = [line.split("INFO", 1)[-1].strip(" :") for line in proc.stderr.splitlines() if " busy " in line]
    chosen = [line for line in proc.stderr.splitlines() if "forward batch size" in line]
    steady = manifest["timings"].get("steady_images_per_second") or None  # 0.0: fewer than 3 parts, not measured
    # When the part files were written (manifest `scores.timeline`, seconds after the first):
    # parts written within a second of each other (one model batch) make the steady rate noise.
    span = max((t for t, _ in (manifest.get("scores") or {}).get("timeline") or []), default=0.0)
    if span < MIN_STEADY_SPAN:
        steady = None
    return {"rows": manifest["counts"]["rows"], "errors": manifest["counts"]["errors"],
            "parts": len(manifest["files"]), "rows_per_file": ctx.rows_per_file, "parts_span_seconds": span,
            "images_per_second": manifest["timings"]["images_per_second"],
            "steady_images_per_second": steady,
            "wall_seconds": round(seconds, 1), "sizing_lines": busy[-2:], "batch_size_line": chosen[-1:]}


def step_batchscore(ctx) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return {"skipped": f"import ray failed ({e}): pack it with bench/pack_ray.sh and ship bench/vendor/"}
    out = {}
    variants = {"cpu": "cpu", "gpu": "cuda" if ctx.device.type == "cuda" else "torchvision"}
    for decode_device in [variants[v] for v in ("cpu", "gpu") if v in ctx.end_to_end]:
        if ctx.time_left() < 45:
            out[decode_device] = {"skipped": "out of time"}
            continue
        try:
            out[decode_device] = _batchscore(ctx, decode_device)
        except Exception as e:  # noqa: BLE001 - recorded, the next variant still runs
            out[decode_device] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    return out


STEPS = {"env": step_env, "forward": step_forward, "decode": step_decode, "fidelity": step_fidelity,
         "agreement": step_agreement, "pipeline": step_pipeline, "batchscore": step_batchscore}


# -- report -----------------------------------------------------------------------------

def markdown(results: dict) -> str:
    env = results["steps"].get("env", {}).get("result", {})
    where = env.get("gpu") or f"CPU only ({env.get('machine', '?')}, {env.get('cpus', '?')} cores)"
    lines = [f"### bench/gpu.sh{' --dry-run' if results['dry_run'] else ''}: {where}", "",
             f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, transformers {env.get('transformers')}, "
             f"Ray {env.get('ray')}; model {results['model']}, {results['images']} JPEGs; "
             f"{results['total_seconds']:.0f} s in all", "",
             "| step | figure | value | GPU util mean / max |", "|---|---|---|---|"]

    def row(step, figure, value):
        smi = results["steps"].get(step, {}).get("gpu")
        util = f"{smi['gpu_util_mean']}% / {smi['gpu_util_max']:.0f}%" if smi else "-"
        lines.append(f"| {step} | {figure} | {value} | {util} |")

    for step, entry in results["steps"].items():
        if step == "env":
            continue
        r = entry.get("result")
        if r is None:
            row(step, "error", f"`{entry.get('error', '?')[:150]}`")
            continue
        if step == "forward":
            for size, rate in r["images_per_second_by_batch"].items():
                row(step, f"{results['dtype']} batch {size}, images/s", rate)
            if "compile_seconds" in r:
                row(step, f"torch.compile batch {r['best_batch']}: compile s / images/s",
                    f"{r['compile_seconds']} / {r['compiled_images_per_second']}")
        elif step == "batchscore" and "skipped" not in r:
            for variant, v in r.items():
                if "images_per_second" in v:
                    steady = v.get("steady_images_per_second")
                    row(step, f"decode_device={variant}: images/s (steady)",
                        f"{v['images_per_second']} ({steady if steady else 'steady not measured'}; "
                        f"{v.get('parts', '?')} part files over {v.get('parts_span_seconds', '?')} s)")
                    for line in v.get("sizing_lines", [])[-1:]:
                        row(step, f"decode_device={variant}: sizing line", f"`{line[:160]}`")
                elif "error" in v:
                    row(step, f"decode_device={variant}: FAILED", f"`{v['error'][-150:]}`")
                else:
                    row(step, f"decode_device={variant}", f"`{str(v)[:150]}`")
        else:
            for k, v in r.items():
                if not isinstance(v, (dict, list)):
                    row(step, k, v)
        row(step, "seconds", round(entry["seconds"], 1))
    return "\n".join(lines) + "\n"


def failed_steps(results: dict) -> list[str]:
    """Steps that failed: their own `error`, or one nested in their `result` (a batchscore
    variant's `{"cpu": {"error": "TimeoutExpired: ..."}}`), named `step` or `step.variant`."""
    failed = []

    def nested(value, where: str) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("error"), str):
                failed.append(where)
                return
            for k, v in value.items():
                nested(v, f"{where}.{k}")

    for name, entry in results["steps"].items():
        if "error" in entry:
            failed.append(name)
        else:
            nested(entry.get("result"), name)
    return failed


class Context:
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny ViT, few images: that every step runs")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-bench",
                    help="where images, checkpoint, runs and results go (default runs/gpu-bench: ignored by git)")
    ap.add_argument("--images", type=int, default=None, help="JPEGs to generate (3,000; dry run 200)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole bench (450; dry run 240)")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--end-to-end", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"],
                    help="batchscore end to end with CPU decode, with decode on the model's device (cuda; "
                         "torchvision on a CPU dry run), or both (default)")
    args = ap.parse_args()
    import torch

    ctx = Context()
    began = time.monotonic()
    dry = args.dry_run
    ctx.time_left = lambda: (args.budget or (240 if dry else 450)) - (time.monotonic() - began)
    ctx.work = args.out
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    if ctx.device.type == "cpu":
        from batchscore.inference import predict

        ctx.dtype_name = "bf16" if predict.cpu_has_native_bf16() else "fp32"
    else:
        ctx.dtype_name = "fp16"
    ctx.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[ctx.dtype_name]
    n = args.images or (200 if dry else 3000)
    ctx.batch_sizes = [4, 8] if dry else [64, 128, 256, 512, 1024]
    ctx.forward_seconds = 1.0 if dry else 4.0
    ctx.decode_images = min(n, 100 if dry else 2000)
    ctx.fidelity_images = min(n, 24 if dry else 512)
    ctx.pipeline_images = min(n, 40 if dry else 2000)
    ctx.pipeline_batch = 8 if dry else 64
    ctx.decode_cpus = 0.5
    ctx.rows_per_file = max(1, n // 8)  # >= 5 part files end to end, so the steady rate is measured
    ctx.compile = not dry and not args.no_compile
    ctx.end_to_end = set(args.end_to_end)
    smi = Smi()
    smi.step = "setup"
    ctx.images_dir = ctx.work / f"images-{n}"
    ctx.images = make_images(ctx.images_dir, n)
    ctx.checkpoint = make_checkpoint(ctx.work / ("vit-tiny" if dry else "vit-b16"), tiny=dry)
    results = {"dry_run": dry, "model": "tiny ViT" if dry else "ViT-B/16 (random init, 1000 labels)", "images": n,
               "dtype": ctx.dtype_name, "setup_seconds": round(time.monotonic() - began, 1), "steps": {}}
    print(f"gpu bench: {n} images and checkpoint ready in {results['setup_seconds']}s on {ctx.device}", flush=True)
    for name in args.steps:
        if ctx.time_left() < 15 and name != "env":
            results["steps"][name] = {"error": "skipped: out of time", "seconds": 0.0}
            continue
        smi.step = name
        t0 = time.monotonic()
        entry = {}
        try:
            entry["result"] = STEPS[name](ctx)
        except Exception as e:  # noqa: BLE001 - one step's failure is a figure too
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        except KeyboardInterrupt:  # gpu.sh's timeout: keep what was measured
            entry["error"] = "interrupted: out of time (gpu.sh's limit)"
            entry["traceback"] = traceback.format_exc()[-3000:]
            entry["seconds"], entry["gpu"] = time.monotonic() - t0, smi.summary(name)
            results["steps"][name] = entry
            break
        entry["seconds"] = time.monotonic() - t0
        entry["gpu"] = smi.summary(name)
        results["steps"][name] = entry
        print(f"gpu bench: {name} done in {entry['seconds']:.1f}s: "
              f"{json.dumps(entry.get('result', entry.get('error')))[:400]}", flush=True)
    smi.stop()
    results["total_seconds"] = round(time.monotonic() - began, 1)
    (ctx.work / "gpu-bench.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (ctx.work / "gpu-bench.md").write_text(table)
    print(table)
    failed = failed_steps(results)
    print(f"gpu bench: {ctx.work / 'gpu-bench.json'}, {ctx.work / 'gpu-bench.md'}; failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
