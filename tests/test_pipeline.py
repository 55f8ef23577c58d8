"""End to end on a real local Ray: rows, errors, schema, plan, commit, CLI and Python API."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import batchscore
from batchscore import pipeline, plan
from batchscore.checkpoints import models
from batchscore.config import ScoreConfig
from batchscore.driver import runtime
from batchscore.exceptions import ConfigError, ListingError, SinkError
from batchscore.inputs import listing, read
from batchscore.outputs import write
from batchscore.plan import listing_spec

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def mixed_inputs(session_tmp, photos) -> tuple[Path, dict[str, str]]:
    """Real photos plus bad files; returns the folder and {bad file name: expected error prefix}."""
    d = session_tmp / "mixed"
    shutil.copytree(photos, d)
    good_jpeg = (photos / "rocket.jpg").read_bytes()
    good_png = (photos / "chelsea.png").read_bytes()
    bad = {
        "zero-bytes.jpg": (b"", "decode.empty: empty file"),
        "random-bytes.png": (os.urandom(3000), "decode.unsupported_format: not an image in an allowed format"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], "decode.truncated: image file is truncated"),
        "truncated.png": (good_png[: len(good_png) // 3], "decode.truncated: "),
        "not-really.jpg": (b"<!doctype html><title>403</title>", "decode.unsupported_format: not an image in an allowed format"),
    }
    for name, (data, _) in bad.items():
        (d / name).write_bytes(data)
    return d, {name: reason for name, (_, reason) in bad.items()}


@pytest.fixture(scope="module")
def mixed_run(ray_session, mixed_inputs, checkpoints, session_tmp):
    folder, _ = mixed_inputs
    config = ScoreConfig(input=(str(folder),), output=str(session_tmp / "out-mixed"), model=str(checkpoints["deit"]),
                         top_k=3, batch_size=4, rows_per_file=8, max_error_fraction=1.0)
    return pipeline.score(config)


def test_rows_out_equal_rows_in_and_exactly_the_bad_files_are_flagged(mixed_run, mixed_inputs):
    folder, bad = mixed_inputs
    frame = mixed_run.to_pandas()
    names = frame["id"].map(lambda i: i.rsplit("/", 1)[-1])
    assert sorted(names) == sorted(p.name for p in folder.iterdir())
    assert frame["id"].is_unique
    flagged = dict(zip(names[frame["error"].notna()], frame["error"][frame["error"].notna()]))
    assert set(flagged) == set(bad)
    for name, reason in bad.items():
        assert flagged[name].startswith(reason), (name, flagged[name])
    good = frame[frame["error"].isna()]
    assert good["labels"].map(len).eq(3).all() and good["probs"].map(len).eq(3).all()
    assert frame[frame["error"].notna()]["labels"].isna().all()
    print(f"FIGURE rows in {len(list(folder.iterdir()))}, rows out {len(frame)}, errors {mixed_run.errors}")
    assert mixed_run.rows == len(frame) and mixed_run.errors == len(bad)
    codes = collections.Counter(reason.split(":", 1)[0] for reason in bad.values())
    assert mixed_run.errors_by_code == dict(codes)
    assert (frame["error_code"] == frame["error"].str.split(":").str[0]).sum() == len(bad)


def test_output_reads_back_without_ray_and_matches_the_schema_file(mixed_run):
    spec = json.loads((ROOT / "schemas" / "predictions.v1.json").read_text())
    expected = {f["name"]: f["type"] for f in spec["fields"]}
    out = Path(mixed_run.output)
    manifest = json.loads((out / "_manifest.json").read_text())
    files = [out / f["name"] for f in manifest["files"]]
    assert len(files) == len(mixed_run.files) >= 2  # rows_per_file=8 splits the output
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(p.name for p in files)
    arrow = {"string": pa.string(), "list<string>": pa.list_(pa.string()), "list<float32>": pa.list_(pa.float32())}
    for path in files:
        schema = pq.read_schema(path)
        assert schema.names == list(expected)
        for field in schema:
            assert not isinstance(field.type, pa.ExtensionType), field
            assert field.type == arrow[expected[field.name]], field
        assert {f.name for f in schema if not f.nullable} == {f["name"] for f in spec["fields"] if not f["nullable"]}
    frame = pd.concat(pd.read_parquet(p) for p in files)
    assert len(frame) == manifest["counts"]["rows"] == manifest["counts"]["inputs"]
    assert frame["model"].nunique() == 1 and frame["model"].iloc[0].startswith("ckpt-deit@sha256:")
    assert (frame["run_id"] == manifest["run_id"]).all()
    assert manifest["counts"]["errors"] == frame["error"].notna().sum()
    assert sum(f["rows"] for f in manifest["files"]) == len(frame)


def test_commit_markers_are_written_after_the_data(mixed_run):
    out = Path(mixed_run.output)
    parts = [out / name for name in mixed_run.files]
    success, manifest = out / "_SUCCESS", out / "_manifest.json"
    assert success.read_text().strip() == mixed_run.run_id
    assert max(p.stat().st_mtime_ns for p in parts) <= manifest.stat().st_mtime_ns <= success.stat().st_mtime_ns
    assert not (out / "_staging").exists()
    written = json.loads(manifest.read_text())
    assert written["config"]["top_k"] == 3 and written["config"]["max_error_fraction"] == 1.0
    assert len(written["inputs_sha256"]) == 64 and len(written["model"]["weights_sha256"]) == 64


def ray_workers_of_this_process() -> list[int]:
    """PIDs of the worker processes of the local Ray this test process started (children of
    its raylet, which is a child of this process)."""
    def children(pid: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return found

    raylets = [c for c in children(os.getpid()) if b"raylet" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert raylets, "no raylet started by this test process"
    return [w for r in raylets for w in children(r)]


def test_write_tasks_run_in_workers_of_their_own(mixed_run):
    """The write tasks carry a runtime env of their own (runtime.WRITE_RUNTIME_ENV), so Ray
    runs them only in workers started for it, never in the workers that decode: those import
    torch for the resize, the writers do not (on 2 cores a write task used to take the idle
    decode worker, so two workers imported torch: docs/benchmarks.md)."""
    marker = "".join(f"{k}={v}" for k, v in runtime.WRITE_RUNTIME_ENV["env_vars"].items()).encode()
    writers, others = [], []
    for pid in ray_workers_of_this_process():
        try:
            environ, maps = Path(f"/proc/{pid}/environ").read_bytes(), Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # exited meanwhile
            continue
        (writers if marker in environ.split(b"\0") else others).append((pid, "libtorch" in maps))
    assert len(mixed_run.files) >= 2 and writers, f"no worker with {marker!r}: write tasks ran in shared workers"
    assert not any(torch for _, torch in writers), f"a write worker imported torch: {writers}"
    assert any(torch for _, torch in others)  # the control: the decode worker did (and the actor, while it ran)


def test_rerun_on_committed_output_is_a_noop_and_overwrite_replaces(ray_session, mixed_run, mixed_inputs,
                                                                    checkpoints):
    folder, _ = mixed_inputs
    config = ScoreConfig(input=(str(folder),), output=mixed_run.output, model=str(checkpoints["deit"]), top_k=3,
                         max_error_fraction=1.0)
    before = {p.name: p.stat().st_mtime_ns for p in Path(mixed_run.output).iterdir()}
    again = pipeline.score(config)
    after = {p.name: p.stat().st_mtime_ns for p in Path(mixed_run.output).iterdir()}
    print(f"FIGURE re-run on committed output: status {again.status}, {len(after)} entries, "
          f"{sum(before.get(k) != v for k, v in after.items())} changed")
    assert again.status == "already_committed" and again.run_id == mixed_run.run_id
    assert after == before  # nothing written, not even a lease
    replaced = pipeline.score(config.with_overrides(overwrite=True, top_k=1))
    assert replaced.status == "committed" and replaced.run_id != mixed_run.run_id
    out = Path(mixed_run.output)
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(replaced.files)  # old parts gone
    assert replaced.to_pandas()["labels"].dropna().map(len).eq(1).all()


def test_local_ray_listens_on_loopback_only(ray_session):
    assert {n["NodeManagerAddress"] for n in ray_session.nodes()} == {"127.0.0.1"}
    assert ray_session.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_local_ray_keeps_idle_workers_beyond_the_cpu_count(ray_session, tmp_path):
    """More workers than CPUs, then idle: Ray's default kills the surplus after 1 s (this
    test fails with IDLE_WORKER_SECONDS = 1), and a decode task held back by the object store
    bound would then pay a new worker's start. The local Ray that batchscore starts keeps
    them (runtime.IDLE_WORKER_SECONDS).

    Four distinct workers are made sure of by a barrier, not by timing: each task waits until
    all four have written their pid, so no worker can run two of them. Load can only delay a
    kill (a false pass with Ray's default), never cause one within 3 s of a 60 s setting."""
    barrier = str(tmp_path)

    @ray_session.remote(num_cpus=0.5)
    def worker_pid() -> int:
        Path(barrier, str(os.getpid())).write_text("")
        deadline = time.monotonic() + 120
        while len(list(Path(barrier).iterdir())) < 4:
            assert time.monotonic() < deadline, "four tasks never ran at once"
            time.sleep(0.01)
        return os.getpid()

    pids = set(ray_session.get([worker_pid.remote() for _ in range(4)]))
    assert len(pids) == 4
    time.sleep(3.0)
    assert all(Path(f"/proc/{pid}").exists() for pid in pids), "idle workers were killed"


def run_plan(config: ScoreConfig, folder) -> plan.RunPlan:
    """The run's plan, its listing written as the driver writes it into a staging folder."""
    job = plan.prepare(config)
    resources = runtime.actor_resources(plan.actor_spec(config))
    made = plan.physical(config, job, models.resolve(config.model), ray.cluster_resources(), resources)
    job.inputs.write(fsspec.filesystem("file"), str(folder / "_listing"), made.task_bounds())
    return made


def test_decode_is_a_separate_cpu_operator(ray_session, capsys, checkpoints, photos, monkeypatch, tmp_path):
    config = ScoreConfig(input=(str(photos),), output="unused", model=str(checkpoints["vit"]))
    planned = run_plan(config, tmp_path)
    part = write.PartSpec(output="unused", run_id="r", model=planned.model.tag)

    def physical_plan(made: plan.RunPlan) -> str:
        pipeline.build_dataset(made, made.job.inputs, None, part).explain()
        return capsys.readouterr().out.split("Physical Plan (Optimized) --------")[1]

    physical = physical_plan(planned)
    print(physical)
    assert "TaskPoolMapOperator[MapBatches(read_batch)->MapBatches(decode_batch)]" in physical
    assert "ActorPoolMapOperator[MapBatches(Predictor)]" in physical
    assert "TaskPoolMapOperator[MapBatches(write_part)]" in physical  # workers write, not the actor
    # Negative control: with equal remote args Ray does fuse decode into the model actor (the
    # actor's runtime env, which alone would keep them apart, is off when the user sets OpenMP's).
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    fused = physical_plan(dataclasses.replace(planned, resources=runtime.ActorResources(cpus=0.5, gpus=0.0)))
    assert "ActorPoolMapOperator[MapBatches(read_batch)->MapBatches(decode_batch)->MapBatches(Predictor)]" in fused


def test_read_tasks_start_at_one_model_batch_then_grow(ray_session, tmp_path):
    """The first four read tasks hold one model batch each (first rows come early), the rest
    `block` files (fewer tasks: Ray Data's cost on the driver is per task); each task is a
    row group of a listing shard in the staging folder, and order, ids and listing indexes
    are kept. With `todo` (resume) only the inputs still to score are read."""
    entries = [listing.Entry(id=f"/x/f{i:02d}.jpg", uri=f"/x/f{i:02d}.jpg", kind="file", rows=1) for i in range(70)]
    inputs = listing.Listing.of(entries)
    bounds = read.task_bounds(70, False, batch=8, block=16)
    assert bounds == [0, 8, 16, 24, 32, 48, 64, 70]
    inputs.write(fsspec.filesystem("file"), str(tmp_path / "_listing"), bounds)
    assert inputs.table is None  # the driver no longer holds the listing
    ds = read.dataset(inputs, None)
    assert ds.count() == 7  # one row per read task
    read_tasks = ds.take_all()
    assert [[i for i, _ in read.entries(t)] for t in read_tasks][4] == list(range(32, 48))
    rows = [r for t in read_tasks for r in read.entries(t)]
    assert [e.id for _, e in rows] == [e.id for e in entries] and [i for i, _ in rows] == list(range(70))
    assert inputs.ids([0, 69]) == ["/x/f00.jpg", "/x/f69.jpg"]  # read back from the shards
    todo = np.zeros(70, dtype=bool)
    todo[[3, 4, 5, 40, 69]] = True
    left = read.tasks(inputs, todo)
    assert [json.loads(t["ranges"]) for t in left] == [[[3, 6]], [[40, 41]], [[69, 70]]]
    assert [i for t in left for i, _ in read.entries(t)] == [3, 4, 5, 40, 69]


def test_object_store_is_bounded_per_actor(ray_session, checkpoints, photos, tmp_path):
    """Decode may run ahead of the model only by decoded_queue_mb per actor: the run's own
    Ray Data context carries the bound; the process-wide context is left alone."""
    config = ScoreConfig(input=(str(photos),), output="unused", model=str(checkpoints["vit"]),
                         decoded_queue_mb=48, actors=(1, 3), cpus_per_actor=0.4)
    entries = listing.list_inputs(listing_spec(config))
    planned = run_plan(config, tmp_path)
    ds = pipeline.build_dataset(planned, planned.job.inputs, None, write.PartSpec(output="unused", run_id="r", model="m"))
    assert ds.context.execution_options.resource_limits.object_store_memory == 48 * 2**20 * 3
    assert ray_session.data.DataContext.get_current().execution_options.resource_limits.object_store_memory != 48 * 2**20 * 3
    # A bound this tight still scores every image (Ray Data always lets one task per stage run).
    tight = ScoreConfig(input=(str(photos),), output=str(tmp_path / "out"), model=str(checkpoints["vit"]),
                        decoded_queue_mb=16)
    result = pipeline.score(tight)
    assert result.rows == len(entries) and result.status == "committed"


def test_equal_decode_and_actor_cpus_are_refused(ray_session):
    with pytest.raises(ConfigError, match="must differ from decode_cpus"):
        runtime.actor_resources(plan.actor_spec(ScoreConfig(cpus_per_actor=0.5, decode_cpus=0.5)))


def test_actors_sized_to_leave_decode_a_cpu(ray_session, monkeypatch, caplog):
    """On the session's local Ray (one node, 2 CPUs): a pool of two shares what decode and a
    write leave (a floor of 1 CPU each took both CPUs, and decode waited forever); sizes that
    fit no node or starve decode are a bad job here, and a warning on a cluster (an autoscaler
    may add nodes)."""
    spare = ScoreConfig().decode_cpus + runtime.WRITE_CPUS
    pair = runtime.actor_resources(plan.actor_spec(ScoreConfig(actors=(2, 2))))
    assert 0 < pair.cpus < 1 and 2 * pair.cpus + spare <= 2
    assert runtime.actor_resources(plan.actor_spec(ScoreConfig(decode_cpus=1.0))).cpus == pytest.approx(2 - 1.0 - runtime.WRITE_CPUS)
    with pytest.raises(ConfigError, match=r"leave no CPU for decode tasks \(0.5 each\) on the cluster's 2 CPUs"):
        runtime.actor_resources(plan.actor_spec(ScoreConfig(cpus_per_actor=2)))
    with pytest.raises(ConfigError, match=r"fit no node of the Ray cluster \(the largest has 2 CPUs\)"):
        runtime.actor_resources(plan.actor_spec(ScoreConfig(cpus_per_actor=3)))
    monkeypatch.setattr(runtime, "_STARTED_GCS", None)  # a cluster started elsewhere
    with caplog.at_level("WARNING", logger="batchscore.driver.runtime"):
        assert runtime.actor_resources(plan.actor_spec(ScoreConfig(cpus_per_actor=3))).cpus == 3
    assert any("waits until an autoscaler adds nodes" in r.getMessage() for r in caplog.records)


def test_actor_gets_the_cpus_left_by_decode(ray_session, monkeypatch):
    res = runtime.actor_resources(plan.actor_spec(ScoreConfig()))
    assert (res.cpus, res.gpus) == (2 - 0.5 - runtime.WRITE_CPUS, 0.0)  # 2 CPUs in the test cluster, 0.5 for decode
    # Its OpenMP threads sleep rather than spin at barriers, as it shares cores; not on a GPU,
    # and never against the user's own setting. A local Ray started by batchscore gives every
    # worker that setting (so the actor needs no runtime env, and starts in a waiting worker);
    # on any other Ray the actor carries it.
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert ray.get(ray.remote(lambda: os.environ.get("OMP_WAIT_POLICY")).remote()) == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ  # the driver's own environment is left as it was
    assert res.runtime_env() == {}
    monkeypatch.setattr(runtime, "_WORKERS_ENV_GCS", None)  # a cluster, or a Ray started elsewhere
    assert res.runtime_env() == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    assert runtime.ActorResources(cpus=1.0, gpus=1.0).runtime_env() == {}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert res.runtime_env() == {}
    with pytest.raises(ConfigError, match="device=cuda needs gpus_per_actor > 0"):
        runtime.actor_resources(plan.actor_spec(ScoreConfig(device="cuda")))


def test_nothing_is_committed_when_rows_go_missing(ray_session, tmp_path, photos, checkpoints, monkeypatch):
    """If a stage ever dropped rows, the run must fail instead of committing partial output:
    here the rows of two inputs never reach the (real) write stage."""

    def losing_dataset(run_plan, inputs, todo, part):
        rows = [{"id": e.id, "labels": ["can"], "probs": [0.9], "error": None, "error_code": None,
                 "meta": json.dumps({"source": e.id, "index": i, "passthrough": {}})}
                for i, e in list(enumerate(inputs.entries()))[:-2]]
        return ray_session.data.from_items(rows).map_batches(write.write_part, fn_kwargs={"spec": part},
                                                             batch_format="pyarrow")

    monkeypatch.setattr(pipeline, "build_dataset", losing_dataset)
    config = ScoreConfig(input=(str(photos),), output=str(tmp_path / "out"), model=str(checkpoints["vit"]))
    n = len(list(photos.iterdir()))
    with pytest.raises(SinkError, match=rf"expected one row per input \({n} inputs, {n} rows known in advance\) "
                                             rf"but wrote {n - 2} rows: 2 input\(s\) gave no row"):
        pipeline.score(config)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_python_api(ray_session, tmp_path, photos, checkpoints):
    result = batchscore.score(input=[str(photos / "chelsea.png"), str(photos / "coffee.png")],
                              output=str(tmp_path / "api"), model=str(checkpoints["beit"]), top_k=2)
    assert result.status == "committed" and result.rows == 2 and result.errors == 0
    frame = result.to_pandas()
    assert list(frame.columns) == ["id", "source", "labels", "probs", "error", "error_code", "model", "run_id"]
    assert (frame["source"] == frame["id"]).all()  # an image file is its own source
    assert "committed run" in result.summary() and "2 rows" in result.summary()


def test_glob_and_file_inputs_are_taken_as_given(tmp_path, photos):
    entries = listing.list_inputs(listing_spec(ScoreConfig(
        input=(str(photos / "*.png"), str(photos / "rocket.jpg"), str(photos / "rocket.jpg")), extensions=(".jpg",))))
    names = [e.id.rsplit("/", 1)[-1] for e in entries]
    assert names == sorted(names) and "rocket.jpg" in names and names.count("rocket.jpg") == 1
    assert all(n.endswith((".png", ".jpg")) for n in names)
    with pytest.raises(ListingError, match="no such file or directory"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path / "missing"),))))
    with pytest.raises(ListingError, match="the glob matched no file"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path / "*.jpg"),))))


