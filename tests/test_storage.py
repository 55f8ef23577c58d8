"""Object storage end to end, against real servers on 127.0.0.1 started by the test session:
gcp-storage-emulator (gs:// via gcsfs) and moto (s3:// via s3fs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import upload_dir

from batchscore import pipeline
from batchscore.config import ScoreConfig

ROOT = Path(__file__).parent.parent


def read_committed(uri: str) -> dict[str, dict]:
    """{file name: row} read with fsspec + pyarrow only, from the files the manifest lists."""
    fs, path = fsspec.core.url_to_fs(uri)
    assert fs.exists(f"{path}/_SUCCESS")
    manifest = json.loads(fs.cat(f"{path}/_manifest.json"))
    rows = []
    for part in manifest["files"]:
        with fs.open(f"{path}/{part['name']}", "rb") as f:
            rows += pq.read_table(f).to_pylist()
    assert len(rows) == manifest["counts"]["rows"]
    return {r["id"].rsplit("/", 1)[-1]: r for r in rows}


@pytest.fixture(scope="module")
def local_reference(ray_session, session_tmp, photos, checkpoints):
    """The same photos scored from local disk: what every bucket run must reproduce."""
    out = session_tmp / "local-ref"
    pipeline.score(ScoreConfig(input=(str(photos),), output=str(out), model=str(checkpoints["vit"]), dtype="fp32",
                               top_k=0))
    return read_committed(str(out))


def run_cli(ray_session, *args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, joining the session's Ray (these tests are about the
    stores; tests/test_bad_jobs.py runs the CLI with a Ray of its own)."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, "-m", "batchscore.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("scheme, bucket", [("gs", "bs-gcs-e2e"), ("s3", "bs-s3-e2e")])
def test_cli_bucket_to_bucket_matches_a_local_run(ray_session, local_reference, photos, checkpoints, scheme, bucket):
    upload_dir(photos, f"{scheme}://{bucket}/images/dt=2026-11-23")
    out = f"{scheme}://{bucket}/scores/dt=2026-11-23"
    proc = run_cli(ray_session, "score", "--input", f"{scheme}://{bucket}/images/dt=2026-11-23/", "--output", out,
                   "--model", str(checkpoints["vit"]), "--dtype", "fp32", "--top-k", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"output: {out}" in proc.stdout
    remote = read_committed(out)
    assert remote.keys() == local_reference.keys()
    worst = 0.0
    for name, row in remote.items():
        ref = local_reference[name]
        assert row["error"] is None and row["labels"] == ref["labels"], name
        worst = max(worst, max(abs(a - b) for a, b in zip(row["probs"], ref["probs"])))
    print(f"FIGURE {scheme}: {len(remote)} rows, max |p_bucket - p_local| = {worst:.1e}")
    assert worst < 1e-5
    assert remote[next(iter(remote))]["id"].startswith(f"{scheme}://{bucket}/images/dt=2026-11-23/")


def test_unwritable_output_fails_before_scoring_and_commits_nothing(ray_session, photos, checkpoints):
    proc = run_cli(ray_session, "score", "--input", str(photos), "--output", "gs://bs-no-such-bucket/scores",
                   "--model", str(checkpoints["vit"]))
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "SinkError: output 'gs://bs-no-such-bucket/scores' is not writable" in proc.stderr
    assert "Starting execution of Dataset" not in proc.stderr  # nothing was scored
    fs = fsspec.filesystem("gs")
    assert not fs.exists("bs-no-such-bucket/scores/_SUCCESS")
