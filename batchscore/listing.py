"""Listing: turn the configured inputs into a stable, de-duplicated list of image URIs.

A directory is listed recursively and filtered by extension (what is skipped is counted and
logged, never dropped silently); a glob or a file is taken as given. The result is sorted so
the same inputs always give the same listing, and each entry's `id` is its URI.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from batchscore import fs as fsutil

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Entry:
    id: str
    uri: str
    size: int | None


class ListingError(ValueError):
    """An input could not be listed, or listed nothing."""


def list_inputs(inputs: tuple[str, ...], extensions: tuple[str, ...]) -> list[Entry]:
    """Lists every input, in a stable order, without duplicates.

    Args:
        inputs: Directories, globs or files (paths or fsspec URIs).
        extensions: File endings kept from directories, lower case with a dot.

    Raises:
        ListingError: An input does not exist or matches nothing, or all of them give no file.
    """
    found: dict[str, Entry] = {}
    skipped: collections.Counter[str] = collections.Counter()
    allowed = {e.lower() for e in extensions}
    for spec in inputs:
        fs, path = fsutil.resolve(spec)
        if any(c in _GLOB_CHARS for c in path):
            infos = [i for i in fs.glob(path, detail=True).values() if i["type"] == "file"]
            if not infos:
                raise ListingError(f"input {spec!r}: the glob matched no file")
        elif fs.isdir(path):
            infos = []
            for info in fs.find(path, detail=True).values():
                name = info["name"].rsplit("/", 1)[-1]
                ext = ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else "(none)"
                if name.startswith((".", "_")) or ext not in allowed:
                    skipped[ext] += 1
                else:
                    infos.append(info)
        elif fs.isfile(path):
            infos = [fs.info(path)]
        else:
            raise ListingError(f"input {spec!r}: no such file or directory")
        for info in infos:
            uri = fsutil.full_uri(fs, info["name"])
            found.setdefault(uri, Entry(id=uri, uri=uri, size=info.get("size")))
    if skipped:
        log.warning(
            "skipped %d file(s) in input directories that are not images by name or are hidden: %s"
            " (list them explicitly or set `extensions` to score them)",
            sum(skipped.values()),
            ", ".join(f"{ext} x{n}" for ext, n in skipped.most_common()),
        )
    if not found:
        raise ListingError(f"inputs {list(inputs)}: no image file found (extensions {sorted(allowed)})")
    return [found[k] for k in sorted(found)]
