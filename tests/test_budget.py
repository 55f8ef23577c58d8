"""The error budget: too many error rows fail the run, early when certain, committing nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from batchscore import pipeline
from batchscore.cli import EXIT_BUDGET, _exit_code
from batchscore.config import ScoreConfig
from batchscore.driver.budget import ErrorBudget
from batchscore.exceptions import ErrorBudgetExceeded


@pytest.fixture()
def folder(tmp_path, photos):
    """13 inputs: 10 real photos and 3 zero-byte files."""
    d = tmp_path / "in"
    d.mkdir()
    for p in sorted(photos.iterdir())[:10]:
        shutil.copy(p, d / p.name)
    for i in range(3):
        (d / f"empty-{i}.jpg").write_bytes(b"")
    return d


def staged_summary(out) -> dict:
    (errors_file,) = out.glob("_staging/*/_errors.json")
    return json.loads(errors_file.read_text())


def test_over_budget_fails_with_exit_3_and_commits_nothing(ray_session, tmp_path, folder, checkpoints):
    """Through the CLI (exit 3, the message), then in process: within budget the same inputs commit."""
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "batchscore.cli", "score", "--input", str(folder), "--output", str(out),
                           "--model", str(checkpoints["vit"]), "--max-error-fraction", "0.2"],
                          env=env, capture_output=True, text=True, timeout=300)
    print(f"FIGURE budget via the CLI: exit {proc.returncode}, _SUCCESS present: {(out / '_SUCCESS').exists()}")
    assert proc.returncode == EXIT_BUDGET, proc.stderr[-2000:]
    assert "ErrorBudgetExceeded: 3 error rows (decode.empty=3) of 13 exceed --max-error-fraction 0.2" in proc.stderr
    assert not (out / "_SUCCESS").exists() and sorted(p.name for p in out.iterdir()) == ["_staging"]
    assert not list(out.glob("*.parquet")) and not (out / "_staging" / "_lease").exists()
    summary = staged_summary(out)
    assert summary["errors"] == 3 and summary["errors_by_code"] == {"decode.empty": 3}
    assert {e["id"].rsplit("/", 1)[-1] for e in summary["examples"]} == {"empty-0.jpg", "empty-1.jpg", "empty-2.jpg"}
    # Within budget (3 <= 0.25 x 13), the same inputs commit.
    config = ScoreConfig(input=(str(folder),), output=str(out), model=str(checkpoints["vit"]), max_error_fraction=0.25)
    result = pipeline.score(config)
    assert result.status == "committed" and result.errors == 3


def test_blown_budget_stops_early(ray_session, tmp_path, photos, checkpoints):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(300):
        (d / f"a-broken-{i:03d}.jpg").write_bytes(b"")  # sorted first, so they are read first
    for p in sorted(photos.iterdir())[:5]:
        shutil.copy(p, d / f"z-{p.name}")
    out = tmp_path / "out"
    with pytest.raises(ErrorBudgetExceeded, match="stopped early") as failed:
        pipeline.score(ScoreConfig(input=(str(d),), output=str(out), model=str(checkpoints["vit"]),
                                   max_error_fraction=0.1, decode_batch_size=16, batch_size=16, rows_per_file=16))
    # The stopped run's actors let go of their CPUs, although its traceback (held here, as a
    # notebook holds its last error) keeps score()'s frame alive: the next run gets the cluster.
    assert "exceed max_error_fraction=0.1" in str(failed.value)  # Python's terms (the CLI's: --max-error-fraction)
    assert failed.value.__traceback__ is not None
    assert _cpus_free_again(), "the stopped run's Ray Data execution still holds the cluster's CPUs"
    summary = staged_summary(out)
    print(f"FIGURE budget 0.1 over 305 inputs: stopped after {summary['rows_seen']} rows, {summary['errors']} errors")
    assert summary["aborted_early"] and summary["rows_seen"] < 305 and summary["errors"] > 30
    assert not (out / "_SUCCESS").exists()


def _cpus_free_again(wait: float = 60.0) -> bool:
    """Whether every CPU of the Ray cluster is free, waiting up to `wait` s for killed actors'
    resources to come back."""
    import ray

    deadline = time.monotonic() + wait
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_budget_arithmetic():
    b = ErrorBudget(0.1, expected_rows=100)
    b.add_counts(10, 10, {"decode.corrupt": 10}, [{"id": f"i{n}", "error": "decode.corrupt: x"} for n in range(10)])
    assert not b.blown_early() and b.blown()  # 10 of 10 so far, but 10 <= 0.1 x 100 is still possible
    b.add_counts(1, 1, {"read.failed": 1}, [{"id": "i10", "error": "read.failed: y"}])
    assert b.blown_early() and b.by_code == {"decode.corrupt": 10, "read.failed": 1} and len(b.examples) == 11
    unknown = ErrorBudget(0.5, expected_rows=None)
    unknown.add_counts(3, 1, {"read.failed": 1}, [{"id": "b", "error": "read.failed: z"}])
    assert not unknown.blown_early() and not unknown.blown()


def test_exit_code_for_a_blown_budget():
    assert _exit_code(ErrorBudgetExceeded("x")) == EXIT_BUDGET == 3


