"""Ray runtime: connect or start Ray, and size the inference actors from the cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

import ray
from ray._private import ray_constants
from ray._private.node import Node

from batchscore.config import default
from batchscore.driver.progress import (  # option: the caller's terms, --cpus-per-actor or cpus_per_actor=
    bar_shown,
    option,
)
from batchscore.exceptions import ConfigError

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connects to the cluster in RAY_ADDRESS (as `ray job submit` sets it) or starts a local one."""
    if ray.is_initialized():
        return
    quiet_ray_logs()
    with sigterm_kept():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # A private local Ray on loopback, with only the processes a local run needs.
            start_local_ray()
    ctx = ray.data.DataContext.get_current()
    # Ray's bars redraw in place; in a log (non-TTY) batchscore's own progress lines stand
    # instead, and a Python caller's tqdm bar (batchscore.driver.progress) replaces them.
    ctx.enable_progress_bars = sys.stderr.isatty() and not bar_shown()
    log.info("expected: Ray's 'E ... core_worker.cc: ... has constructor arguments in the object store' line, once "
             "per run: Ray Data keeps its actors' arguments there while a run lasts (docs/operations.md)")


@contextlib.contextmanager
def sigterm_kept():
    """SIGTERM handled by Python while Ray starts and after: Ray's core worker installs a C++
    handler for it while it connects (it prints a stack and crashed the driver with SIGSEGV
    when SIGTERM came then, or within ~0.3 s after `ray.init`); the Python handler in place
    before (the CLI's exit 15, or Ray's own `sys.exit`) is installed again as soon as `ray.init`
    returns. While Ray starts, SIGTERM waits (blocked in this thread, and in the threads it
    starts meanwhile, Ray's among them: enter it before starting any), then comes to it.
    Only from the main thread (the only one Python handles signals in); it may be nested."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not None:  # None: not installed from Python, left as it is
            signal.signal(signal.SIGTERM, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# Ray's log lines that say nothing about a batchscore run: (logger, start of the message).
# "Progress bars disabled": batchscore's own progress stands in for Ray Data's bars (above).
# "Token authentication is enabled": Ray's default for a local cluster, said on every start
# (docs/operations.md says it once).
RAY_NOISE = (("ray.data._internal.progress", "Progress bars disabled"),
             ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for"))


class _Drop(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_ray_logs() -> None:
    """Before Ray starts in this process: Ray's known noise left out of the driver's log.

    - Workers' log lines reach the driver without ANSI colour codes when stderr is not a
      terminal (`RAY_COLOR_PREFIX=0`, read by Ray as it prints each line; one set wins).
    - RAY_NOISE messages are dropped from Ray's loggers.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name, start in RAY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.start == start for f in logger.filters):
            logger.addFilter(_Drop(start))


