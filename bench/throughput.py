"""Throughput, side by side: forward only, a plain loop, transformers' pipeline, batchscore.

    .venv/bin/python bench/throughput.py                        # ViT-B/16 and ViT-Ti/16, 300 and 3,000 images
    .venv/bin/python bench/throughput.py --models vit-ti16 --counts 300 --batch-sizes 8 16
    .venv/bin/python bench/throughput.py --tiny --counts 20     # seconds: what the test suite runs

Every variant runs in its own process, one after another, on the same images and checkpoint:

    forward      the model alone on pre-decoded, pre-normalised tensors, at each batch size
                 (the best one is the reference)
    loop         one Python process: Pillow decode -> the checkpoint's image processor ->
                 batch -> forward -> top-k -> Parquet, as a user would write it
    pipeline     transformers.pipeline("image-classification", batch_size=...) over the files,
                 same dtype, written to Parquet
    batchscore   `batchscore score` end to end (local Ray started by the run, default settings)

For each: images/s in steady state (forward: measured per batch size; loop and pipeline: from
after the model is loaded; batchscore: the rows after the first over the time after the first
row), the ratios of those to forward, loop and pipeline, the time from process start to the
first output row, images/s end to end (process start to exit), and the peak PSS of the whole
process tree (sampled every 1 s at nice 19 from /proc/<pid>/smaps_rollup, the sampler's own
CPU share printed; Ray's processes are children of the batchscore driver). Checkpoints
are random-init from the real configs (google/vit-base-patch16-224, and ViT-Ti/16 as in
timm's vit_tiny_patch16_224) with 1,000 labels; images are real photos from scikit-image and
scikit-learn: 90% JPEGs of ~500x375 and 10% of 3000x2000. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {
    # name: ViTConfig overrides (ViT-B/16 = ViTConfig defaults)
    "vit-b16": {},
    "vit-ti16": {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    # one layer of width 32: decode and the framework are the cost, as with a real model on a GPU (bench/peers.py)
    "near-free": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
}
PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "resample": 2, "size": 224, "feature_extractor_type": "ViTFeatureExtractor"}
VARIANTS = ("forward", "loop", "pipeline", "batchscore")
SAMPLE_SECONDS = 1.0  # PSS sampling period


# -- inputs -----------------------------------------------------------------------------

def make_checkpoint(kind: str, path: Path) -> Path:
    if (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    labels = {i: f"class_{i}" for i in range(1000)}
    config = ViTConfig(**MODELS[kind], num_labels=1000, id2label=labels, label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(config).eval().save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return path


def make_images(folder: Path, n: int) -> Path:
    """n real-photo JPEGs: 90% ~500x375 crops, every tenth one 3000x2000 (upscaled)."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import real_photo_paths

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = [Image.open(p).convert("RGB") for p in real_photo_paths()]
    for i in range(n):
        img = photos[i % len(photos)]
        if i % 10 == 9:
            out = img.resize((3000, 2000), Image.Resampling.BICUBIC)
        else:
            w, h = min(500, img.width), min(375, img.height)
            x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
            out = img.crop((x, y, x + w, y + h)).resize((500, 375))
        out.save(folder / f"img-{i:05d}.jpg", quality=90)
    return folder


# -- measuring a process tree -----------------------------------------------------------

