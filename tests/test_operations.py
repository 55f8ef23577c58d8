"""Operations: `ray job submit` of the nightly job against a real Ray head and the GCS
emulator, backfills that survive a failed date, `batchscore inspect`, and the cluster and
Kubernetes files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import put, small_photos
from emulators import free_port

import batchscore
from batchscore import schedule
from batchscore.config import ScoreConfig
from batchscore.exceptions import ConfigError
from batchscore.outputs import output as sink

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# -- a real Ray head, started with `ray start` from the project's venv --------------------

def pids_using(marker: str) -> list[int]:
    """PIDs whose command line or open files hold `marker`, our private temp dir: the processes
    this test started (Ray renames some, e.g. `ray::DashboardAgent`, but they keep their logs
    open there)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if marker in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace") or any(
                    marker in os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")):
                out.append(int(entry))
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def ray_head(object_stores):
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}:{env.get('PATH', '')}"})
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    f"--temp-dir={temp}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats",
                    # The test session's own Ray already holds the agents' default ports.
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                    f"--ray-client-server-port={free_port()}"],
                   env=env, check=True, capture_output=True, text=True, timeout=120)
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": {**env, "RAY_AUTH_MODE": "token"}}
    finally:
        for signal_number, wait in ((15, 2.0), (9, 0.5)):  # TERM, then KILL what is left
            for pid in pids_using(temp):
                try:
                    os.kill(pid, signal_number)
                except ProcessLookupError:
                    pass
            time.sleep(wait)
        left = pids_using(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray head processes still running: {left}"


def submit(head: dict, *job: str) -> subprocess.CompletedProcess:
    """`ray job submit`; retried while the fresh head's job agent is not registered yet."""
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir",
                               str(ROOT), "--", *job], env=head["env"], capture_output=True, text=True, timeout=600,
                              cwd=ROOT)
        if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def test_ray_job_submit_nightly_commits_the_partition_and_a_second_submit_is_a_noop(ray_head, tmp_path):
    bucket = f"bs-nightly-{uuid.uuid4().hex[:6]}"
    samples = sorted((ROOT / "batchscore" / "demo" / "samples").glob("*.png"))[:12]
    for p in samples:
        put(f"gs://{bucket}/images/dt=2026-11-23/{p.name}", p.read_bytes())
    job = tmp_path / "nightly.yaml"
    job.write_text(yaml.safe_dump({"input": [f"gs://{bucket}/images/dt={{date}}/"],
                                   "output": f"gs://{bucket}/scores/dt={{date}}/", "top_k": 2}))
    first = submit(ray_head, "python", "jobs/nightly.py", "--config", str(job), "--date", "2026-11-23")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    output = f"gs://{bucket}/scores/dt=2026-11-23/"
    manifest = sink.read_manifest(output)
    frame = sink.read_committed(output).to_pandas()
    print(f"FIGURE ray job submit nightly: exit {first.returncode}, {len(frame)} rows committed in {output}")
    assert manifest["counts"]["rows"] == len(frame) == 12 and frame["error"].isna().all()
    assert "committed run" in first.stdout

    second = submit(ray_head, "python", "jobs/nightly.py", "--config", str(job), "--date", "2026-11-23")
    assert second.returncode == 0 and "already committed" in second.stdout, second.stdout[-2000:]
    assert sink.read_manifest(output)["run_id"] == manifest["run_id"]


def test_job_exit_status_tells_a_scheduler_what_happened(ray_head, tmp_path):
    bad = submit(ray_head, "python", "jobs/score.py", "--input", str(tmp_path / "nothing-here"),
                 "--output", str(tmp_path / "out"))
    assert bad.returncode != 0 and "ListingError" in bad.stdout + bad.stderr


# -- backfill -----------------------------------------------------------------------------

DATES = ["2026-11-01", "2026-11-02", "2026-11-03"]


def test_backfill_commits_each_date_reports_the_failed_one_and_resumes_only_it(ray_session, tmp_path, checkpoints):
    for i, day in enumerate(DATES):
        small_photos(tmp_path / "in" / f"dt={day}", 6, seed=20 + i)
    broken = tmp_path / "in" / f"dt={DATES[1]}"
    saved = {p.name: p.read_bytes() for p in broken.iterdir()}
    for p in broken.iterdir():
        p.write_bytes(b"")  # every image of this date is empty: over the error budget
    config = ScoreConfig(input=(str(tmp_path / "in" / "dt={date}"),), output=str(tmp_path / "out" / "dt={date}"),
                         model=str(checkpoints["vit"]), top_k=1)
    frame = batchscore.backfill(config, DATES)
    print(f"FIGURE backfill first pass:\n{frame.drop(columns=['output']).to_string(index=False)}")
    assert list(frame["partition"]) == DATES
    assert list(frame["status"]) == ["committed", "failed", "committed"]
    assert "ErrorBudgetExceeded" in frame.loc[1, "error"] and frame.loc[0, "rows"] == frame.loc[2, "rows"] == 6
    run_ids = {d: sink.read_manifest(str(tmp_path / "out" / f"dt={d}"))["run_id"] for d in (DATES[0], DATES[2])}

    for name, data in saved.items():
        (broken / name).write_bytes(data)
    again = batchscore.backfill(config, DATES)
    print(f"FIGURE backfill second pass:\n{again.drop(columns=['output']).to_string(index=False)}")
    assert list(again["status"]) == ["already_committed", "committed", "already_committed"]
    assert {d: sink.read_manifest(str(tmp_path / "out" / f"dt={d}"))["run_id"] for d in run_ids} == run_ids
    assert again.loc[1, "rows"] == 6


