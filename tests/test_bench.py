"""The throughput bench runs end to end on the tiny model (figures are not asserted: speed is
judged from `bench/` runs on the real configs, docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_bench_runs_every_variant_on_a_tiny_model(tmp_path):
    figures = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--tiny", "--counts", "40",
                           "--batch-sizes", "4", "8", "--forward-seconds", "0.5", "--work", str(tmp_path / "work"),
                           "--json", str(figures)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(figures.read_text())["results"]["tiny/40"]
    assert set(results) == {"forward", "loop", "pipeline", "batchscore"}
    for name, r in results.items():
        assert r["images_per_second"] > 0 and r["peak_pss"] > 50 * 2**20 and r["first_row_seconds"] > 0, (name, r)
    assert set(results["forward"]["per_batch_size"]) == {"4", "8"}
    table = [line for line in proc.stdout.splitlines() if line.startswith("| tiny | 40 |")]
    assert [line.split("|")[3].strip().split(" ")[0] for line in table] == ["forward", "loop", "pipeline", "batchscore"]
    # Every variant wrote its rows.
    work = tmp_path / "work"
    import pyarrow.parquet as pq

    assert pq.read_table(work / "out-tiny-40-loop.parquet").num_rows == 40
    assert pq.read_table(work / "out-tiny-40-pipeline.parquet").num_rows == 40
    assert json.loads((work / "out-tiny-40-batchscore" / "_manifest.json").read_text())["counts"]["rows"] == 40