def descendants(root: int) -> list[int]:
    """`root` and every process below it (from /proc/<pid>/stat's parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids = [root]
    for pid in pids:
        pids.extend(children.get(pid, []))
    return pids


def pss_bytes(pid: int) -> int:
    """PSS of one process (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss(root: int) -> int:
    """PSS bytes of `root` and all its descendants."""
    return sum(pss_bytes(pid) for pid in descendants(root))


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Runs `cmd`; returns its JSON result plus wall seconds, peak tree PSS and first-row time.

    The child prints `FIRST_ROW` on stderr (batchscore: its `first rows` log line) when its
    first output row exists; the time from launch to that line is the first-row time.
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, first_row, stderr_tail, chosen = 0, None, [], []

    sampler_cpu = 0.0

    def sample() -> None:
        # Reading smaps_rollup walks page tables: about 50 ms of CPU for batchscore's ~15
        # processes. At 10 Hz that took a third of a core from the variant being measured, so
        # the sampler runs at nice 19, every SAMPLE_SECONDS, and reports what it cost.
        nonlocal peak, sampler_cpu
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while proc.poll() is None:
            peak = max(peak, tree_pss(proc.pid))
            sampler_cpu = time.thread_time()
            time.sleep(SAMPLE_SECONDS)

    def watch() -> None:
        nonlocal first_row
        for line in proc.stderr:
            if first_row is None and ("FIRST_ROW" in line or "first rows after" in line):
                first_row = time.monotonic() - start
            if "forward batch size" in line and "chosen" in line:  # batchscore's actor, its probe
                chosen.append(line.split("forward batch size", 1)[1].split()[0])
            stderr_tail.append(line)
            del stderr_tail[:-40]

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    out = proc.stdout.read()
    proc.wait()
    for t in threads:
        t.join(timeout=5)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{''.join(stderr_tail)}")
    text = out.strip()
    try:
        result = json.loads(text) if text else {}
    except ValueError:  # a variant's last line is its JSON
        result = json.loads(text.splitlines()[-1])
    return {**result, "wall_seconds": seconds, "peak_pss": peak, "first_row_seconds": first_row,
            "sampler_cpu_share": sampler_cpu / seconds, "chosen_batch_sizes": chosen}


# -- the variants (each runs in its own process: `throughput.py _variant ...`) -----------

def _threads() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def _dtype(name: str):
    import torch

    from batchscore.inference.predict import resolve_runtime

    return resolve_runtime("cpu", name)[1] if name == "auto" else getattr(torch, name)


def variant_forward(model: str, files: list[str], batch_sizes: list[int], dtype: str, seconds: float) -> dict:
    """The model alone: decoded, normalised tensors in memory, each batch size in turn."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageClassification

    from batchscore.checkpoints import models
    from batchscore.decoding.decode import decode_one

    _threads()
    info = models.resolve(model)
    dt = _dtype(dtype)
    net = AutoModelForImageClassification.from_pretrained(model, dtype=dt, attn_implementation="sdpa").eval()
    base = torch.from_numpy(np.stack([decode_one(Path(f).read_bytes(), info.preprocess, 10**9) for f in files[:32]]))
    x = ((base.float() / 255 - 0.5) / 0.5).to(dt)
    per_bs = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            batch = x[torch.arange(bs) % len(x)]
            net(pixel_values=batch)  # warm-up
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or n < 2 * bs:
                net(pixel_values=batch)
                n += bs
            per_bs[bs] = n / (time.perf_counter() - start)
    best = max(per_bs, key=per_bs.get)
    print("FIRST_ROW", file=sys.stderr, flush=True)
    return {"images_per_second": per_bs[best], "best_batch_size": best, "per_batch_size": per_bs}


def variant_loop(model: str, files: list[str], batch_size: int, dtype: str, out: str) -> dict:
    """What a user writes: Pillow -> the checkpoint's processor -> model -> top-5 -> Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    _threads()
    dt = _dtype(dtype)
    processor = AutoImageProcessor.from_pretrained(model)
    net = AutoModelForImageClassification.from_pretrained(model, dtype=dt, attn_implementation="sdpa").eval()
    labels = net.config.id2label
    writer, start, first = None, time.perf_counter(), True
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            images = [Image.open(f).convert("RGB") for f in chunk]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(dt)
            probs, idx = torch.softmax(net(pixel_values=pixels).logits.float(), -1).topk(5)
            table = pa.table({"id": chunk, "labels": [[labels[int(j)] for j in row] for row in idx],
                              "probs": probs.numpy().tolist()})
            writer = writer or pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
            if first:
                print("FIRST_ROW", file=sys.stderr, flush=True)
                first = False
    writer.close()
    return {"images_per_second": len(files) / (time.perf_counter() - start)}


def variant_pipeline(model: str, files: list[str], batch_size: int, dtype: str, out: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import pipeline

    _threads()
    clf = pipeline("image-classification", model=model, dtype=_dtype(dtype), device="cpu")
    rows, start, first = [], time.perf_counter(), True
    with torch.inference_mode():  # a generator, so results stream (a list is answered all at once)
        for f, preds in zip(files, clf((f for f in files), batch_size=batch_size, top_k=5)):
            rows.append({"id": f, "labels": [p["label"] for p in preds], "probs": [p["score"] for p in preds]})
            if first:
                print("FIRST_ROW", file=sys.stderr, flush=True)
                first = False
    pq.write_table(pa.Table.from_pylist(rows), out)
    return {"images_per_second": len(files) / (time.perf_counter() - start)}


def run_variant(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=VARIANTS[:3])
    p.add_argument("--model")
    p.add_argument("--files")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--dtype")
    p.add_argument("--out")
    a = p.parse_args(argv)
    files = Path(a.files).read_text().split()
    if a.name == "forward":
        result = variant_forward(a.model, files, a.batch_sizes, a.dtype, a.seconds)
    elif a.name == "loop":
        result = variant_loop(a.model, files, a.batch_sizes[0], a.dtype, a.out)
    else:
        result = variant_pipeline(a.model, files, a.batch_sizes[0], a.dtype, a.out)
    print(json.dumps(result))


# -- the bench ----------------------------------------------------------------------------

def parts_rows(count: int, rows_per_file: int | None) -> int:
    """Rows per part file of the batchscore variant: the flag, else a tenth of the images (at
    least 32), so its steady rate spans nine parts instead of the last of one or two (with
    the 2,000-row default a 3,000-image run has two parts: its "steady" rate was the last
    1,000 images only)."""
    return rows_per_file or max(32, count // 10)


def bench(kind: str, count: int, work: Path, batch_sizes: list[int], dtype: str, variants: list[str],
          forward_seconds: float | None = None, rows_per_file: int | None = None) -> dict:
    model = make_checkpoint(kind, work / f"ckpt-{kind}")
    images = make_images(work / f"images-{count}", count)
    files = sorted(str(p) for p in images.glob("*.jpg"))
    listing = work / f"files-{count}.txt"
    listing.write_text("\n".join(files))
    results: dict[str, dict] = {}
    me = [sys.executable, str(Path(__file__).resolve()), "_variant"]
    best_bs = batch_sizes[0]
    for name in variants:
        out = work / f"out-{kind}-{count}-{name}"
        if name == "forward":
            # Each batch size runs this long: 3 s (the first version, at 300 images) left
            # forward-only 5-10% apart between runs, below the loop once.
            seconds = forward_seconds or max(10.0, 0.02 * count / len(batch_sizes))
            cmd = me + ["forward", "--model", str(model), "--files", str(listing), "--batch-sizes", *map(str, batch_sizes),
                        "--dtype", dtype, "--seconds", str(seconds)]
        elif name in ("loop", "pipeline"):
            cmd = me + [name, "--model", str(model), "--files", str(listing), "--batch-sizes", str(best_bs),
                        "--dtype", dtype, "--out", str(out) + ".parquet"]
        else:
            cmd = [sys.executable, "-m", "batchscore.cli", "score", "--input", str(images), "--output", str(out),
                   "--model", str(model), "--overwrite", "--json", "--dtype", dtype,
                   "--rows-per-file", str(parts_rows(count, rows_per_file))]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        r = run_measured(cmd, env)
        if name == "forward":
            best_bs = r["best_batch_size"]
        if name == "batchscore":
            manifest = json.loads((out / "_manifest.json").read_text())
            assert manifest["counts"]["rows"] == count, manifest["counts"]
            # Steady rate: rows after the first batch over the time from the first to the last
            # batch reaching the driver (start-up and shutdown excluded).
            # With a single batch there is no span: fall back to the rate over the scoring time.
            timings = manifest["timings"]
            r["images_per_second"] = timings.get("steady_images_per_second") or timings["images_per_second"]
            r["batch_size"] = manifest["config"]["batch_size"] or "/".join(r["chosen_batch_sizes"]) or "probing"
        r["end_to_end_images_per_second"] = count / r["wall_seconds"]
        results[name] = r
        print(f"  {kind:8s} {count:5d} {name:10s} {r['images_per_second']:7.1f} img/s  first row "
              f"{r['first_row_seconds'] or float('nan'):5.1f}s  peak PSS {r['peak_pss'] / 2**20:7.0f} MiB  "
              f"wall {r['wall_seconds']:6.1f}s  sampler {100 * r['sampler_cpu_share']:.1f}% of a core", flush=True)
    return results


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": cpu, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            **{pkg: md.version(pkg) for pkg in ("torch", "transformers", "ray", "pillow", "pyarrow")}}


def report(all_results: dict, variants: list[str]) -> str:
    lines = ["| model | images | variant | images/s | × forward | × loop | × pipeline | first row (s) | "
             "end to end images/s | peak PSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, count), res in all_results.items():
        for name in variants:
            r = res[name]
            ratio = {other: (f"{r['images_per_second'] / res[other]['images_per_second']:.2f}"
                             if other in res else "–") for other in ("forward", "loop", "pipeline")}
            extra = f" (batch {r.get('best_batch_size') or r.get('batch_size')})" if name in ("forward", "batchscore") else ""
            first = f"{r['first_row_seconds']:.1f}" if r.get("first_row_seconds") else "–"
            lines.append(f"| {kind} | {count} | {name}{extra} | {r['images_per_second']:.1f} | {ratio['forward']} | "
                         f"{ratio['loop']} | {ratio['pipeline']} | {first} | {r['end_to_end_images_per_second']:.1f} | "
                         f"{r['peak_pss'] / 2**20:.0f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_variant":
        return run_variant(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit-b16", "vit-ti16"], choices=sorted(MODELS))
    parser.add_argument("--counts", nargs="+", type=int, default=[300, 3000])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--forward-seconds", type=float,
                        help="seconds forward-only runs at each batch size (default: 10, or 0.02 s per image)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a CPU with native bf16), bfloat16 or float32")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rows-per-file", type=int,
                        help="batchscore's part size (default: a tenth of the images, at least 32: see parts_rows)")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer test model only (a smoke run)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "batchscore-bench")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    models = ["tiny"] if args.tiny else args.models
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    results = {}
    for kind in models:
        for count in args.counts:
            results[(kind, count)] = bench(kind, count, args.work, args.batch_sizes, args.dtype, args.variants,
                                           args.forward_seconds, args.rows_per_file)
    print()
    print(report(results, args.variants))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv,
                                         "results": {f"{k}/{c}": v for (k, c), v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
