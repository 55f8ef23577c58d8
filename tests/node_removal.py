"""Helper for test_faults.py (run as its own process): a two-node Ray cluster on loopback
(`ray.cluster_utils.Cluster`), a scoring run, and the worker node removed mid-run.

    python tests/node_removal.py INPUT_DIR OUTPUT_DIR CHECKPOINT

Prints one JSON line: rows, unique ids, whether the node was removed while the run was going.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from batchscore import pipeline
from batchscore.config import ScoreConfig
from batchscore.runtime import loopback_only


def main(inputs: str, output: str, checkpoint: str) -> None:
    loopback_only()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    try:
        config = ScoreConfig(input=(inputs,), output=output, model=checkpoint, dtype="fp32", top_k=3, batch_size=8,
                             actors=(2, 2), cpus_per_actor=1.0, decode_cpus=0.5, decode_batch_size=8, rows_per_file=8)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = pipeline.score(config)
            except Exception as e:  # noqa: BLE001 - reported to the test
                outcome["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while len(list(Path(output).glob("_staging/*/part-*.parquet"))) < 3 and thread.is_alive():
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.02)
        removed_mid_run = thread.is_alive()
        nodes_before = len([n for n in ray.nodes() if n["Alive"]])
        cluster.remove_node(worker, allow_graceful=False)
        thread.join(timeout=600)
        result = outcome.get("result")
        frame = result.to_pandas() if result else None
        print(json.dumps({
            "error": outcome.get("error"), "removed_mid_run": removed_mid_run, "nodes_before": nodes_before,
            "nodes_after": len([n for n in ray.nodes() if n["Alive"]]),
            "rows": None if frame is None else len(frame),
            "unique_ids": None if frame is None else int(frame["id"].nunique()),
            "errors": None if frame is None else int(frame["error"].notna().sum()),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
