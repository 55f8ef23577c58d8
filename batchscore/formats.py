"""Image formats: the one list of what batchscore can decode, and the file endings that name them.

Listing (which files of a folder are images), read (which members of a WebDataset tar shard
are images) and decode (which formats Pillow may open) all take their answer from here.

`FORMATS` maps each format batchscore knows, by its Pillow name, to its file endings.
`DEFAULT_FORMATS` is the allowlist a run decodes unless `formats` in the config says
otherwise: the formats cameras, phones and the web produce. PPM/PGM, TGA, ICO and JPEG 2000
are known but off by default (rare in photo collections, and more attack surface); a job
turns them on with `formats`. HEIF/HEIC is read through the `pillow-heif` plugin, AVIF by
Pillow itself.
"""

from __future__ import annotations

FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".mpo",),  # camera multi-picture JPEG (stereo, Fuji/Sony panoramas): the first picture
    "PNG": (".png", ".apng"),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "BMP": (".bmp", ".dib"),
    "TIFF": (".tif", ".tiff"),
    "AVIF": (".avif",),
    "HEIF": (".heic", ".heif", ".hif"),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
    "TGA": (".tga",),
    "ICO": (".ico",),
    "JPEG2000": (".jp2", ".j2k", ".jpx", ".jpf", ".j2c"),
}
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# Every ending of every known format, allowed or not: a tar member with one of these is an
# image member (a row, refused by decode if its format is not allowed), never dropped.
IMAGE_ENDINGS: frozenset[str] = frozenset(e for endings in FORMATS.values() for e in endings)


def endings(formats: tuple[str, ...]) -> frozenset[str]:
    """The file endings (lower case, with the dot) of `formats` (names from `FORMATS`)."""
    return frozenset(e for f in formats for e in FORMATS[f])


def ending(name: str) -> str:
    """The file ending of a name or URI, lower case with the dot ('' when it has none);
    `.tar.gz` counts as one ending."""
    base = name.rsplit("/", 1)[-1].lower()
    if base.endswith(".tar.gz"):
        return ".tar.gz"
    return "." + base.rsplit(".", 1)[-1] if "." in base else ""
