"""Ray runtime: connect or start Ray, and size the inference actors from the cluster."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import ray

from batchscore.config import ConfigError, ScoreConfig

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connects to the cluster in RAY_ADDRESS (as `ray job submit` sets it) or starts a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # A private local Ray on loopback; the dashboard is off to keep start-up short.
        start_local_ray(include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    # Ray's bars redraw in place; in a log (non-TTY) batchscore's own progress lines stand instead.
    ctx.enable_progress_bars = sys.stderr.isatty()


def loopback_only() -> None:
    """Makes a Ray started from this process listen on 127.0.0.1 only.

    Ray replaces `_node_ip_address="127.0.0.1"` by the machine's address (its
    `resolve_ip_for_localhost`) unless it believes clusters are off, as on macOS and Windows;
    then every Ray server binds to loopback (checked by tests/test_pipeline.py). Children
    (raylet, workers) read the environment variable; this process's Ray is already imported,
    so its constant is set as well.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


# Ray kills a worker idle for 1 s once a node has more workers than CPUs, which Ray Data's own
# actors already make it have. A decode task held back by the object store bound then finds
# its worker gone, and each new worker costs ~5 s of CPU to start (ray, ray.data, pyarrow):
# on 2 cores, ViT-B/16 fell from 7.95 to 5.63 images/s with 19 decode workers started in a
# run instead of 2 (docs/benchmarks.md). Clusters get the same setting from cluster.yaml.
IDLE_WORKER_SECONDS = 60


def start_local_ray(**kwargs) -> None:
    """Starts a private single-node Ray on loopback (kwargs go to `ray.init`); never joins a
    cluster found on the machine (`address="local"`). Idle workers live IDLE_WORKER_SECONDS."""
    loopback_only()
    system = {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_SECONDS * 1000, **kwargs.pop("_system_config", {})}
    ray.init(address="local", _node_ip_address="127.0.0.1", _system_config=system, **kwargs)


# CPUs of each write task (batchscore.write): short, mostly waiting on storage. Small, so a
# write is never held back by the decode tasks and the model actors that fill a node.
WRITE_CPUS = 0.05


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
        """
        if self.gpus > 0 or "OMP_WAIT_POLICY" in os.environ:
            return {}
        return {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


def actor_resources(config: ScoreConfig) -> ActorResources:
    """CPUs and GPUs for each inference actor, from the config or the cluster's size."""
    cluster = ray.cluster_resources()
    has_gpu = cluster.get("GPU", 0) > 0
    if config.gpus_per_actor is not None:
        gpus = config.gpus_per_actor
    else:
        gpus = 1.0 if has_gpu and config.device != "cpu" else 0.0
    if config.device == "cuda" and gpus == 0:
        raise ConfigError(f"device=cuda needs gpus_per_actor > 0; the cluster has {cluster.get('GPU', 0):g} GPUs")
    if gpus > 0 and not has_gpu:
        raise ConfigError(f"gpus_per_actor={gpus:g}, but the Ray cluster has no GPU")
    if config.cpus_per_actor is not None:
        cpus = config.cpus_per_actor
    elif gpus > 0:
        cpus = 1.0
    else:
        # CPU inference: the model takes what one decode and one write task leave, split over the pool.
        cpus = max(1.0, (cluster.get("CPU", 1.0) - config.decode_cpus - WRITE_CPUS) / config.actors[1])
    if cpus == config.decode_cpus:
        raise ConfigError(
            f"cpus_per_actor ({cpus:g}) must differ from decode_cpus ({config.decode_cpus:g}): "
            "with equal resources Ray fuses decode into the model actor and runs it serially there"
        )
    return ActorResources(cpus=cpus, gpus=gpus)