def loopback_only() -> None:
    """Makes a Ray started from this process listen on 127.0.0.1 only.

    Ray replaces `_node_ip_address="127.0.0.1"` by the machine's address (its
    `resolve_ip_for_localhost`) unless it believes clusters are off, as on macOS and Windows;
    then every Ray server binds to loopback (checked by tests/test_pipeline.py). Children
    (raylet, workers) read the environment variable; this process's Ray is already imported,
    so its constant is set as well.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# Ray kills a worker idle for 1 s once a node has more workers than CPUs, which Ray Data's own
# actors already make it have. A decode task held back by the object store bound then finds
# its worker gone, and each new worker costs ~5 s of CPU to start (ray, ray.data, pyarrow):
# on 2 cores, ViT-B/16 fell from 7.95 to 5.63 images/s with 19 decode workers started in a
# run instead of 2 (docs/benchmarks.md). Clusters get the same setting from cluster.yaml.
IDLE_WORKER_SECONDS = 60


# What a local run goes without when no dashboard is asked for (figures:
# `bench/overhead.py --ray-footprint`). Nothing reads them: the dashboard and the state API
# (`ray.util.state`, `ray list`) are what consume metrics and task events, and `ray status`
# is what reads the autoscaler monitor; a single node started by this process has nothing to
# autoscale.
LEAN_SYSTEM_CONFIG = {
    # Workers, raylet and GCS stop recording metrics and pushing them to the metrics agent every
    # few seconds; the raylet starts the dashboard agent with --disable-metrics-collection.
    "enable_metrics_collection": False,
    # Every task and actor call stops sending its state changes to the GCS (the state API's
    # and the dashboard's task table, `ray timeline`).
    "task_events_report_interval_ms": 0,
}
# The dashboard agent (started by the raylet, which cannot run without it) still gathers the
# node's process, disk and network stats for the dashboard every 5 s; with no dashboard, once
# a minute is plenty. Read by the agent only, from the environment it inherits at start.
LEAN_AGENT_ENV = {"REPORTER_UPDATE_INTERVAL_MS": "60000"}


def start_local_ray(*, lean: bool = True, **kwargs) -> None:
    """Starts a private single-node Ray on loopback (kwargs go to `ray.init`); never joins a
    cluster found on the machine (`address="local"`). Idle workers live IDLE_WORKER_SECONDS.

    With `lean` (the default) and no dashboard asked for (by `include_dashboard=True`), Ray
    starts only what a local run uses: GCS, raylet (with the runtime env agent, which actors
    with a `runtime_env` need, and the dashboard agent, which the raylet cannot run without),
    the log monitor (workers' log lines reach the driver) and the workers. Left out: the dashboard
    process (with `include_dashboard=False` Ray still starts it, loading only its usage stats
    module), the autoscaler monitor, usage stats, metrics and task events (LEAN_SYSTEM_CONFIG).
    With a dashboard asked for, or `lean=False`, Ray starts as it chooses (usage stats off).
    Connecting to a cluster (`ensure_ray` with RAY_ADDRESS) never comes here.
    """
    loopback_only()
    # ray.init turns usage stats off for the clusters it starts (unless a nightly wheel); say
    # so explicitly, before Ray starts, so every process it starts inherits it.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    lean = lean and not kwargs.get("include_dashboard")
    system = {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_SECONDS * 1000,
              **(LEAN_SYSTEM_CONFIG if lean else {}), **kwargs.pop("_system_config", {})}
    if lean:
        kwargs["include_dashboard"] = False
    global _WORKERS_ENV_GCS, _STARTED_GCS
    workers_env = {} if "OMP_WAIT_POLICY" in os.environ else WORKER_ENV  # the user's own setting wins
    with _without_head_extras(lean), _environ({**(LEAN_AGENT_ENV if lean else {}), **workers_env}):
        ray.init(address="local", _node_ip_address="127.0.0.1", _system_config=system, **kwargs)
    _STARTED_GCS = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    _WORKERS_ENV_GCS = _STARTED_GCS if workers_env else None


# What every worker of a local Ray started here inherits (from the raylet, which inherits it
# from this process while Ray starts; the driver's own environment is left as it was). See
# `ActorResources.runtime_env`: with it there, the inference actor needs no runtime env of its
# own, so it starts in one of the workers Ray started with the node instead of a new process
# set up through the runtime env agent (about 1 s sooner on 2 cores, idle; more when busy).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_WORKERS_ENV_GCS: str | None = None  # the local Ray started here with WORKER_ENV (its GCS address)
_STARTED_GCS: str | None = None  # the local Ray started here (its GCS address)


def started_here() -> bool:
    """Whether the Ray this process is connected to is a local one `start_local_ray` started."""
    return _STARTED_GCS is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == _STARTED_GCS


def _workers_have_worker_env() -> bool:
    """Whether the Ray this process is connected to is a local one started with WORKER_ENV."""
    return (_WORKERS_ENV_GCS is not None and ray.is_initialized()
            and ray.get_runtime_context().gcs_address == _WORKERS_ENV_GCS)


@contextlib.contextmanager
def _without_head_extras(skip: bool):
    """While Ray starts: no dashboard process and no autoscaler monitor on the head.

    `ray.init` has no switch for either (`ray start` has `--no-monitor`, and with
    `include_dashboard=False` the dashboard process still runs its usage stats module), so
    the two methods of Ray's Node that start them do nothing for the node started here; Ray
    copes with both missing, as when the dashboard fails to start or a node runs
    `--no-monitor`. tests/test_runtime_lean.py checks that neither process runs and that
    actors, runtime envs and Ray Data still work.
    """
    if not skip:
        yield
        return
    saved = {name: Node.__dict__.get(name) for name in ("start_api_server", "start_monitor")}
    if None in saved.values():  # another Ray version: start as Ray does, say so
        log.warning("this Ray (%s) has no Node.start_api_server/start_monitor: the local Ray starts its "
                    "dashboard process and autoscaler monitor", ray.__version__)
        yield
        return

    def skipped(self, *args, **kwargs) -> None:
        return None

    with _PATCH_LOCK:
        for name in saved:
            setattr(Node, name, skipped)
        try:
            yield
        finally:
            for name, method in saved.items():
                setattr(Node, name, method)


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """`values` in os.environ while the block runs (processes started then inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# CPUs of each write task (batchscore.outputs.write): short, mostly waiting on storage. Small, so a
# write is never held back by the decode tasks and the model actors that fill a node.
WRITE_CPUS = 0.05
# Each write task's runtime env: only a marker (merged by Ray into the job's runtime env). Ray
# runs a task only in a worker started with the task's runtime env, so the write tasks get
# worker processes of their own, and the read/decode tasks keep theirs. Without it a write task
# took whichever worker was idle, the next decode task the other one, and on 2 cores two
# workers each imported torch for decode's resize (~3 CPU-s and ~450 MiB PSS each):
# docs/benchmarks.md, "Write tasks in workers of their own".
WRITE_RUNTIME_ENV = {"env_vars": {"BATCHSCORE_STAGE": "write"}}


def largest_node_cpus() -> float:
    """CPUs of the alive node of the Ray cluster that has the most (0 when none has any)."""
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


@dataclass(frozen=True)
class ActorResources:
    cpus: float
    gpus: float

    def runtime_env(self) -> dict:
        """The inference actor's runtime env (merged by Ray into the job's: only env_vars are set).

        On CPU, torch's OpenMP threads wait passively (sleep) at the end of each parallel
        region instead of spinning: the actor shares its cores with decode, the driver and
        Ray, and spinning took 10-18% more actor CPU for the same images while giving
        2-10% fewer images/s (docs/benchmarks.md). An OMP_WAIT_POLICY set by the user wins.
        A local Ray started here gives every worker that setting already (WORKER_ENV); on a
        cluster the actor carries it in its runtime env.
        """
        if self.gpus > 0 or "OMP_WAIT_POLICY" in os.environ or _workers_have_worker_env():
            return {}
        return {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


@dataclass(frozen=True)
class ActorSpec:
    """The settings that size the inference actors (as in `ScoreConfig`)."""

    actors: tuple[int, int] = default("actors")
    gpus_per_actor: float | None = default("gpus_per_actor")
    cpus_per_actor: float | None = default("cpus_per_actor")
    device: str = default("device")
    decode_cpus: float = default("decode_cpus")


def actor_resources(spec: ActorSpec) -> ActorResources:
    """CPUs and GPUs for each inference actor, from `spec` or the cluster's nodes.

    Unset, a CPU actor takes what one decode and one write task leave on the cluster's largest
    node (an actor lives on one node), split over the largest pool; fractions are fine (torch
    threads = ceil). With no CPU node yet (an autoscaler's cluster before it adds one): 1.

    Raises:
        ConfigError: GPUs asked for that the cluster lacks; the actor's CPUs equal decode's (Ray
            would fuse decode into the actor); or, on a local Ray started by batchscore, actors
            that fit no node or leave no CPU for decode (the run would wait forever; on a
            cluster an autoscaler may add nodes, so a warning says it).
    """
    cluster = ray.cluster_resources()
    has_gpu = cluster.get("GPU", 0) > 0
    if spec.gpus_per_actor is not None:
        gpus = spec.gpus_per_actor
    else:
        gpus = 1.0 if has_gpu and spec.device != "cpu" else 0.0
    if spec.device == "cuda" and gpus == 0:
        raise ConfigError(f"device=cuda needs gpus_per_actor > 0; the cluster has {cluster.get('GPU', 0):g} GPUs")
    if gpus > 0 and not has_gpu:
        raise ConfigError(f"gpus_per_actor={gpus:g}, but the Ray cluster has no GPU")
    node_cpus, total_cpus = largest_node_cpus(), cluster.get("CPU", 0.0)
    spare = spec.decode_cpus + WRITE_CPUS  # one decode and one write task beside the actors
    if spec.cpus_per_actor is not None:
        cpus = spec.cpus_per_actor
    elif gpus > 0 or node_cpus == 0:
        cpus = 1.0
    else:
        # Sized from the cluster's total, a 1- and a 2-CPU node were asked for 2.45 CPUs; with a
        # floor of 1 CPU, a 1-CPU node or two actors on 2 CPUs left decode nothing: both waited
        # forever.
        cpus = round((node_cpus - spare) / spec.actors[1], 2)
        if cpus <= 0:
            raise ConfigError(f"the Ray cluster's largest node has {node_cpus:g} CPUs: too few for an inference actor "
                              f"beside a decode task ({option('decode_cpus', f'{spec.decode_cpus:g}')})")
        if cpus == spec.decode_cpus:
            cpus = round(cpus - 0.01, 2)  # must differ (below), or Ray fuses decode into the actor
    if cpus == spec.decode_cpus:
        raise ConfigError(
            f"{option('cpus_per_actor')} ({cpus:g}) must differ from {option('decode_cpus')} ({spec.decode_cpus:g}): "
            "with equal resources Ray fuses decode into the model actor and runs it serially there"
        )
    if node_cpus > 0 and (cpus > node_cpus or spec.actors[0] * cpus + spare > total_cpus + 1e-9):
        problem = (f"the inference actors ({spec.actors[0]} × {cpus:g} CPUs) "
                   + (f"fit no node of the Ray cluster (the largest has {node_cpus:g} CPUs)" if cpus > node_cpus else
                      f"leave no CPU for decode tasks ({spec.decode_cpus:g} each) on the cluster's "
                      f"{total_cpus:g} CPUs"))
        fix = f"lower {option('cpus_per_actor')} or {option('actors')}, or {option('decode_cpus')}"
        if started_here():
            raise ConfigError(f"{problem}: the run would wait forever; {fix}")
        log.warning("%s: the run waits until an autoscaler adds nodes, else forever; %s", problem, fix)
    return ActorResources(cpus=cpus, gpus=gpus)
