"""Concurrent runs on one output: a create-only lease; one run wins, the other fails clearly,
and the committed output is never a mix of runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from conftest import small_photos

from batchscore import pipeline
from batchscore.cli import EXIT_BUSY
from batchscore.config import ScoreConfig
from batchscore.exceptions import OutputBusy
from batchscore.outputs import output as sink
from batchscore.outputs.lease import LEASE, Lease


@pytest.fixture()
def output(request, object_stores, tmp_path):
    """A fresh output on the local disk, S3 (moto) or GCS (emulator)."""
    kind = request.param
    if kind == "local":
        return str(tmp_path / "out")
    from conftest import put

    bucket = f"bs-lease-{uuid.uuid4().hex[:8]}"
    put(f"{kind}://{bucket}/keep", b"")  # creates the bucket
    return f"{kind}://{bucket}/out"


@pytest.mark.parametrize("output", ["local", "s3"], indirect=True)
def test_second_lease_is_refused_where_the_store_has_preconditions(output):
    first = Lease(output, "run-a").acquire()
    with pytest.raises(OutputBusy, match=r"is being written by run run-a \(host .*, pid \d+, last heartbeat \d+s ago\)"):
        Lease(output, "run-b").acquire()
    first.check()
    first.release()
    Lease(output, "run-b").acquire().release()  # free again


@pytest.mark.parametrize("output", ["gs"], indirect=True)
def test_without_preconditions_only_the_last_holder_may_commit(output):
    """The GCS emulator ignores ifGenerationMatch=0 (real GCS honours it): both creates
    succeed, and the check before the commit point stops the run that lost the lease."""
    first = Lease(output, "run-a").acquire()
    second = Lease(output, "run-b").acquire()
    with pytest.raises(OutputBusy, match="run run-a lost the lease"):
        first.check()
    second.check()


@pytest.mark.parametrize("output", ["local"], indirect=True)
@pytest.mark.parametrize("holder, age, taken", [
    ({"host": socket.gethostname(), "pid": 2**22 + 17}, 0, True),  # its process is gone
    ({"host": "elsewhere", "pid": 1}, 3600, True),  # no heartbeat for an hour
    ({"host": "elsewhere", "pid": 1}, 0, False),  # alive elsewhere
])
def test_a_stale_lease_is_taken_over(output, holder, age, taken):
    lease = Lease(output, "run-new")
    os.makedirs(os.path.dirname(lease.path), exist_ok=True)
    with open(lease.path, "w") as f:  # the heartbeat's age from now, not from when the tests were collected
        json.dump({"run_id": "run-old", "ttl_seconds": 600, "heartbeat": time.time() - age, **holder}, f)
    if taken:
        lease.acquire()
        assert lease.read()["run_id"] == "run-new"
    else:
        with pytest.raises(OutputBusy, match="run-old"):
            lease.acquire()


def test_a_run_on_a_leased_output_writes_nothing(ray_session, tmp_path, photos, checkpoints):
    out = tmp_path / "out"
    holder = Lease(str(out), "other-run").acquire()
    config = ScoreConfig(input=(str(photos / "chelsea.png"),), output=str(out), model=str(checkpoints["vit"]))
    with pytest.raises(OutputBusy, match="other-run"):
        pipeline.score(config)
    assert sorted(p.name for p in (out / "_staging").iterdir()) == ["_lease"]  # no staged run, lease untouched
    holder.check()


def test_two_runs_started_together_never_mix(ray_session, tmp_path, checkpoints):
    """Run A holds the output; run B, started while A runs, exits with EXIT_BUSY; the
    committed output is A's alone."""
    inputs = tmp_path / "in"
    small_photos(inputs, 80, seed=3)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "batchscore.cli", "score", "--input", str(inputs), "--output", str(out),
           "--model", str(checkpoints["vit"]), "--batch-size", "4"]
    a = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / LEASE).exists():
            assert a.poll() is None and time.monotonic() < deadline, "run A never took the lease"
            time.sleep(0.05)
        b = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        a_out, a_err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    assert b.returncode == EXIT_BUSY, b.stderr[-2000:]
    assert "OutputBusy" in b.stderr and "is being written by run" in b.stderr
    assert a.returncode == 0, a_err[-2000:]
    manifest = sink.read_manifest(str(out))
    frame = sink.read_committed(str(out)).to_pandas()
    print(f"FIGURE concurrent runs: A committed {len(frame)} rows, B exited {b.returncode}; "
          f"run ids in the output: {sorted(set(frame['run_id']))}")
    assert set(frame["run_id"]) == {manifest["run_id"]} and len(frame) == 80 and frame["id"].is_unique
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(f["name"] for f in manifest["files"])
    assert not (out / "_staging").exists()


def test_a_held_lease_is_renewed_while_the_driver_waits(tmp_path):
    """The driver may wait minutes for one part's record: the lease is renewed from a thread
    meanwhile (every ttl/4), so it never looks stale to a second run. No upper time bound is
    asserted: the block waits until a renewal is seen. A lease lost meanwhile is raised."""
    lease = Lease(str(tmp_path / "out"), "run-a", ttl_seconds=0.2).acquire()
    first = lease.read()["heartbeat"]
    with lease.held():
        deadline = time.monotonic() + 60
        while lease.read()["heartbeat"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.01)
    (tmp_path / "out" / LEASE).write_text(json.dumps({"run_id": "run-b", "heartbeat": time.time(), "ttl_seconds": 600}))
    with pytest.raises(OutputBusy, match="run run-a lost the lease"):
        with lease.held():
            deadline = time.monotonic() + 60
            while lease.lost is None:  # until the heartbeat thread finds run-b's lease
                assert time.monotonic() < deadline, "the lost lease was never noticed"
                time.sleep(0.01)
    lease.release()  # not ours: left as it is
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "run-b"
