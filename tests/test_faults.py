"""Faults: an inference actor killed mid-run, a worker node removed mid-run, the driver
killed mid-run. None of them may lose or duplicate a row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import small_photos
from test_resume import assert_same_rows

from batchscore import pipeline
from batchscore.config import ScoreConfig
from batchscore.driver import runtime

HERE = Path(__file__).parent


def descendants_named(title: str) -> list[int]:
    """PIDs of this process's descendants whose command line starts with `title` (Ray names
    an actor's process `ray::<class>`): processes this test session started itself."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmdlines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    mine, me = [], os.getpid()
    for pid in parents:
        p, seen = pid, 0
        while p in parents and p != me and seen < 64:
            p, seen = parents[p], seen + 1
        if p == me and pid != me and cmdlines.get(pid, "").startswith(title):
            mine.append(pid)
    return mine


def wait_for_parts(output: Path, n: int, alive, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(output.glob("_staging/*/part-*.parquet"))) < n:
        assert alive() and time.monotonic() < deadline, "the run ended or never got going"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def inputs(session_tmp):
    d = session_tmp / "faults-in"
    small_photos(d, 240, seed=5)
    return d


@pytest.fixture(scope="module")
def reference(ray_session, inputs, checkpoints, session_tmp):
    config = ScoreConfig(input=(str(inputs),), output=str(session_tmp / "faults-clean"), model=str(checkpoints["vit"]),
                         dtype="fp32", top_k=3, batch_size=8, rows_per_file=8)
    return config, pipeline.score(config).to_pandas()


def test_killed_inference_actor_is_restarted_and_its_batch_retried(reference, tmp_path):
    config, clean = reference
    out = tmp_path / "out"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=pipeline.score(config.with_overrides(output=str(out)))))
    thread.start()
    wait_for_parts(out, 2, thread.is_alive)
    (victim,) = descendants_named("ray::MapWorker")
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    replacement = descendants_named("ray::MapWorker")
    frame = outcome["result"].to_pandas()
    print(f"FIGURE actor kill: killed actor pid {victim} mid-run; {len(frame)} rows committed of {len(clean)}, "
          f"{len(frame) - frame['id'].nunique()} duplicated")
    assert victim not in replacement
    assert_same_rows(frame, clean, "actor kill")


def test_removed_worker_node_costs_nothing(inputs, checkpoints, tmp_path):
    """In its own process: the session's Ray stays as it is. Also the multi-node proof that
    workers write the part files (on the scoring nodes; the driver's head has no CPUs)."""
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "node_removal.py"), str(inputs), str(tmp_path / "out"),
                           str(checkpoints["vit"]), str(result)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result.read_text())
    print(f"FIGURE node removal: {got}")
    assert got["error"] is None and got["removed_mid_run"] and got["actors_on_removed_node"] >= 1
    # Head, two scoring nodes; then head, the survivor and the replacement.
    assert got["nodes_before"] == 3 and got["nodes_after"] == 3 and got["removed_node_dead"]
    assert got["rows"] == got["unique_ids"] == 240 and got["errors"] == 0
    # Workers write the parts: every committed part was written on a scoring node, not the head.
    assert got["parts"] >= 2 and got["part_nodes"] and set(got["part_nodes"]) <= set(got["scoring_nodes"])
    assert got["head"] not in got["part_nodes"]
    # Sized by default, an actor fits one node: the 2 CPUs a node has less decode's and a write's
    # (from the cluster's 4 CPUs it asked for 3.45, and waited forever).
    assert got["default_actor_cpus"] == 2 - ScoreConfig().decode_cpus - runtime.WRITE_CPUS


def test_killed_driver_leaves_no_success_and_resume_completes_the_same_rows(ray_session, reference, tmp_path):
    config, clean = reference
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "batchscore.cli", "score", "--input", config.input[0], "--output", str(out),
           "--model", config.model, "--dtype", "fp32", "--top-k", "3", "--batch-size", "8", "--rows-per-file", "8"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_parts(out, 4, lambda: driver.poll() is None)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    staged = sorted(out.glob("_staging/*/part-*.parquet"))
    assert not (out / "_SUCCESS").exists() and sorted(p.name for p in out.iterdir()) == ["_staging"]

    result = pipeline.score(config.with_overrides(output=str(out), resume=True))
    attempt = json.loads((out / "_manifest.json").read_text())["attempt"]
    print(f"FIGURE driver kill: {len(staged)} part files staged when killed; resume kept {attempt['rows_kept']} rows, "
          f"scored {attempt['rows_scored']}, discarded {attempt['parts_discarded']} half-written part(s)")
    assert attempt["resumed"] and attempt["rows_kept"] >= 8 * 3
    assert attempt["rows_kept"] + attempt["rows_scored"] == len(clean)
    assert_same_rows(result.to_pandas(), clean, "driver kill + resume")
