"""batchscore against its peers on their own image-classification benchmark, side by side.

    .venv/bin/pip install --no-deps daft==0.7.26                   # Daft, for this bench only (*)
    .venv/bin/python bench/peers.py                                 # 3,000 and 30,000 images, both models
    .venv/bin/python bench/peers.py --counts 3000 --models near-free --variants daft batchscore

The job is the one Daft publishes (`benchmarking/ai/image_classification` in Eventual-Inc/Daft:
Daft against Ray Data and Spark on ImageNet, ResNet-18) and the Ray Data script of the same
benchmark: read a Parquet file of image URLs, download, decode to RGB, resize and normalise,
run the model in a pool with batches of 100, write one label per image to Parquet. Each variant
here is a port of the published script as written, with two changes: the model is a
random-init ViT in Hugging Face layout with ViTImageProcessor's preprocessing (resize to
224x224 bilinear, scale to [0, 1], normalise with mean = std = 0.5), on the CPU in fp32, and
the pool has one model actor (the scripts' one per GPU node, on a machine without GPUs):

    loop          one Python process, as a user would write it: Pillow -> preprocessing -> batches
                  of 100 -> forward -> argmax -> Parquet
    ray_data      the Ray Data script: read_images(paths) -> map(transform) -> map_batches(actor,
                  batch_size=100) -> write_parquet, on `ray.init()` as published
    ray_data_4    the same on `ray.init(num_cpus=4)`: on 2 cores the published script waits
                  forever (its read task finds no CPU beside the two actors)
    daft          the Daft script on Daft's native runner: url.download -> image.decode(RGB) ->
                  apply(transform) -> a `daft.cls` model with `daft.method.batch(batch_size=100)`
    batchscore    `batchscore score --input urls.parquet --input-format manifest --uri-column
                  image_url --top-k 1 --dtype fp32`, defaults otherwise (a local Ray it starts)

Two models: `vit-ti16` (ViT-Ti/16: the model is the cost on CPUs) and `near-free` (one layer
of width 32: decode and the framework are the cost, as with a real model on a GPU). Images are
500x375 JPEGs cut from the real photos of scikit-image and scikit-learn, every one distinct.

Per variant and count: whole-command images/s (process start to exit, the figure compared),
steady images/s where the variant reports one (the loop after its model loaded; batchscore's
manifest), seconds to the first output row where the variant says (batchscore, the loop),
CPU-seconds per image of every process of the variant's tree (Ray's included), and the peak
RSS summed over that tree. Variants run one at a time, in their own processes; a variant
that runs past --timeout is stopped and reported as hung. Nothing is downloaded.

(*) Daft 0.7.26 declares pyarrow<26 while batchscore is tested with pyarrow 26.0.1; without
its dependencies it installs beside them and runs this bench. It is not a dependency of
batchscore, nor of its tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from overhead import TreeSampler  # noqa: E402  (bench/ helpers)
from throughput import machine, make_checkpoint  # noqa: E402

MODELS = ("vit-ti16", "near-free")  # checkpoints made as bench/throughput.py makes them
VARIANTS = ("loop", "ray_data", "ray_data_4", "daft", "batchscore")
BATCH = 100  # the published scripts' batch size
SIZE = 224


# -- inputs ---------------------------------------------------------------------------------

def make_inputs(folder: Path, n: int) -> Path:
    """n distinct 500x375 JPEGs cut from real photos, and `urls.parquet` listing them (`image_url`)."""
    urls = folder / "urls.parquet"
    if urls.exists():
        return urls
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import real_photo_paths

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = [Image.open(p).convert("RGB") for p in real_photo_paths()]
    photos = [p if p.width >= 500 and p.height >= 375 else p.resize((max(500, p.width), max(375, p.height)))
              for p in photos]
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = int(rng.integers(250, 500)), int(rng.integers(190, 375))  # a random crop, scaled: all distinct
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        path = folder / f"img-{i:06d}.jpg"
        img.crop((x, y, x + w, y + h)).resize((500, 375)).save(path, quality=90)
        paths.append(str(path))
    pq.write_table(pa.table({"image_url": paths}), urls)
    return urls


# -- the variants (each in its own process: `peers.py _variant NAME MODEL URLS OUT`) ---------

def _transform():
    """ViTImageProcessor's preprocessing as the published scripts write theirs (torchvision)."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Resize((SIZE, SIZE), antialias=True),
                               transforms.Normalize([0.5] * 3, [0.5] * 3)])


