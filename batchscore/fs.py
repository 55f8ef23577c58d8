"""Filesystem resolution: every path and URI goes through fsspec, local ones included.

Local paths, file://, memory:// (in-process only: Ray workers do not share it), and the
object stores fsspec knows (gs:// via gcsfs, s3:// via s3fs) resolve the same way, so no
stage has a local-only shortcut.
"""

from __future__ import annotations

import os

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