def test_dated_jobs_need_date_templates():
    with pytest.raises(ConfigError, match=r"needs '\{date\}' in its output template"):
        schedule.for_date(ScoreConfig(input=("a/dt={date}",), output="out"), "2026-11-01")
    with pytest.raises(ConfigError, match="expected YYYY-MM-DD, got '11/01/2026'"):
        schedule.date_range("11/01/2026", "2026-11-02")
    assert [d.isoformat() for d in schedule.date_range("2026-10-30", "2026-11-01")] == \
        ["2026-10-30", "2026-10-31", "2026-11-01"]
    # a baseline may name the same date of another output (another model's), filled in like the rest
    day = schedule.for_date(ScoreConfig(input=("a/dt={date}",), output="o/{date}", baseline="old/{date}"), "2026-11-01")
    assert (day.input, day.output, day.baseline) == (("a/dt=2026-11-01",), "o/2026-11-01", "old/2026-11-01")
    assert schedule.for_date(ScoreConfig(input=("a/{date}",), output="o/{date}"), "2026-11-01").baseline is None


# -- inspect ------------------------------------------------------------------------------

def test_inspect_prints_the_manifests_figures(ray_session, tmp_path, photos, checkpoints):
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "html.png").write_bytes(b"<html></html>")
    out = tmp_path / "out"
    batchscore.score(input=[str(folder)], output=str(out), model=str(checkpoints["deit"]), top_k=2,
                     max_error_fraction=1.0)
    manifest = json.loads((out / "_manifest.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "batchscore.cli", "inspect", str(out), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    counts = manifest["counts"]
    assert (report["rows"], report["scored"], report["errors"]) == (counts["rows"], counts["scored"], counts["errors"])
    assert report["errors_by_code"] == counts["errors_by_code"] == {"decode.empty": 1, "decode.unsupported_format": 1}
    assert sum(report["top1_labels"].values()) == counts["scored"] and report["mismatches"] == {}
    assert report["images_per_second"] == manifest["timings"]["images_per_second"]
    assert report["model"] == manifest["model"]["tag"]
    text = subprocess.run([sys.executable, "-m", "batchscore.cli", "inspect", str(out)],
                          capture_output=True, text=True, timeout=120).stdout
    print(f"FIGURE inspect:\n{text}")
    assert f"rows: {counts['rows']}  scored: {counts['scored']}  errors: {counts['errors']}" in text
    assert "MISMATCH" not in text

    # A part file changed behind the manifest's back fails inspect (exit 4), naming the part.
    first = out / manifest["files"][0]["name"]
    import pyarrow.parquet as pq

    rows = pq.read_metadata(first).num_rows
    pq.write_table(pq.read_table(first).slice(1), first)
    changed = subprocess.run([sys.executable, "-m", "batchscore.cli", "inspect", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 4
    assert f"part {first.name} holds {rows - 1} rows, its run's manifest says {rows}" in changed.stderr


def test_inspect_without_a_committed_run_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "batchscore.cli", "inspect", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no committed run (_SUCCESS is missing)" in proc.stderr


# -- cluster and Kubernetes files ---------------------------------------------------------

def test_cluster_yaml_passes_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    assert any(t["resources"].get("GPU") for t in types.values())
    broken = {**config, "available_node_types": {**types, "head": {**types["head"], "resourcez": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_kubernetes_cronjob_is_valid_yaml_holding_a_rayjob():
    cron = yaml.safe_load((ROOT / "jobs" / "k8s" / "nightly-cronjob.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    rayjob = yaml.safe_load(script.split("<<'YAML'", 1)[1].split("\n", 1)[1].rsplit("YAML", 1)[0])
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["entrypoint"] == "python jobs/nightly.py --config jobs/configs/nightly.yaml"
    assert (ROOT / "jobs" / "configs" / "nightly.yaml").is_file()


def test_backfill_notebook_runs_on_the_embedded_default(ray_session):
    notebook = json.loads((ROOT / "examples" / "backfill.ipynb").read_text())
    scope: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "backfill.ipynb", "exec"), scope)  # noqa: S102
    assert list(scope["result"]["status"]) == ["committed"] * 3 and scope["result"]["rows"].sum() == 60
    assert set(scope["again"]["status"]) == {"already_committed"}
    shutil.rmtree(scope["root"], ignore_errors=True)
