"""Filesystem resolution: every path and URI goes through fsspec, local ones included.

Local paths, file://, memory:// (in-process only: Ray workers do not share it), and the
object stores fsspec knows (gs:// via gcsfs, s3:// via s3fs) resolve the same way, so no
stage has a local-only shortcut.
"""

from __future__ import annotations

import os
import shutil

import fsspec
from fsspec import AbstractFileSystem

# gcsfs >= 2026 probes buckets over gRPC in an experimental mode that stalls for a minute
# per call against emulators; it must be off before gcsfs is first imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def resolve(uri: str) -> tuple[AbstractFileSystem, str]:
    """Returns the filesystem for `uri` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def full_uri(fs: AbstractFileSystem, path: str) -> str:
    """The URI a path inside `fs` is known by: with its protocol, or absolute when local."""
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


# Paths batchscore writes may hold `[`, `?` or `*` (an output `runs/run[1]`). fsspec's `glob`,
# `rm`, `copy` and `expand_path` take such a path as a pattern (and `run[1]` matches `run1`),
# so the output side uses only these helpers, which never expand one.

def files_in(fs: AbstractFileSystem, folder: str, prefix: str = "", suffix: str = "") -> list[str]:
    """Paths of the files directly in `folder` whose names start with `prefix` and end with
    `suffix`; [] when the folder does not exist. `folder` is taken as written."""
    try:
        infos = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    names = [i["name"] for i in infos if i["type"] == "file"]
    return sorted(n for n in names if n.rsplit("/", 1)[-1].startswith(prefix) and n.endswith(suffix))


def remove_file(fs: AbstractFileSystem, path: str) -> None:
    fs.rm_file(path)


def remove_tree(fs: AbstractFileSystem, folder: str) -> None:
    """Deletes `folder` and everything under it, taken as written; nothing if it is absent."""
    if is_local(fs):
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in fs.find(folder):
        fs.rm_file(path)


def move_file(fs: AbstractFileSystem, src: str, dst: str) -> None:
    """A rename on local disks; copy then delete on object stores, where a move is exactly
    that (gcsfs's `mv` first tries an API that emulators and flat buckets refuse, with retries)."""
    if is_local(fs):
        os.replace(src, dst)
    else:
        fs.cp_file(src, dst)
        fs.rm_file(src)
