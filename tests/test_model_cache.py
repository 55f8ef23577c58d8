"""Checkpoints in buckets: fetched once per node into a content-keyed cache."""

from __future__ import annotations

import json
import os

import fsspec
import pytest
from conftest import put, upload_dir

from batchscore import pipeline
from batchscore.checkpoints import cache, models
from batchscore.config import ScoreConfig
from batchscore.exceptions import CacheError, ModelError


def upload_checkpoint(local, uri: str) -> None:
    upload_dir(local, uri)
    put(f"{uri}/pytorch_model.bin", b"pickle weights are never downloaded")


def downloads(root) -> list[dict]:
    log = root / "downloads.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_gcs_checkpoint_scored_by_two_actors_downloads_once(ray_session, tmp_path, photos, checkpoints, monkeypatch):
    uri = "gs://bs-models/checkpoints/vit-tiny"
    upload_checkpoint(checkpoints["vit"], uri)
    before = [d for d in downloads(cache.cache_root()) if d["uri"] == uri]
    result = pipeline.score(ScoreConfig(input=(str(photos),), output=str(tmp_path / "out"), model=uri, dtype="fp32",
                                        actors=(2, 2), cpus_per_actor=0.6, batch_size=2, top_k=0))
    after = [d for d in downloads(cache.cache_root()) if d["uri"] == uri]
    print(f"FIGURE downloads of {uri}: {len(after) - len(before)} for 1 driver + 2 actors")
    assert len(after) - len(before) == 1 and after[-1]["files"] == 3  # configs + safetensors, no pickle
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["model"]["ref"] == uri and result.errors == 0
    local = pipeline.score(ScoreConfig(input=(str(photos),), output=str(tmp_path / "local"),
                                       model=str(checkpoints["vit"]), dtype="fp32", top_k=0)).to_arrow().to_pylist()
    remote = {r["id"]: r for r in result.to_arrow().to_pylist()}
    assert all(remote[r["id"]]["labels"] == r["labels"] for r in local)
    assert manifest["model"]["weights_sha256"] == models.resolve(str(checkpoints["vit"])).weights_sha256


def test_concurrent_first_fetches_on_one_node_download_once(ray_session, tmp_path, checkpoints):
    """Two actors start at once on an empty cache: one downloads, the other waits and reuses."""
    uri = "s3://bs-models/checkpoints/deit-tiny"
    upload_checkpoint(checkpoints["deit"], uri)
    fresh = tmp_path / "fresh-cache"

    @ray_session.remote(num_cpus=0.1, runtime_env={"env_vars": {"BATCHSCORE_CACHE": str(fresh)}})
    class Loader:
        def fetch(self):
            path, key = cache.fetch_checkpoint(uri)
            return str(path), key, os.getpid()

    actors = [Loader.remote() for _ in range(2)]
    results = ray_session.get([a.fetch.remote() for a in actors])
    for a in actors:
        ray_session.kill(a)
    assert len({pid for _, _, pid in results}) == 2, "the fetches ran in two processes"
    assert len({(p, k) for p, k, _ in results}) == 1
    assert len(downloads(fresh)) == 1
    assert sorted(os.listdir(results[0][0])) == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_changed_checkpoint_is_refused_mid_run(object_stores, checkpoints):
    uri = "gs://bs-models/checkpoints/changing"
    upload_checkpoint(checkpoints["beit"], uri)
    info = models.resolve(uri)
    assert info.name == "changing" and info.cache_key
    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe_file(f"{path}/config.json", fs.cat(f"{path}/config.json") + b" ")
    with pytest.raises(CacheError, match="changed during the run"):
        models.local_path(info)


def test_missing_bucket_checkpoint_is_a_model_error(object_stores):
    with pytest.raises(ModelError, match="no checkpoint files there"):
        models.resolve("gs://bs-models/checkpoints/absent")
