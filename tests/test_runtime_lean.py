"""The local Ray batchscore starts runs only what a local run needs (runtime.start_local_ray),
and still does what batchscore asks of it; connecting to a cluster is unchanged.

The session already runs a Ray (conftest's ray_session), so the lean Ray is started in a
child Python process of its own, with its own temp dir, on loopback; the child stops it
(`ray.shutdown()`) and reports the PIDs it saw, which this test checks are gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys, time
import ray
from ray._private import ray_constants
from ray._private.node import Node
from batchscore.driver.runtime import start_local_ray

methods = {name: Node.__dict__[name] for name in ("start_api_server", "start_monitor")}
started = time.monotonic()
start_local_ray(num_cpus=2, _temp_dir=sys.argv[1])
report = {"init_seconds": time.monotonic() - started,
          "node_methods_restored": all(Node.__dict__[n] is f for n, f in methods.items()),
          "reporter_env_restored": "REPORTER_UPDATE_INTERVAL_MS" not in os.environ}
node = ray._private.worker._global_node
report["node_processes"] = sorted(node.all_processes)
report["raylet_pid"] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
report["gcs_pid"] = node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process.pid

from ray._common.usage import usage_lib
report["usage_stats_enabled"] = usage_lib.usage_stats_enabled()

# An actor with a runtime_env, as batchscore's inference actor has on a cluster (OMP_WAIT_POLICY).
@ray.remote(num_cpus=0.5, runtime_env={"env_vars": {"BATCHSCORE_LEAN_PROBE": "actor"}})
class Probe:
    def env(self):
        return os.environ.get("BATCHSCORE_LEAN_PROBE"), os.environ.get("RAY_USAGE_STATS_ENABLED")

probe = Probe.remote()
report["actor_env"] = ray.get(probe.env.remote(), timeout=60)
ray.kill(probe)

# Ray Data: a task stage, then an actor pool with a runtime_env, as batchscore builds its plan.
import ray.data

class Tag:
    def __init__(self):
        self.value = os.environ.get("BATCHSCORE_LEAN_PROBE")
    def __call__(self, batch):
        return {"id": batch["id"], "tag": [self.value] * len(batch["id"])}

ds = (ray.data.range(64, override_num_blocks=4)
      .map_batches(lambda b: {"id": b["id"] * 2}, num_cpus=0.5)
      .map_batches(Tag, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
                   runtime_env={"env_vars": {"BATCHSCORE_LEAN_PROBE": "data"}}))
rows = ds.take_all()
report["data_rows"], report["data_sum"] = len(rows), sum(int(r["id"]) for r in rows)
report["data_tags"] = sorted({r["tag"] for r in rows})

def stat(pid):
    text = open(f"/proc/{pid}/stat").read()
    return text[text.rfind(")") + 2:].split()  # fields from the state on: [1] ppid, [19] start time

children = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            children.setdefault(int(stat(entry)[1]), []).append(int(entry))
        except OSError:
            pass
pids = [os.getpid()]
for pid in pids:
    pids.extend(children.get(pid, []))
tree = []
for pid in pids[1:]:
    try:
        entry = {"pid": pid, "start": stat(pid)[19],
                 "cmdline": open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()}
        # The raylet's environment, which the agents it starts inherit (theirs cannot be read
        # back: retitling a process overwrites the start of /proc/<pid>/environ).
        if "raylet/raylet " in entry["cmdline"]:
            env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
            entry["environ"] = dict(e.split("=", 1) for e in env if e.startswith(("REPORTER_", "RAY_USAGE")))
        tree.append(entry)
    except OSError:
        pass
report["tree"] = tree
# The ports the node's processes wrote; the dashboard agent writes -1 for the metrics export
# port when it collects no metrics (and serves no Prometheus endpoint).
session = node.get_session_dir_path()
report["ports"] = {f.rsplit("_", 1)[0]: open(os.path.join(session, f)).read().strip()
                   for f in os.listdir(session) if "_port_" in f}

ray.shutdown()
deadline = time.monotonic() + 15
def running(pid):  # not gone, and not a zombie waiting for this process to reap it
    try:
        return stat(pid)[0] != "Z"
    except OSError:
        return False

while time.monotonic() < deadline and any(running(report[k]) for k in ("raylet_pid", "gcs_pid")):
    time.sleep(0.2)
report["alive_after_shutdown"] = [k for k in ("raylet_pid", "gcs_pid") if running(report[k])]
print(json.dumps(report))
"""


