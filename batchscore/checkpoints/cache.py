"""Model cache: a checkpoint in a bucket is downloaded once per node, keyed by its content.

The key is a hash of the remote listing (file names, sizes and each object's etag / md5 /
generation), so a changed checkpoint gets a new folder and an unchanged one is never fetched
again. The first process on a node to need it takes an exclusive file lock, downloads into a
temporary folder and renames it into place (atomic on a local disk); processes that wait on
the lock then find it there. Every download appends a line to `downloads.log` in the cache.

Only the files a checkpoint needs are fetched (configs and safetensors weights); pickle
weights are downloaded only with the allow_pickle setting.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from batchscore.exceptions import CacheError
from batchscore.inputs import fs as fsutil

log = logging.getLogger(__name__)

WANTED = ("config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json")


def cache_root() -> Path:
    """`$BATCHSCORE_CACHE`, else `~/.cache/batchscore`."""
    return Path(os.environ.get("BATCHSCORE_CACHE", "~/.cache/batchscore")).expanduser()


def fetch_checkpoint(uri: str, expect_key: str | None = None, allow_pickle: bool = False) -> tuple[Path, str]:
    """Returns (local folder, content key) of the checkpoint at `uri`, downloading it if needed.

    Args:
        uri: gs://, s3:// or any fsspec URI of a checkpoint folder.
        expect_key: The key the driver resolved; a different one means the checkpoint
            changed during the run, which is an error rather than a silent model switch.
        allow_pickle: Also fetch `pytorch_model.bin` when the checkpoint has no
            safetensors weights.
    """
    fs, root = fsutil.resolve(uri)
    root = root.rstrip("/")
    single = None
    if root.endswith(".npz"):  # a one-file checkpoint (vision_transformer), and its labels file if any
        root, single = root.rsplit("/", 1)
    try:
        infos = fs.find(root, detail=True, **({"maxdepth": 1} if single else {}))
    except FileNotFoundError:
        infos = {}
    files = {name[len(root) + 1:]: info for name, info in infos.items() if name.startswith(root + "/")}
    if single:
        files = {rel: info for rel, info in files.items() if rel in (single, f"{single[:-4]}.labels.txt")}
    if not files or (single and single not in files):
        raise CacheError(f"model {uri!r}: no checkpoint files there (expected config.json, "
                         "preprocessor_config.json and model.safetensors)")
    # Pickle weights only when there is nothing else: the same listing then always gives the
    # same files and key, whatever allow_pickle says.
    pickle_only = allow_pickle and not any(_is_safetensors(rel) for rel in files)
    wanted = {rel: info for rel, info in files.items() if single or _wanted(rel, pickle_only)}
    key = _content_key(wanted)
    if expect_key is not None and key != expect_key:
        raise CacheError(f"model {uri!r} changed during the run (content key {key[:16]}, expected "
                         f"{expect_key[:16]}); refusing to score with different weights")
    target = cache_root() / "models" / f"{Path(single[:-4] if single else root).name}-{key[:16]}"
    if target.is_dir():
        return target, key
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.is_dir():  # another process on this node finished it while we waited
            return target, key
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            for rel in sorted(wanted):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get(f"{root}/{rel}", str(tmp / rel))
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(int(i.get("size") or 0) for i in wanted.values())
        with open(cache_root() / "downloads.log", "a") as f:
            f.write(json.dumps({"uri": uri, "key": key, "files": len(wanted), "bytes": size, "pid": os.getpid(),
                                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}) + "\n")
        log.info("downloaded %s (%d files, %d bytes) to %s", uri, len(wanted), size, target)
    return target, key


def _is_safetensors(rel: str) -> bool:
    return rel == "model.safetensors" or (rel.startswith("model-") and rel.endswith(".safetensors"))


def _wanted(rel: str, pickle_only: bool) -> bool:
    return rel in WANTED or _is_safetensors(rel) or (pickle_only and rel == "pytorch_model.bin")


def _content_key(files: dict[str, dict]) -> str:
    def version(info: dict) -> str:
        for field in ("md5Hash", "ETag", "etag", "generation", "mtime", "LastModified"):
            if info.get(field) is not None:
                return str(info[field])
        return ""

    listing = sorted((rel, int(info.get("size") or 0), version(info)) for rel, info in files.items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
