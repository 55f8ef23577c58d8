"""What batchscore costs over a plain loop: the demo checkpoint on many small images.

    .venv/bin/python bench/overhead.py                            # 10,000 and 100,000 images
    .venv/bin/python bench/overhead.py --counts 2000 --json /tmp/overhead.json
    .venv/bin/python bench/overhead.py --ray-footprint            # the local Ray: Ray's default start against the lean one
    .venv/bin/python bench/overhead.py --listing-memory 10000 1000000   # the driver's memory as the listing grows

The demo model (a 4-layer ViT on 32x32 digits) scores thousands of images a second on one
core, so what a run spends beside the model shows: Ray, Ray Data, the driver. Two variants,
one after the other, each in its own process, on the same images:

    loop        one Python process: Pillow -> resize to the checkpoint's size -> the model in
                bf16 (--dtype) on 1 torch thread, batch 32 -> top-5 -> one Parquet file
    batchscore  `batchscore score --input DIR --output OUT --model CKPT --json` as a user runs
                it: a local Ray started by the run (RAY_ADDRESS is removed), default settings

The images are scikit-learn's 1,797 digits drawn the way the demo's samples are (32x32 RGB
PNG, coloured ink on a dark background, batchscore/demo/train.py), each file in its own
colour so that no two files have the same bytes; made once per count under --work.

For each variant: images/s steady (loop: from after the model is loaded; batchscore: the
manifest's `timings.steady_images_per_second`, first to last batch) and whole command
(images over the wall time from launch to exit), batchscore's over the loop's, CPU seconds
of every process of the command's tree (read from /proc/<pid>/stat every 0.25 s; a process
that exits between two reads loses at most that much), grouped as the driver, the model
actor, other Ray workers (read/decode), Ray's own processes (GCS, raylet, its agents, log
monitor, and dashboard and autoscaler monitor when they run) and Ray Data's actors
(`_StatsActor`, autoscaling coordinator, actor-location tracker), the driver's CPU per 1,000
images while scoring and its peak RSS (VmHWM). Batchscore's driver is "scoring" for the
manifest's `scoring_seconds` up to its last `progress:` line: from the dataset's start (Ray
Data's plan, the model actor's start, ~1 CPU-s of the driver's that do not grow with the
images) to the last rows in (from its first Ray worker to its exit when it logs no progress);
the loop's from after the model is loaded to the file written. With two or more counts it also
prints the driver's CPU per 1,000 more images between the first and the last count, which
leaves that fixed part out.

With --ray-footprint it measures the local Ray batchscore starts instead (runtime.py's
`start_local_ray`): Ray as it starts itself (`lean=False`, how batchscore started it before)
against the lean start batchscore uses now, each (a) started then left idle for --idle
seconds, (b) scoring --footprint-images small photos with `batchscore.pipeline.score` in
the same process: the number of Ray processes, their CPU seconds and RSS, and the time
`ray.init` takes. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from throughput import descendants, machine  # noqa: E402  (bench/ helpers)

HZ = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
DEMO_CHECKPOINT = ROOT / "batchscore" / "demo" / "checkpoint"
ROLES = ("driver", "model actor", "other workers", "Ray processes", "Ray Data actors")
RAY_DATA_ACTORS = ("ray::_StatsActor", "ray::_AutoscalingCoordinator", "ray::AutoscalingCoordinator",
                   "ray::ActorLocationTracker")
RAY_SYSTEM = {"gcs_server": "GCS", "raylet/raylet": "raylet", "dashboard/dashboard.py": "dashboard",
              "autoscaler/_private/monitor.py": "autoscaler monitor", "log_monitor.py": "log monitor",
              "ray::DashboardAgent": "dashboard agent", "ray::RuntimeEnvAgent": "runtime env agent",
              "dashboard/agent.py": "dashboard agent", "runtime_env/agent/main.py": "runtime env agent",
              # the full dashboard's module processes (include_dashboard=True) and their forkserver
              "ray-dashboard-": "dashboard", "ray.dashboard.subprocess": "dashboard",
              "multiprocessing.resource_tracker": "dashboard"}


# -- images ------------------------------------------------------------------------------

def make_digits(folder: Path, n: int) -> list[str]:
    """`n` distinct 32x32 PNG digits (scikit-learn's scans, drawn as batchscore's demo does)."""
    marker = folder / ".complete"
    names = [f"digit-{i:06d}.png" for i in range(n)]
    if not (marker.exists() and marker.read_text() == str(n)):
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits

        from batchscore.demo.train import SIZE

        folder.mkdir(parents=True, exist_ok=True)
        digits = load_digits().images
        # The demo's render(): the 8x8 scan upscaled (bilinear) as ink, mixed with a dark
        # background; here the ink colour encodes the file's index, so every file differs.
        ink = [np.asarray(Image.fromarray((d * (255 / 16)).astype(np.uint8), mode="L")
                          .resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32)[..., None] / 255.0
               for d in digits]
        for i, name in enumerate(names):
            v = i // len(digits)  # colour variant: (120..255)^3 gives 2.5 M distinct colours
            colour = np.array([120 + v % 136, 120 + (v // 136) % 136, 255 - (v // 136 ** 2) % 136], np.float32)
            a = ink[i % len(digits)]
            rgb = a * colour + (1 - a) * 20.0
            Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), mode="RGB").save(folder / name)
        marker.write_text(str(n))
    return [str(folder / name) for name in names]


# -- measuring a process tree --------------------------------------------------------------

def read_proc(pid: int) -> tuple[str, float, int, int] | None:
    """(name, CPU seconds, RSS KiB, peak RSS KiB) of one process, None once it has gone.

    The name is the command line; Ray's workers retitle theirs (`ray::IDLE`,
    `ray::MapWorker(...)`, `ray::_StatsActor`), so it says what the worker is now."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    memory = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
              if line.startswith(("VmRSS:", "VmHWM:"))}
    name = cmdline or f"[{stat[stat.find('(') + 1:stat.rfind(')')]}]"  # no command line: exiting
    return name, (int(fields[11]) + int(fields[12])) / HZ, memory.get("VmRSS", 0), memory.get("VmHWM", 0)


