"""Helper for test_faults.py (run as its own process): a Ray cluster on loopback
(`ray.cluster_utils.Cluster`: a head without CPUs and two scoring nodes), a scoring run, and
the node of one inference actor removed mid-run, then replaced. It also reports which nodes
wrote the committed part files (workers write them; the head, where the driver runs, never).

    python tests/node_removal.py INPUT_DIR OUTPUT_DIR CHECKPOINT RESULT_JSON

Writes RESULT_JSON: rows, unique ids, whether the node was removed while the run was going (a
file, not stdout: Ray's own log lines reach stdout at any time, even after the last print).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from batchscore import pipeline, plan
from batchscore.config import ScoreConfig
from batchscore.driver import runtime
from batchscore.driver.runtime import loopback_only


def predictors() -> list[str]:
    """The node ids of the live Predictor actors (from Ray's private state table: the public
    `ray.util.state` API is served by the dashboard, which this cluster does not start)."""
    return [a["Address"]["NodeID"] for a in ray._private.state.state.actor_table(None, actor_state_name="ALIVE").values()
            if "Predictor" in a["ActorClassName"]]


def main(inputs: str, output: str, checkpoint: str, result_json: str) -> None:
    loopback_only()
    # The driver's head has no CPUs; two nodes of 2 CPUs each fit exactly one 1.5-CPU actor
    # (and a 0.5-CPU decode task), so one actor is always on the node that is removed, and a
    # replacement node (as an autoscaler would add) takes its restart. Few CPUs in all: on 2
    # real cores every declared CPU can start another decode worker, ~5 s of CPU each. Nodes
    # are declared dead after ~1.5 s of missed health checks instead of Ray's default of many
    # seconds: the test measures recovery, not the failure detector's patience.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                           "health_check_failure_threshold": 3}})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    head = ray.get_runtime_context().get_node_id()
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    # The default actor size on this cluster (4 CPUs, none on one node beyond 2): what one node holds.
    default_actor_cpus = runtime.actor_resources(plan.actor_spec(ScoreConfig())).cpus
    try:
        config = ScoreConfig(input=(inputs,), output=output, model=checkpoint, dtype="fp32", top_k=3, batch_size=8,
                             actors=(2, 2), cpus_per_actor=1.5, decode_cpus=0.5, decode_batch_size=8, rows_per_file=8)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = pipeline.score(config)
            except Exception as e:  # noqa: BLE001 - reported to the test
                outcome["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        # Both actors up (one may start well after the other has scored the first parts).
        while ((len(list(Path(output).glob("_staging/*/part-*.parquet"))) < 1 or len(predictors()) < 2)
               and thread.is_alive()):
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.02)
        removed_mid_run = thread.is_alive()
        nodes_before = len([n for n in ray.nodes() if n["Alive"]])
        actors_on_removed_node = sum(1 for node in predictors() if node == worker.node_id)
        cluster.remove_node(worker, allow_graceful=False)
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        thread.join(timeout=600)
        result = outcome.get("result")
        frame = result.to_pandas() if result else None
        Path(result_json).write_text(json.dumps({
            "error": outcome.get("error"), "removed_mid_run": removed_mid_run, "nodes_before": nodes_before,
            "actors_on_removed_node": actors_on_removed_node,
            "nodes_after": len([n for n in ray.nodes() if n["Alive"]]),
            "removed_node_dead": not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == worker.node_id),
            "rows": None if frame is None else len(frame),
            "unique_ids": None if frame is None else int(frame["id"].nunique()),
            "errors": None if frame is None else int(frame["error"].notna().sum()),
            # workers write: every committed part was written on a scoring node, none on the head
            "parts": None if result is None else len(result.files),
            "part_nodes": None if result is None else sorted({f["node"] for f in json.loads(
                Path(result.manifest_uri).read_text())["files"]} - {None}),
            "head": head, "scoring_nodes": [n["NodeID"] for n in ray.nodes() if n["NodeID"] != head],
            "default_actor_cpus": default_actor_cpus,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