def _model(path: str):
    import torch
    from transformers import ViTForImageClassification

    net = ViTForImageClassification.from_pretrained(path).eval()
    return net, net.config.id2label, torch


def variant_loop(model: str, urls: str, out: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    net, labels, _ = _model(model)
    transform = _transform()
    paths = pq.read_table(urls).column("image_url").to_pylist()
    begun = time.monotonic()
    predicted = []
    with torch.inference_mode():
        for i in range(0, len(paths), BATCH):
            batch = torch.from_numpy(np.stack([transform(Image.open(p).convert("RGB")).numpy()
                                               for p in paths[i:i + BATCH]]))
            predicted += [labels[int(j)] for j in net(pixel_values=batch).logits.argmax(dim=1)]
            if i == 0:
                print("FIRST_ROW", file=sys.stderr, flush=True)
    pq.write_table(pa.table({"image_url": paths, "label": predicted}), f"{out}/labels.parquet")
    return {"images": len(paths), "steady_images_per_second": len(paths) / (time.monotonic() - begun)}


def variant_ray_data(model: str, urls: str, out: str, num_cpus: int | None = None) -> dict:
    import ray
    import ray.data
    import torch
    from PIL import Image

    ray.init(num_cpus=num_cpus, include_dashboard=False)
    transform = _transform()

    def transform_image(row):
        row["image"] = Image.fromarray(row["image"]).convert("RGB")
        row["norm_image"] = transform(row["image"])
        return row

    class Actor:
        def __init__(self):
            self.net, self.labels, _ = _model(model)

        def __call__(self, batch):
            with torch.inference_mode():
                predicted = self.net(pixel_values=torch.from_numpy(batch["norm_image"])).logits.argmax(dim=1)
            batch["label"] = [self.labels[int(i)] for i in predicted]
            return batch

    paths = [row["image_url"] for row in ray.data.read_parquet(urls).take_all()]
    ds = (ray.data.read_images(paths, include_paths=True, ignore_missing_paths=True)
          .map(fn=transform_image)
          .map_batches(fn=Actor, batch_size=BATCH, concurrency=1)
          .select_columns(["path", "label"]))
    ds.write_parquet(out)
    return {"images": len(paths)}


def variant_daft(model: str, urls: str, out: str) -> dict:
    import daft
    import numpy as np
    import torch
    from daft import col

    transform = _transform()

    @daft.cls(max_concurrency=1)
    class Model:
        def __init__(self):
            self.net, self.labels, _ = _model(model)

        @daft.method.batch(return_dtype=daft.DataType.string(), batch_size=BATCH)
        def __call__(self, images):
            if len(images) == 0:
                return []
            with torch.inference_mode():
                predicted = self.net(pixel_values=torch.from_numpy(np.array(images.to_pylist()))).logits.argmax(dim=1)
            return [self.labels[int(i)] for i in predicted]

    df = daft.read_parquet(urls)
    # Daft 0.7 spells the published `.url.download().image.decode(...)` as methods of the expression
    df = df.with_column("decoded_image", df["image_url"].download().decode_image(mode=daft.ImageMode.RGB))
    df = df.with_column("norm_image", df["decoded_image"].apply(
        func=lambda image: transform(image),
        return_dtype=daft.DataType.tensor(dtype=daft.DataType.float32(), shape=(3, SIZE, SIZE))))
    df = df.with_column("label", Model()(col("norm_image")))
    df = df.select("image_url", "label")
    df.write_parquet(out)
    import pyarrow.parquet as pq

    return {"images": pq.read_metadata(urls).num_rows}


def run_variant(argv: list[str]) -> None:
    name, model, urls, out = argv
    if name == "loop":
        result = variant_loop(model, urls, out)
    elif name == "daft":
        result = variant_daft(model, urls, out)
    else:
        result = variant_ray_data(model, urls, out, num_cpus=4 if name == "ray_data_4" else None)
    print(json.dumps(result), flush=True)


# -- measuring ----------------------------------------------------------------------------------

def measure(cmd: list[str], timeout: float) -> dict:
    """Runs `cmd` in its own session; wall seconds, CPU-seconds and peak RSS of its whole tree,
    seconds to a FIRST_ROW / `first rows after` line, its last stdout line (JSON); hung past `timeout`."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = TreeSampler(proc.pid).start()
    first_row, tail, stdout = None, [], []

    def watch() -> None:
        nonlocal first_row
        for line in proc.stderr:
            if first_row is None and ("FIRST_ROW" in line or "first rows after" in line):
                first_row = time.monotonic() - start
            tail.append(line)
            del tail[:-40]

    readers = [threading.Thread(target=watch, daemon=True),
               threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the variant's own session: its Ray processes too
        proc.wait()
        hung = True
    seconds = time.monotonic() - start
    sampler.stop()
    for reader in readers:
        reader.join(timeout=5)
    out = "".join(stdout)
    procs = sampler.procs.values()
    figures = {"wall_seconds": seconds, "first_row_seconds": first_row, "hung": hung,
               "cpu_seconds": sum(p.get("cpu_seconds", 0.0) for p in procs),
               "peak_rss_mib": sum(p["peak_rss_kib"] for p in procs) / 1024}
    if hung:
        return figures
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} exited {proc.returncode}:\n{''.join(tail)}")
    try:  # batchscore --json prints one indented object; the variants one line, after others
        said = json.loads(out)
    except ValueError:
        lines = [line for line in out.strip().splitlines() if line.startswith("{")]
        said = json.loads(lines[-1]) if lines else {}
    return {**figures, **said}


def bench(kind: str, count: int, work: Path, variants: list[str], timeout: float) -> dict:
    model = make_checkpoint(kind, work / f"ckpt-{kind}")
    urls = make_inputs(work / f"images-{count}", count)
    results = {}
    for name in variants:
        out = tempfile.mkdtemp(prefix=f"peers-{name}-", dir=work)
        if name == "batchscore":
            cmd = [str(HERE.parent / ".venv" / "bin" / "batchscore"), "score", "--input", str(urls), "--input-format",
                   "manifest", "--uri-column", "image_url", "--top-k", "1", "--dtype", "fp32", "--model", str(model),
                   "--output", out, "--json"]
        else:
            cmd = [sys.executable, __file__, "_variant", name, str(model), str(urls), out]
        r = measure(cmd, timeout)
        if name == "batchscore" and not r["hung"]:
            manifest = json.loads((Path(out) / "_manifest.json").read_text())
            r["images"] = manifest["counts"]["rows"]
            r["steady_images_per_second"] = manifest["timings"].get("steady_images_per_second")
        images = r.get("images") or count
        r["images_per_second"] = None if r["hung"] else images / r["wall_seconds"]
        r["cpu_seconds_per_image"] = r["cpu_seconds"] / images
        results[name] = r
        print(f"{kind:9} {count:6} {name:11} " + ("hung" if r["hung"] else f"{r['images_per_second']:7.1f} images/s")
              + f"  wall {r['wall_seconds']:6.1f} s  cpu/image {1000 * r['cpu_seconds_per_image']:6.1f} ms"
              + f"  peak RSS {r['peak_rss_mib']:7.0f} MiB", flush=True)
    return results


def report(results: dict) -> str:
    lines = ["| model | images | variant | whole images/s | x best other | steady images/s | first row s | "
             "CPU ms/image | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for (kind, count), by_variant in results.items():
        rates = {n: r["images_per_second"] for n, r in by_variant.items() if r["images_per_second"]}
        for name, r in by_variant.items():
            others = [v for n, v in rates.items() if n != name]
            ratio = f"{r['images_per_second'] / max(others):.2f}" if r["images_per_second"] and others else "-"
            steady = r.get("steady_images_per_second")
            lines.append(f"| {kind} | {count:,} | {name} | "
                         + ("hung" if r["hung"] else f"{r['images_per_second']:.1f}") + f" | {ratio} | "
                         + (f"{steady:.1f}" if steady else "-") + " | "
                         + (f"{r['first_row_seconds']:.1f}" if r["first_row_seconds"] else "-")
                         + f" | {1000 * r['cpu_seconds_per_image']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["_variant"]:
        run_variant(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["vit-ti16", "near-free"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a variant is called hung")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "batchscore-peers")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    print(json.dumps(machine()))
    results = {}
    for count in args.counts:
        for kind in args.models:
            results[(kind, count)] = bench(kind, count, args.work, args.variants, args.timeout)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({f"{k}/{c}": v for (k, c), v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