def role(name: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    if name.startswith("ray::MapWorker"):
        return "model actor"
    if name.startswith(RAY_DATA_ACTORS):
        return "Ray Data actors"
    if any(key in name for key in RAY_SYSTEM):
        return "Ray processes"
    return "other workers"


def ray_component(name: str) -> str:
    """A short name for one of Ray's own processes (the command line otherwise)."""
    for key, short in RAY_SYSTEM.items():
        if key in name:
            return short
    return name.split(" ")[0][:60]


class TreeSampler:
    """Samples every process under `root` (itself included) every `period` seconds: the last
    CPU seconds, the last and the peak RSS of each, and the root's CPU over time."""

    def __init__(self, root: int, period: float = 0.25):
        self.root, self.period = root, period
        self.procs: dict[int, dict] = {}
        self.root_cpu: list[tuple[float, float]] = []  # (monotonic time, CPU seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        now = time.monotonic()
        for pid in descendants(self.root):
            info = read_proc(pid)
            if info is None:
                continue
            name, cpu, rss, hwm = info
            p = self.procs.setdefault(pid, {"pid": pid, "first_seen": now, "peak_rss_kib": 0, "hwm_kib": 0})
            if name.startswith("[") and "name" in p:
                name = p["name"]  # an exiting process has no command line left: keep the last one
            p.update(name=name, cpu_seconds=cpu, rss_kib=rss, last_seen=now)
            p["peak_rss_kib"] = max(p["peak_rss_kib"], rss)
            p["hwm_kib"] = max(p["hwm_kib"], hwm)
            if pid == self.root:
                self.root_cpu.append((now, cpu))

    def start(self) -> TreeSampler:
        def loop() -> None:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=loop, daemon=True, name="tree-sampler")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def alive(self) -> list[dict]:
        """The processes seen in the last sample."""
        last = max((p["last_seen"] for p in self.procs.values()), default=0)
        return [p for p in self.procs.values() if p["last_seen"] == last]

    def root_cpu_at(self, t: float) -> float:
        """The root's CPU seconds at the last sample at or before `t`."""
        before = [cpu for when, cpu in self.root_cpu if when <= t]
        return before[-1] if before else 0.0

    def by_role(self) -> dict[str, float]:
        out = dict.fromkeys(ROLES, 0.0)
        for p in self.procs.values():
            out[role(p["name"], p["pid"] == self.root)] += p["cpu_seconds"]
        return out

    def table(self) -> list[dict]:
        return sorted(({"pid": p["pid"], "name": p["name"][:120], "role": role(p["name"], p["pid"] == self.root),
                        "cpu_seconds": round(p["cpu_seconds"], 2), "peak_rss_mib": round(p["peak_rss_kib"] / 1024, 1)}
                       for p in self.procs.values()), key=lambda r: -r["cpu_seconds"])


