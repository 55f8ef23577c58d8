"""The throughput bench runs end to end on the tiny model (figures are not asserted: speed is
judged from `bench/` runs on the real configs, docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_bench_runs_on_a_tiny_model(tmp_path):
    figures = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--tiny", "--counts", "24",
                           "--batch-sizes", "4", "8", "--forward-seconds", "0.2", "--work", str(tmp_path / "work"),
                           "--json", str(figures), "--variants", "forward", "loop", "pipeline"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(figures.read_text())["results"]["tiny/24"]
    # batchscore's own variant is left out for time: its run is what bench/overhead.py's smoke test
    # (test_runtime_lean.py) and every pipeline test run; its figures come from bench runs
    assert set(results) == {"forward", "loop", "pipeline"}
    for name, r in results.items():
        assert r["images_per_second"] > 0 and r["peak_pss"] > 50 * 2**20 and r["first_row_seconds"] > 0, (name, r)
    assert set(results["forward"]["per_batch_size"]) == {"4", "8"}
    table = [line for line in proc.stdout.splitlines() if line.startswith("| tiny | 24 |")]
    assert [line.split("|")[3].strip().split(" ")[0] for line in table] == ["forward", "loop", "pipeline"]
    # Every variant wrote its rows.
    work = tmp_path / "work"
    import pyarrow.parquet as pq

    assert pq.read_table(work / "out-tiny-24-loop.parquet").num_rows == 24
    assert pq.read_table(work / "out-tiny-24-pipeline.parquet").num_rows == 24


def test_gpu_bench_dry_run_decodes_on_the_device_end_to_end(tmp_path):
    """`bench/gpu.sh --dry-run`: the GPU bench's device-decode fidelity and batchscore with
    in-actor decode end to end on a tiny ViT here, writing its JSON and Markdown table (figures
    are not asserted). The other steps are left out here for time; the whole dry run, every
    step, is in docs/benchmarks.md."""
    out = tmp_path / "gpu"
    steps = ["env", "fidelity", "batchscore"]
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--images", "24", "--out", str(out),
                           "--steps", *steps, "--end-to-end", "gpu"], capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu-bench.json").read_text())
    assert results["dry_run"] and results["images"] == 24
    steps = results["steps"]
    assert set(steps) == {"env", "fidelity", "batchscore"}
    assert all("error" not in s for s in steps.values()), {k: s.get("error") for k, s in steps.items()}
    assert steps["fidelity"]["result"]["pixel_mean_levels"] < 1  # torchvision on the CPU: libjpeg-turbo both ways
    # the in-actor decode path end to end (CPU decode end to end: every other pipeline test)
    assert steps["batchscore"]["result"]["torchvision"]["rows"] == 24, steps["batchscore"]
    assert "| fidelity |" in (out / "gpu-bench.md").read_text()


def test_gpu_bench_counts_nested_failures_and_unmeasured_steady_rate():
    """bench/gpu.py's bookkeeping, without running it: a batchscore variant that failed
    (`TimeoutExpired` under `result`) is a failed step, and a steady rate that was not
    measured says so in the table instead of 0.0."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    ok = {"rows": 60, "errors": 0, "parts": 8, "rows_per_file": 7, "parts_span_seconds": 30.0,
          "images_per_second": 12.5,
          "steady_images_per_second": 14.1, "sizing_lines": [], "batch_size_line": []}
    results = {"dry_run": True, "model": "tiny ViT", "images": 60, "dtype": "fp32", "total_seconds": 9.0, "steps": {
        "env": {"result": {"cpus": 2}, "seconds": 0.1, "gpu": None},
        "fidelity": {"result": {"errors": 0, "pixel_max_levels": 1}, "seconds": 1.0, "gpu": None},
        "batchscore": {"result": {"cpu": {**ok, "steady_images_per_second": None, "parts": 2},
                                  "torchvision": {"error": "TimeoutExpired: Command '...' timed out after 60 seconds"}},
                       "seconds": 70.0, "gpu": None}}}
    assert gpu.failed_steps(results) == ["batchscore.torchvision"]
    table = gpu.markdown(results)
    assert "steady not measured; 2 part files over" in table and "(0.0" not in table
    assert "decode_device=torchvision: FAILED" in table and "TimeoutExpired" in table
    results["steps"]["batchscore"]["result"]["torchvision"] = ok
    assert gpu.failed_steps(results) == [] and "12.5 (14.1; 8 part files over 30.0 s)" in gpu.markdown(results)
    results["steps"]["pipeline"] = {"error": "RuntimeError: boom", "seconds": 0.0}
    assert gpu.failed_steps(results) == ["pipeline"]