def test_demo_accuracy(ray_session, tmp_path):
    from batchscore import demo

    result = demo.run(ScoreConfig(output=str(tmp_path / "demo")))
    print(f"FIGURE demo accuracy {result.accuracy:.3f} on {result.labelled} held-out digits")
    assert result.labelled == 360 and result.run.errors == 0
    assert result.accuracy >= 0.9


def run_cli(*args: str, cwd: Path = ROOT, ray_address: str | None = None) -> subprocess.CompletedProcess:
    """`python -m batchscore.cli ARGS`: on the Ray at `ray_address`, or with no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, "-m", "batchscore.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_end_to_end_with_progress_in_a_non_tty_log(tmp_path, mixed_inputs, checkpoints, ray_session):
    """On the session's Ray (a run that starts its own: test_notebook.py, test_runtime_lean.py)."""
    folder, bad = mixed_inputs
    out = tmp_path / "cli-out"
    proc = run_cli("score", "--input", str(folder), "--output", str(out), "--model", str(checkpoints["vit"]),
                   "--progress-seconds", "0.1", "--batch-size", "4", "--max-error-fraction", "1",
                   ray_address=ray_session.get_runtime_context().gcs_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(list(folder.iterdir()))
    assert f"{n} rows, {n - len(bad)} scored, {len(bad)} errors (decode." in proc.stdout
    assert f"progress: {n}/{n} images (100.0%)" in proc.stderr
    assert (out / "_SUCCESS").exists()
    again = run_cli("score", "--input", str(folder), "--output", str(out), "--model", str(checkpoints["vit"]))
    assert again.returncode == 0 and "already committed" in again.stdout


def test_cli_bad_job_exits_2_with_a_clear_message(tmp_path):
    proc = run_cli("score", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model",
                   str(tmp_path / "no-such-model"))
    assert proc.returncode == 2
    assert "ModelError" in proc.stderr and "no-such-model" in proc.stderr and "never downloads" in proc.stderr
    proc = run_cli("score", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "input: expected at least one directory" in proc.stderr