def run_tree(cmd: list[str], env: dict | None = None, marks: tuple[str, ...] = ()) -> dict:
    """Runs `cmd`, sampling its process tree; returns the figures, its stdout and the times
    (monotonic) of the stderr lines holding each of `marks` (first and last)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid).start()
    seen: dict[str, list[float]] = {m: [] for m in marks}
    tail: list[str] = []

    def watch() -> None:
        for line in proc.stderr:
            now = time.monotonic()
            for m in marks:
                if m in line:
                    seen[m] = [seen[m][0] if seen[m] else now, now]  # the first and the latest
            tail.append(line)
            del tail[:-60]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.stdout.read()
    proc.wait()
    end = time.monotonic()
    sampler.stop()
    watcher.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{''.join(tail)}")
    return {"wall_seconds": end - start, "start": start, "end": end, "stdout": out, "sampler": sampler,
            "marks": {m: tuple(v) if v else None for m, v in seen.items()}, "stderr_tail": tail}


# -- the plain loop (its own process: `overhead.py _loop ...`) ------------------------------

def plain_loop(model: str, files: list[str], batch_size: int, dtype: str, out: str) -> dict:
    """Pillow -> resize -> the model on 1 thread -> top-5 -> one Parquet file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoModelForImageClassification

    torch.set_num_threads(1)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    pre = json.loads((Path(model) / "preprocessor_config.json").read_text())
    size = pre.get("size", 224)
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size, size)
    mean = torch.tensor(pre.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("image_std", [0.5] * 3)).view(1, 3, 1, 1)
    scale, resample = pre.get("rescale_factor", 1 / 255), pre.get("resample", 2)
    net = AutoModelForImageClassification.from_pretrained(model, dtype=dt).eval()
    labels = net.config.id2label
    start, cpu0 = time.perf_counter(), time.process_time()
    top_labels, top_probs = [], []
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((width, height), resample))
                               for f in files[i:i + batch_size]])
            x = ((torch.from_numpy(pixels).permute(0, 3, 1, 2).float() * scale - mean) / std).to(dt)
            probs, idx = torch.softmax(net(pixel_values=x).logits.float(), -1).topk(min(5, len(labels)))
            top_labels += [[labels[int(j)] for j in row] for row in idx]
            top_probs += probs.tolist()
            if i == 0:
                print("FIRST_ROW", file=sys.stderr, flush=True)
    table = pa.table({"id": pa.array(files), "labels": pa.array(top_labels, pa.list_(pa.string())),
                      "probs": pa.array(top_probs, pa.list_(pa.float32()))})
    pq.write_table(table, out)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {"images": len(files), "loop_seconds": seconds, "loop_cpu_seconds": cpu,
            "images_per_second": len(files) / seconds}


# -- the local Ray's footprint (its own process: `overhead.py _ray ...`) ---------------------

def ray_footprint(lean: bool, idle: float, images: str | None, out: str | None, dtype: str) -> dict:
    """Starts the local Ray as batchscore does (lean or Ray's default), then idles or scores;
    returns the Ray processes' figures (this process, the driver, apart)."""
    import ray

    from batchscore.driver.runtime import start_local_ray

    sampler = TreeSampler(os.getpid()).start()
    t0 = time.monotonic()
    # As ensure_ray starts it now (lean), and as it did before (include_dashboard=False).
    start_local_ray() if lean else start_local_ray(lean=False, include_dashboard=False)
    init_seconds = time.monotonic() - t0
    phase = time.monotonic()
    if images:
        from batchscore import pipeline
        from batchscore.config import ScoreConfig

        result = pipeline.score(ScoreConfig(input=(images,), output=out, overwrite=True, dtype=dtype))
        assert result.rows > 0, result
    else:
        time.sleep(idle)
    phase = time.monotonic() - phase
    sampler.sample()
    sampler.stop()
    alive = [p for p in sampler.alive() if p["pid"] != os.getpid()]
    ray_procs = [p for p in sampler.procs.values() if p["pid"] != os.getpid()]
    ray.shutdown()
    return {"lean": lean, "init_seconds": init_seconds, "phase_seconds": phase,
            "processes_alive": len(alive), "processes_seen": len(ray_procs),
            "cpu_seconds": sum(p["cpu_seconds"] for p in ray_procs),
            "cpu_by_role": {k: v for k, v in sampler.by_role().items() if k != "driver"},
            "driver_cpu_seconds": sampler.by_role()["driver"],
            "rss_mib": sum(p["rss_kib"] for p in alive) / 1024,
            "peak_rss_mib": {ray_component(p["name"]): round(p["peak_rss_kib"] / 1024)
                             for p in ray_procs if role(p["name"], False) == "Ray processes"},
            "components": sorted({ray_component(p["name"]) for p in ray_procs
                                  if role(p["name"], False) == "Ray processes"}),
            "processes": sampler.table()}