def _leftovers(tree: list[dict]) -> list[dict]:
    """The child's Ray processes still running: same PID and start time as the child saw."""
    left = []
    for entry in tree:
        try:
            text = Path(f"/proc/{entry['pid']}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if fields[19] == entry["start"] and fields[0] != "Z":
            left.append(entry)
    return left


@pytest.fixture(scope="module")
def lean_child(tmp_path_factory):
    """Starts a lean local Ray in a child process; returns what the child saw."""
    temp = tmp_path_factory.mktemp("ray-lean")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(temp)], capture_output=True, text=True, timeout=180,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 10
    while _leftovers(report["tree"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    report["leftovers"] = _leftovers(report["tree"])
    for entry in report["leftovers"]:  # only the processes this child started, by PID
        os.kill(entry["pid"], signal.SIGKILL)
    return report


def test_lean_local_ray_runs_no_dashboard_no_autoscaler_monitor(lean_child):
    cmdlines = [e["cmdline"] for e in lean_child["tree"]]
    assert not [c for c in cmdlines if "dashboard/dashboard.py" in c or c.startswith("ray-dashboard-")], cmdlines
    assert not [c for c in cmdlines if "autoscaler/_private/monitor.py" in c], cmdlines
    assert "dashboard" not in lean_child["node_processes"] and "monitor" not in lean_child["node_processes"]
    # What a local run needs is there: GCS, raylet, its two agents, the log monitor.
    for needed in ("gcs_server", "raylet/raylet", "log_monitor.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        assert any(needed in c for c in cmdlines), (needed, cmdlines)
    # Usage stats off; the agent collects no metrics and reports node stats once a minute.
    assert lean_child["usage_stats_enabled"] is False
    assert lean_child["ports"]["metrics_export_port"] == "-1", lean_child["ports"]
    raylet = next(e for e in lean_child["tree"] if "environ" in e)
    assert raylet["environ"] == {"REPORTER_UPDATE_INTERVAL_MS": "60000", "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray's Node and the driver's environment are as they were once Ray has started.
    assert lean_child["node_methods_restored"] and lean_child["reporter_env_restored"]


def test_lean_local_ray_runs_actors_with_runtime_env_and_ray_data(lean_child):
    assert lean_child["actor_env"] == ["actor", "0"]
    assert lean_child["data_rows"] == 64 and lean_child["data_sum"] == 2 * sum(range(64))
    assert lean_child["data_tags"] == ["data"]


def test_lean_local_ray_stops_with_ray_shutdown(lean_child):
    assert lean_child["alive_after_shutdown"] == []
    assert lean_child["leftovers"] == [], lean_child["leftovers"]


# -- what start_local_ray and ensure_ray ask of ray.init (no Ray started) ---------------------

class _FakeInit:
    """Stands in for ray.init: records its kwargs and what Ray's Node looked like then."""

    def __init__(self):
        from ray._private.node import Node

        self.node = Node
        self.original = {n: Node.__dict__[n] for n in ("start_api_server", "start_monitor")}
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append({"args": args, "kwargs": kwargs,
                           "node_patched": {n: self.node.__dict__[n] is not f for n, f in self.original.items()},
                           "reporter_env": os.environ.get("REPORTER_UPDATE_INTERVAL_MS"),
                           "omp_env": os.environ.get("OMP_WAIT_POLICY")})


@pytest.fixture
def fake_init(monkeypatch):
    import ray

    fake = _FakeInit()
    monkeypatch.setattr(ray, "init", fake)
    monkeypatch.delenv("REPORTER_UPDATE_INTERVAL_MS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", os.environ.get("RAY_USAGE_STATS_ENABLED", "0"))
    yield fake
    assert all(fake.node.__dict__[n] is f for n, f in fake.original.items())


def test_lean_start_leaves_out_dashboard_monitor_metrics_and_task_events(fake_init):
    from batchscore.driver.runtime import IDLE_WORKER_SECONDS, start_local_ray

    start_local_ray(num_cpus=2, _system_config={"task_events_report_interval_ms": 500})
    (call,) = fake_init.calls
    kw = call["kwargs"]
    assert kw["address"] == "local" and kw["_node_ip_address"] == "127.0.0.1" and kw["include_dashboard"] is False
    assert kw["_system_config"] == {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_SECONDS * 1000,
                                    "enable_metrics_collection": False,
                                    "task_events_report_interval_ms": 500}  # the caller's value wins
    assert call["node_patched"] == {"start_api_server": True, "start_monitor": True}
    assert call["reporter_env"] == "60000" and "REPORTER_UPDATE_INTERVAL_MS" not in os.environ
    # what Ray's processes inherit while it starts, and the driver's own environment after
    assert call["omp_env"] == "PASSIVE" and "OMP_WAIT_POLICY" not in os.environ
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("kwargs", [{"include_dashboard": True, "dashboard_port": 18265}, {"lean": False}])
def test_a_dashboard_asked_for_or_lean_off_starts_ray_as_ray_does(fake_init, kwargs):
    from batchscore.driver.runtime import IDLE_WORKER_SECONDS, start_local_ray

    start_local_ray(**kwargs)
    (call,) = fake_init.calls
    assert call["kwargs"]["_system_config"] == {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_SECONDS * 1000}
    assert call["node_patched"] == {"start_api_server": False, "start_monitor": False}
    assert call["reporter_env"] is None
    assert call["kwargs"].get("include_dashboard") == kwargs.get("include_dashboard")


def test_connecting_to_a_cluster_is_unchanged(fake_init, monkeypatch):
    import ray

    from batchscore.driver import runtime

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", ctx.enable_progress_bars)  # ensure_ray sets it
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    runtime.ensure_ray()
    (call,) = fake_init.calls
    assert call["args"] == () and call["kwargs"] == {"log_to_driver": True}
    assert call["node_patched"] == {"start_api_server": False, "start_monitor": False}
