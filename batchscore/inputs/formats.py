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
# Names people write for a format; `canonical` maps them (any case) to the names above.
ALIASES = {"JPG": "JPEG", "JPE": "JPEG", "HEIC": "HEIF", "TIF": "TIFF", "APNG": "PNG", "JP2": "JPEG2000",
           "PGM": "PPM", "PBM": "PPM", "PNM": "PPM"}
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# Every ending of every known format, allowed or not: a tar member with one of these is an
# image member (a row, refused by decode if its format is not allowed), never dropped.
IMAGE_ENDINGS: frozenset[str] = frozenset(e for endings in FORMATS.values() for e in endings)


def canonical(name: str) -> str:
    """A format name as `FORMATS` spells it: 'jpeg', 'jpg', '.jpg' → 'JPEG'; unknown names
    come back upper-cased (the config then refuses them, listing the known ones)."""
    upper = name.strip().lstrip(".").upper()
    return ALIASES.get(upper, upper)


def allows(formats: tuple[str, ...], fmt: str) -> bool:
    """Whether an image Pillow calls `fmt` may be decoded: an MPO (camera multi-picture JPEG,
    decoded as its first picture) is a JPEG to a user who allowed JPEG."""
    return fmt in formats or (fmt == "MPO" and "JPEG" in formats)


def endings(formats: tuple[str, ...]) -> frozenset[str]:
    """The file endings (lower case, with the dot) of `formats` (names from `FORMATS`)."""
    return frozenset(e for f in formats for e in FORMATS[f])


def ending(name: str) -> str:
    """The file ending of a name or URI, lower case with the dot ('' when it has none);
    `.tar.gz`, `.tar.bz2` and `.tar.xz` count as one ending."""
    base = name.rsplit("/", 1)[-1].lower()
    for double in (".tar.gz", ".tar.bz2", ".tar.xz"):
        if base.endswith(double):
            return double
    return "." + base.rsplit(".", 1)[-1] if "." in base else ""