def footprint(work: Path, idle: float, n_images: int, dtype: str, rounds: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import small_photos

    photos = work / f"photos-{n_images}"
    if not (photos / ".complete").exists():
        small_photos(photos, n_images)
        (photos / ".complete").write_text(str(n_images))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    results: dict[str, list[dict]] = {}
    # Interleaved, so that a machine busy for a while weighs on both starts alike.
    for r in range(rounds):
        for lean in (False, True):
            for what in ("idle", "score"):
                cmd = [sys.executable, str(Path(__file__).resolve()), "_ray", "--lean", str(int(lean)),
                       "--idle", str(idle), "--dtype", dtype]
                if what == "score":
                    cmd += ["--images", str(photos), "--out", str(work / f"footprint-out-{int(lean)}")]
                run = run_tree(cmd, env)
                res = json.loads(run["stdout"].strip().splitlines()[-1])
                res["wall_seconds"] = run["wall_seconds"]
                results.setdefault(f"{'lean' if lean else 'default'}/{what}", []).append(res)
                print(f"  round {r + 1} {'lean' if lean else 'default':7s} {what:5s} init {res['init_seconds']:5.2f}s  "
                      f"Ray processes {res['processes_alive']:2d}  their CPU {res['cpu_seconds']:5.1f}s  "
                      f"RSS {res['rss_mib']:5.0f} MiB  ({', '.join(res['components'])})", flush=True)
    return results


def footprint_report(results: dict, idle: float, n_images: int) -> str:
    lines = ["| Ray start | phase | Ray processes at the end | their CPU s | of which Ray's own / Ray Data actors / workers | "
             "their RSS MiB | ray.init s |",
             "|---|---|---|---|---|---|---|"]
    for key, runs in results.items():
        start, what = key.split("/")
        med = (lambda xs: sorted(xs)[len(xs) // 2])  # noqa: E731 - the median of the rounds
        roles = {k: med([r["cpu_by_role"][k] for r in runs]) for k in runs[0]["cpu_by_role"]}
        phase = f"idle {idle:g} s" if what == "idle" else f"score {n_images} photos"
        lines.append(f"| {start} | {phase} | {med([r['processes_alive'] for r in runs])} | "
                     f"{med([r['cpu_seconds'] for r in runs]):.1f} | {roles['Ray processes']:.1f} / "
                     f"{roles['Ray Data actors']:.1f} / {roles['other workers'] + roles['model actor']:.1f} | "
                     f"{med([r['rss_mib'] for r in runs]):.0f} | {med([r['init_seconds'] for r in runs]):.2f} |")
    return "\n".join(lines)


# -- the bench --------------------------------------------------------------------------------

def batchscore_command() -> list[str]:
    script = Path(sys.executable).with_name("batchscore")
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchscore.cli"]


def summarize(run: dict, count: int) -> dict:
    sampler: TreeSampler = run["sampler"]
    root = sampler.procs.get(sampler.root, {})
    return {"wall_seconds": run["wall_seconds"], "whole_images_per_second": count / run["wall_seconds"],
            "cpu_by_role": sampler.by_role(), "cpu_seconds": sum(sampler.by_role().values()),
            "driver_peak_rss_mib": root.get("hwm_kib", 0) / 1024, "processes": sampler.table()}


def bench(count: int, work: Path, model: Path, dtype: str, batch_size: int) -> dict:
    images = work / f"digits-{count}"
    files = make_digits(images, count)
    listing = work / f"digits-{count}.txt"
    listing.write_text("\n".join(files))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    results = {}

    run = run_tree([sys.executable, str(Path(__file__).resolve()), "_loop", "--model", str(model),
                    "--files", str(listing), "--dtype", dtype, "--batch-size", str(batch_size),
                    "--out", str(work / f"loop-{count}.parquet")], env)
    loop = json.loads(run["stdout"].strip().splitlines()[-1])
    r = summarize(run, count)
    r.update(steady_images_per_second=loop["images_per_second"],
             driver_cpu_per_1000=1000 * loop["loop_cpu_seconds"] / count, driver_cpu_window_seconds=loop["loop_seconds"])
    results["loop"] = r
    report_line(count, "loop", r)

    out = work / f"out-{count}"
    run = run_tree(batchscore_command() + ["score", "--input", str(images), "--output", str(out), "--model", str(model),
                                           "--overwrite", "--json", "--dtype", dtype], env,
                   marks=("progress:",))
    manifest = json.loads((out / "_manifest.json").read_text())
    if manifest["counts"]["rows"] != count:
        raise RuntimeError(f"batchscore wrote {manifest['counts']['rows']} rows for {count} images")
    r = summarize(run, count)
    timings = manifest["timings"]
    # Steady: first to last batch in. A run whose rows reach the driver in one go has no such
    # span (0 in the manifest): then images over the scoring time.
    r["steady_images_per_second"] = timings.get("steady_images_per_second") or timings["images_per_second"]
    r["steady_from"] = "steady_images_per_second" if timings.get("steady_images_per_second") else "images_per_second"
    r["manifest_timings"] = timings
    # The driver while scoring: the manifest's scoring_seconds (the dataset's start to the
    # last row in) up to its last `progress:` line, which it logs when the last rows are in;
    # without that line, from its first Ray worker to its exit.
    sampler = run["sampler"]
    last = run["marks"]["progress:"]
    if last and timings.get("scoring_seconds"):
        t0, t1, how = last[1] - timings["scoring_seconds"], last[1], "scoring_seconds up to the last progress line"
    else:
        workers = [p["first_seen"] for p in sampler.procs.values() if p["name"].startswith("ray::")]
        t0, t1, how = (min(workers) if workers else run["start"]), run["end"], "first Ray worker to exit"
    cpu = sampler.root_cpu_at(t1) - sampler.root_cpu_at(t0)
    r.update(driver_cpu_scoring_seconds=cpu, driver_cpu_per_1000=1000 * cpu / count, driver_cpu_window_seconds=t1 - t0,
             driver_cpu_window=how,
             chosen_batch_size=next((line.split("forward batch size", 1)[1].split()[0] for line in run["stderr_tail"]
                                     if "forward batch size" in line and "chosen" in line), None))
    results["batchscore"] = r
    report_line(count, "batchscore", r)
    for name in ("steady_images_per_second", "whole_images_per_second"):
        results[f"ratio_{name}"] = results["batchscore"][name] / results["loop"][name]
    return results


def report_line(count: int, name: str, r: dict) -> None:
    roles = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_by_role"].items() if v)
    print(f"  {count:6d} {name:10s} steady {r['steady_images_per_second']:7.1f} img/s  whole {r['whole_images_per_second']:7.1f} "
          f"img/s  wall {r['wall_seconds']:6.1f}s  CPU s: {roles}", flush=True)
    for p in r["processes"]:
        if p["cpu_seconds"] >= 0.3:
            print(f"           {p['cpu_seconds']:7.1f} s  {p['peak_rss_mib']:6.0f} MiB  {p['pid']:7d}  {p['name'][:90]}",
                  file=sys.stderr)


def report(results: dict) -> str:
    lines = ["| images | variant | steady images/s | whole command images/s | × loop (steady / whole) | wall s | "
             "CPU s: driver / model actor / other workers / Ray / Ray Data actors = total | driver CPU s per 1,000 images "
             "while scoring | driver peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for count, res in results.items():
        for name in ("loop", "batchscore"):
            r = res[name]
            ratio = (f"{res['ratio_steady_images_per_second']:.2f} / {res['ratio_whole_images_per_second']:.2f}"
                     if name == "batchscore" else "1 / 1")
            cpu = " / ".join(f"{r['cpu_by_role'][k]:.1f}" for k in ROLES)
            mark = " *" if r.get("steady_from") == "images_per_second" else ""
            lines.append(f"| {count} | {name} | {r['steady_images_per_second']:.0f}{mark} | {r['whole_images_per_second']:.0f} | "
                         f"{ratio} | {r['wall_seconds']:.1f} | {cpu} = {r['cpu_seconds']:.1f} | "
                         f"{r['driver_cpu_per_1000']:.2f} | {r['driver_peak_rss_mib']:.0f} |")
    if any(res["batchscore"].get("steady_from") == "images_per_second" for res in results.values()):
        lines.append("\n\\* the rows reached the driver in one go: images over the scoring time, not first to last batch")
    return "\n".join(lines)


def listing_memory(counts: list[int], work: Path, model: Path) -> dict:
    """The driver's peak RSS for a run over a manifest of N URIs, for each N: its memory as the
    listing grows. The URIs name files that do not exist, so every row is a cheap
    `read.not_found` error row (max_error_fraction 1): the rows still go through every
    stage and into part files, but no image is decoded or scored."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    results = {}
    for count in counts:
        manifest = work / f"manifest-{count}.csv"
        if not manifest.exists():
            with open(manifest, "w") as f:
                f.write("uri\n")
                f.writelines(f"{work}/absent/{i // 1000:04d}/image-{i:08d}.jpg\n" for i in range(count))
        out = work / f"listing-out-{count}"
        run = run_tree(batchscore_command() + ["score", "--input", str(manifest), "--output", str(out), "--model",
                                               str(model), "--overwrite", "--json", "--max-error-fraction", "1"], env)
        rows = json.loads((out / "_manifest.json").read_text())["counts"]["rows"]
        if rows != count:
            raise RuntimeError(f"batchscore wrote {rows} rows for {count} listed inputs")
        r = summarize(run, count)
        results[count] = {"wall_seconds": r["wall_seconds"], "driver_peak_rss_mib": r["driver_peak_rss_mib"],
                          "driver_cpu_seconds": r["cpu_by_role"].get("driver", 0.0)}
        print(f"  {count:9d} listed inputs: driver peak RSS {r['driver_peak_rss_mib']:7.0f} MiB, "
              f"driver CPU {results[count]['driver_cpu_seconds']:6.1f} s, wall {r['wall_seconds']:6.1f} s", flush=True)
    low, high = min(counts), max(counts)
    if low != high:
        results["ratio"] = results[high]["driver_peak_rss_mib"] / results[low]["driver_peak_rss_mib"]
        print(f"driver peak RSS at {high} inputs / at {low}: {results['ratio']:.2f}x")
    return results


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["_loop", "_ray"])
    p.add_argument("--model")
    p.add_argument("--files")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out")
    p.add_argument("--lean", type=int, default=1)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--images")
    a = p.parse_args(argv)
    if a.what == "_loop":
        result = plain_loop(a.model, Path(a.files).read_text().split("\n"), a.batch_size, a.dtype, a.out)
    else:
        result = ray_footprint(bool(a.lean), a.idle, a.images, a.out, a.dtype)
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_loop", "_ray"):
        return child(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--model", type=Path, default=DEMO_CHECKPOINT, help="checkpoint (default: the demo's)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="for both variants")
    parser.add_argument("--batch-size", type=int, default=32, help="the loop's batch")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "batchscore-overhead")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--ray-footprint", action="store_true",
                        help="measure the local Ray (default start against the lean one) instead")
    parser.add_argument("--idle", type=float, default=10.0, help="--ray-footprint: seconds left idle after ray.init")
    parser.add_argument("--footprint-images", type=int, default=300, help="--ray-footprint: photos scored")
    parser.add_argument("--rounds", type=int, default=1, help="--ray-footprint: repeats (medians are printed)")
    parser.add_argument("--listing-memory", nargs="+", type=int, metavar="N",
                        help="measure the driver's peak memory for manifests of N URIs instead (e.g. 10000 1000000)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    info = {**machine(), "loadavg_before": os.getloadavg()}
    print(f"machine: {json.dumps(info)}", flush=True)
    if args.listing_memory:
        results = listing_memory(args.listing_memory, args.work, args.model)
    elif args.ray_footprint:
        results = footprint(args.work, args.idle, args.footprint_images, args.dtype, args.rounds)
        print()
        print(footprint_report(results, args.idle, args.footprint_images))
    else:
        results = {count: bench(count, args.work, args.model, args.dtype, args.batch_size) for count in args.counts}
        print()
        print(report(results))
        counts = sorted(results)
        if len(counts) > 1:
            # What one more image costs the driver, start-up and per-run costs cancelled out.
            a, b = results[counts[0]]["batchscore"], results[counts[-1]]["batchscore"]
            marginal = 1000 * (b["driver_cpu_scoring_seconds"] - a["driver_cpu_scoring_seconds"]) / (counts[-1] - counts[0])
            results["driver_cpu_per_1000_marginal"] = marginal
            print(f"\nbatchscore's driver, from {counts[0]} to {counts[-1]} images: {marginal:.2f} CPU s per 1,000 more images")
    info["loadavg_after"] = os.getloadavg()
    print(f"load average before {info['loadavg_before'][0]:.2f}, after {info['loadavg_after'][0]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
