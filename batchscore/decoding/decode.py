"""Decode: image bytes → uint8 [3, H, W] at the model's input size, or an error string.

A plain function run in CPU tasks. Pillow opens the bytes with a format allowlist
(`formats`, names from `batchscore.inputs.formats`) and a decompression-bomb guard on the header;
JPEGs much larger than the target are decoded at a reduced DCT scale (`Image.draft`), never
below `DRAFT_MARGIN` times the target size; EXIF orientation is applied; every mode becomes
8-bit RGB (16-bit samples are scaled by the bit depth their values use, see `to_rgb`).
Resize and centre crop then follow the checkpoint's preprocessing exactly as transformers'
default (torchvision) image processors do them: `torchvision.transforms.v2.functional.resize`
with antialias on uint8, and the same crop offsets. Normalisation is left to the device that
runs the model, so four times less data crosses the object store than with float32.

Errors are the file's or ours. Whatever Pillow raises while it parses or decodes the bytes is
the file's: `decode.truncated`, `decode.corrupt`, `decode.no_pixels`, `decode.bomb`,
`decode.unsupported_format` or `decode.unsupported_codec`, with Pillow's reason. Only a
failure in batchscore's own steps after that (mode conversion, resize, crop) is
`decode.internal`, and it is logged with its traceback.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import logging
import os
import re
import struct
import sys
import threading
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchscore.checkpoints.checkpoint import PreprocessSpec
from batchscore.config import default
from batchscore.errors import error as _error
from batchscore.inputs import formats as _formats

try:  # HEIF/HEIC through the pillow-heif plugin (AVIF is built into Pillow >= 11.2)
    import pillow_heif
except ImportError:  # then HEIF files are refused as unsupported, saying why
    pillow_heif = None

log = logging.getLogger(__name__)

# Only decode a JPEG at a reduced DCT scale when the result keeps at least this many times the
# target's largest side. Measured on a 2822x2822 photo mosaic (docs/architecture.md): margin 2
# moved pixels by up to 36 levels and probabilities by 5e-3; margin 4 by 2 levels (mean 0.1)
# and 7e-4, inside the 1e-3 bound against transformers.
DRAFT_MARGIN = 4
# A side this long is a negative number read as unsigned (a damaged header), not a bomb.
_IMPOSSIBLE_SIDE = 2**31
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow's words for valid files of an allowed format that its decoders do not handle (not
# damaged data): 12-bit JPEG, BMP bit fields other than the common layouts, 2-bit BMP and BMP
# holding an embedded PNG/JPEG (depth 0). Any other "Unsupported BMP pixel depth (30000)" is
# a damaged header.
_PILLOW_LACKS = re.compile(r"cannot handle 12-bit layers|Unsupported BMP bitfields layout|"
                           r"Unsupported BMP pixel depth \((0|2)\)|Unsupported BMP compression")


if pillow_heif is not None:
    pillow_heif.register_heif_opener()
Image.init()


@dataclass(frozen=True)
class DecodeSpec:
    """What the decode tasks need (`batchscore.plan` resolves it once).

    Attributes:
        preprocess: The checkpoint's resize and crop (`PreprocessSpec`).
        max_image_pixels: Decompression-bomb guard: larger declared sizes are refused unread.
        formats: The image formats decoded (Pillow names); others are error rows.
        nice: Niceness of the decoding threads (0 = normal priority).
        device: Where JPEGs are decoded: cpu (here, `decode_batch`), or cuda / torchvision
            (in the inference actor; the CPU tasks run `device_decode.check_batch`).
        cpus: CPUs each read/decode task holds (read and decode run fused in one task).
    """

    preprocess: PreprocessSpec
    max_image_pixels: int = default("max_image_pixels")
    formats: tuple[str, ...] = default("formats")
    nice: int = default("decode_nice")
    device: str = "cpu"
    cpus: float = default("decode_cpus")

    def kwargs(self) -> dict:
        """The keyword arguments of `decode_batch` and `device_decode.check_batch`."""
        return {"spec": self.preprocess, "max_image_pixels": self.max_image_pixels, "formats": self.formats,
                "nice": self.nice}


class DecodeError(Exception):
    """One image cannot be decoded: `code` (see `batchscore.errors`) and a reason."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def decode_batch(batch: dict[str, np.ndarray], *, spec: PreprocessSpec, max_image_pixels: int,
                 formats: tuple[str, ...] = _formats.DEFAULT_FORMATS, nice: int = 0) -> dict[str, np.ndarray]:
    """Decodes `data` into `pixels`; rows that fail keep zero pixels and get an `error`.

    Args:
        batch: Columns `id`, `data` (bytes), `error` ("" or a read error) and `meta`
            (carried through untouched).
        spec: The checkpoint's preprocessing.
        max_image_pixels: Images declaring more pixels are refused before any pixel is decoded.
        formats: The allowed image formats (names from `batchscore.inputs.formats.FORMATS`).
        nice: Run the decoding in a thread of this niceness (Linux), so that where decode and
            the model share cores the model's threads are served first; 0 = this thread.

    Returns:
        Columns `id`, `pixels` (uint8 [N, 3, H, W]), `error` and `meta`.
    """
    if nice and sys.platform == "linux":
        return _niced(nice).submit(_decode_rows, batch, spec, max_image_pixels, formats).result()
    return _decode_rows(batch, spec, max_image_pixels, formats)


_NICED: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _niced(nice: int) -> concurrent.futures.ThreadPoolExecutor:
    """One worker thread per niceness, reniced once. Linux nices threads one by one, so the Ray
    worker's own thread (and any other task it runs later) keeps its priority."""
    if nice not in _NICED:
        _NICED[nice] = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"batchscore-decode-nice{nice}", initializer=_renice, initargs=(nice,))
    return _NICED[nice]


def _renice(nice: int) -> None:
    """Raises this thread's niceness to `nice`; never lowers it (that needs privileges), and
    where renicing is refused decode simply runs at the worker's priority: a failing
    initializer would break the pool and fail every batch."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:
        pass


def _decode_rows(batch: dict[str, np.ndarray], spec: PreprocessSpec, max_image_pixels: int,
                 formats: tuple[str, ...]) -> dict[str, np.ndarray]:
    began = time.perf_counter()
    h, w = spec.output_hw
    n = len(batch["id"])
    pixels = np.zeros((n, 3, h, w), dtype=np.uint8)
    errors = list(batch["error"])
    for i, data in enumerate(batch["data"]):
        if errors[i]:
            continue
        try:
            pixels[i] = decode_one(data, spec, max_image_pixels, formats)
        except DecodeError as e:
            errors[i] = _error(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - a bug of ours still costs one row only
            log.exception("decode.internal on %s (a bug in batchscore: please report it)", batch["id"][i])
            errors[i] = _error("decode.internal", f"{type(e).__name__}: {e}")
    # Seconds of decode per row: the actor weighs them against its model time (batchscore.inference.sizing).
    seconds = np.full(n, (time.perf_counter() - began) / max(n, 1))
    return {"id": batch["id"], "pixels": pixels, "error": np.array(errors, dtype=object), "meta": batch["meta"],
            "decode_seconds": seconds}


def decode_one(data: bytes, spec: PreprocessSpec, max_image_pixels: int,
               formats: tuple[str, ...] = _formats.DEFAULT_FORMATS) -> np.ndarray:
    """Decodes one image to uint8 [3, H, W].

    Raises:
        DecodeError: The bytes are not an image this run accepts (`code` says why, see
            `batchscore.errors`). Any other exception is a bug in batchscore.
    """
    if not data:
        raise DecodeError("decode.empty", "empty file")
    image = open_image(data, max_image_pixels, formats)
    if image.format == "PNG":
        _check_png_chunks(data)
    if image.format in ("JPEG", "MPO"):
        image.draft(image.mode, _draft_size(image.size, spec))
    load(image)
    return resize_and_crop(to_rgb(ImageOps.exif_transpose(image)), spec)


def open_image(data: bytes, max_image_pixels: int,
               formats: tuple[str, ...] = _formats.DEFAULT_FORMATS) -> Image.Image:
    """Opens (parses the header of, but does not decode) an allowed image within the pixel budget.

    The size check is ours, made on the header before any pixel is allocated; Pillow's own
    guard is then armed at the same limit for decoding (it also checks GIF frame extents).

    Raises:
        DecodeError: not an allowed format (`decode.unsupported_format`), a damaged header
            of an allowed one (`decode.corrupt`, `decode.truncated`), no pixels
            (`decode.no_pixels`) or too many (`decode.bomb`).
    """
    # MPO files are opened by Pillow's JPEG plugin, which turns them into MPO itself.
    pillow_formats = [f for f in formats if f != "MPO"]
    if "MPO" in formats and "JPEG" not in pillow_formats:
        pillow_formats.append("JPEG")
    Image.MAX_IMAGE_PIXELS = None  # header only: our check below gives the clearer message
    try:
        image = Image.open(io.BytesIO(data), formats=pillow_formats)
    except UnidentifiedImageError:
        raise _unidentified(data, pillow_formats) from None
    except Exception as e:  # noqa: BLE001 - a header cut short or damaged (Pillow raises many kinds)
        raise _damaged(e) from e
    finally:
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    if not _formats.allows(formats, image.format):  # a plain JPEG when only MPO is allowed
        raise DecodeError("decode.unsupported_format",
                          f"{image.format} image, not an allowed format ({', '.join(formats)})")
    w, h = image.size
    if w >= _IMPOSSIBLE_SIDE or h >= _IMPOSSIBLE_SIDE:
        raise DecodeError("decode.corrupt", f"{image.format} header declares an impossible size {w}x{h} "
                                            "(a negative side read as unsigned)")
    if w < 1 or h < 1:
        raise DecodeError("decode.no_pixels", f"image has no pixels ({w}x{h})")
    if w * h > max_image_pixels:
        raise DecodeError("decode.bomb", f"decompression bomb refused: {w}x{h} pixels exceeds max_image_pixels={max_image_pixels}")
    return image


def load(image: Image.Image) -> None:
    """Decodes an opened image's pixels; whatever Pillow raises here is the file's fault.

    Raises:
        DecodeError: `decode.bomb` (a frame larger than the limit), `decode.unsupported_codec`
            (a compression this Pillow build lacks), `decode.truncated` or `decode.corrupt`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decode.bomb", f"decompression bomb refused: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, ValueError, struct.error, ...
        if image.format == "PNG" and _raised_in(e, "load_end"):
            # The default image is fully decoded; what failed are the APNG animation chunks
            # after it. The APNG spec says to show the default image then, as Pillow does
            # ("will use default PNG image"); a second load() only finishes the bookkeeping.
            image.load()
            return
        raise _damaged(e, image) from e


def _raised_in(e: BaseException, function: str) -> bool:
    return any(frame.name == function for frame in traceback.extract_tb(e.__traceback__))


def _check_png_chunks(data: bytes) -> None:
    """Checks every chunk's CRC, as libpng does (Pillow checks only some): a PNG whose image
    data fails its checksum holds other pixels than were written.

    Raises:
        DecodeError: `decode.corrupt` naming the chunk, or `decode.truncated` when a chunk
            runs past the end of the data.
    """
    at = len(_PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        end = at + 8 + length + 4
        if end > len(data):
            return  # a cut-short file: Pillow's load says "truncated" with its own words
        if zlib.crc32(data[at + 4:end - 4]) != struct.unpack(">I", data[end - 4:end])[0]:
            name = kind.decode("latin-1")
            raise DecodeError("decode.corrupt", f"PNG chunk {name!r} at byte {at} fails its CRC checksum")
        if kind == b"IEND":
            return
        at = end


def _unidentified(data: bytes, pillow_formats: list[str]) -> DecodeError:
    """Bytes no allowed plugin took: damaged if they carry an allowed format's signature
    (Pillow's own `accept` test), else unsupported. The damaged case gets the plugin's reason."""
    for fmt in pillow_formats:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and accept(data[:16]) is True:
            return _diagnose(fmt, factory, data)
    if "PNG" in pillow_formats and _png_after_damaged_signature(data):
        return DecodeError("decode.corrupt", f"PNG with a damaged signature {data[:8]!r} (expected {_PNG_SIGNATURE!r}; "
                                             "e.g. sent through a text-mode transfer)")
    return DecodeError(
        "decode.unsupported_format",
        f"not an image in an allowed format ({', '.join(pillow_formats)}); starts with {data[:8]!r}")


def _png_after_damaged_signature(data: bytes) -> bool:
    """A PNG whose 8-byte signature was damaged: its first four bytes intact (libpng's test
    for "corrupted by ASCII conversion"), or an IHDR chunk with a valid CRC right after it."""
    if data[:4] == _PNG_SIGNATURE[:4]:
        return True
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        return False
    return zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]


def _diagnose(fmt: str, factory, data: bytes) -> DecodeError:
    """Re-opens `data` with the one plugin whose signature it carries, to say what is wrong."""
    seen: dict[str, tuple[int, int]] = {}
    if isinstance(factory, type):
        class _Probe(factory):  # records the size the header declares before Pillow rejects it
            def _open(self):
                super()._open()
                seen["size"], seen["mode"] = self.size, self.mode
        factory = _Probe
    try:
        factory(io.BytesIO(data), None)
    except Exception as e:  # noqa: BLE001 - the reason is what we are after
        if "size" in seen and min(seen["size"]) <= 0:
            return DecodeError("decode.no_pixels", f"{fmt} image has no pixels ({seen['size'][0]}x{seen['size'][1]})")
        if "size" in seen and not seen["mode"]:
            detail = f" (bit depth {data[24]}, colour type {data[25]})" if fmt == "PNG" and len(data) > 25 else ""
            return DecodeError("decode.corrupt", f"{fmt} header declares no valid pixel format{detail}")
        return _damaged(e, fmt=fmt)
    return DecodeError("decode.corrupt", f"{fmt} signature, but Pillow could not identify the image")


def _damaged(e: Exception, image: Image.Image | None = None, fmt: str | None = None) -> DecodeError:
    """Pillow's errors for damaged data: truncated when it says so, a missing codec when it
    says so, else corrupt. The reason gives Pillow's words (after the format, when the
    format had to be found from the signature)."""
    text = str(e).strip().replace("\n", " ")
    reason = f"{fmt + ': ' if fmt else ''}{type(e).__name__ + ': ' if type(e) is not OSError else ''}{text}"
    lowered = text.lower()
    if _PILLOW_LACKS.search(text):
        return DecodeError("decode.unsupported_codec", f"{reason}: a valid file this Pillow cannot decode")
    if "decoder" in lowered and "not available" in lowered:  # Pillow lacks a decoder it names
        fmt = fmt or (image.format if image is not None else "image")
        return DecodeError("decode.unsupported_codec", f"{fmt}: this Pillow build cannot decode it ({text})")
    compression = image.info.get("compression") if image is not None and image.format == "TIFF" else None
    if compression and not _tiff_codec_available(compression):
        return DecodeError("decode.unsupported_codec",
                           f"TIFF compression {compression!r} is not supported by this Pillow build's libtiff ({text})")
    ended = "truncated" in lowered or isinstance(e, EOFError) or "requires a buffer of at least" in lowered
    return DecodeError("decode.truncated" if ended else "decode.corrupt", reason)


@functools.cache
def _tiff_codec_available(compression: str) -> bool:
    """Whether this Pillow's libtiff has the codec `compression` (a Pillow compression name).

    libtiff reports a missing codec only on stderr ("WEBP compression support is not
    configured"); Pillow's exception says "decoder error -2" either way. libtiff builds its
    encoders and decoders together, so encoding one pixel tells.
    """
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), "TIFF", compression=compression)
    except Exception:  # noqa: BLE001 - any refusal means the codec is not there
        return False
    return True


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB.

    Integer samples wider than 8 bits (16-bit greyscale PNG and TIFF, Pillow modes I;16* and
    I) are scaled by the bit depth their values use: the smallest even depth from 8 bits up
    that holds the largest sample. A 16-bit ramp (0-65535) is divided by 257, a 12-bit scan
    in 16-bit words (0-4095) by 4095/255, and a 16-bit file holding 0-255 is kept as is (as
    transformers, which clips to 255, also does). A plain `>> 8` would turn the last two black,
    clipping would turn the first two white. Float images (mode F) whose values stay within
    0-1 are scaled by 255 (else they would be black); others are clipped to 0-255.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image)
        if image.mode == "F":  # 0-1 floats (scientific TIFFs) are scaled, 0-255 kept, both clipped
            arr = np.nan_to_num(arr.astype(np.float64))
            arr8 = np.rint(np.clip(arr * 255 if arr.size and arr.max() <= 1.0 else arr, 0, 255)).astype(np.uint8)
        else:
            arr8 = scale_to_8bit(arr)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def scale_to_8bit(samples: np.ndarray) -> np.ndarray:
    """Integer samples → uint8 by the bit depth they use (see `to_rgb`); negatives clip to 0."""
    arr = np.clip(samples.astype(np.int64), 0, None)
    bits = max(8, int(arr.max()).bit_length()) if arr.size else 8
    bits += bits % 2
    top = (1 << bits) - 1
    return np.rint(arr * (255.0 / top)).astype(np.uint8)


def resize_and_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize and centre crop an RGB image as the checkpoint's image processor does."""
    import torch  # lazy: torch in the decode tasks only; the driver imports this module without it

    return resize_and_crop_tensor(torch.from_numpy(np.array(image)).permute(2, 0, 1), spec).contiguous().numpy()


def resize_and_crop_tensor(t, spec: PreprocessSpec):
    """`resize_and_crop` on a uint8 [3, H, W] tensor, on whatever device it is (the CPU
    decode path and `batchscore.decoding.device_decode` share it, so both crop alike)."""
    # lazy: torchvision (and torch) in the decode tasks only, not where this module is imported
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if spec.size or spec.shortest_edge:
        t = F.resize(t, list(resize_target(t.shape[-2:], spec)), interpolation=InterpolationMode(spec.interpolation),
                     antialias=True)
    if spec.crop:
        t = _center_crop(t, spec.crop, spec.crop_offsets)
    return t


def resize_target(hw: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """(height, width) after resize: fixed, or shortest edge kept as transformers computes it."""
    if spec.size:
        return spec.size
    h, w = int(hw[0]), int(hw[1])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop(t, crop: tuple[int, int], offsets: str = "floor"):
    """transformers' torchvision-backend centre crop: zero-pad when smaller, then int offsets;
    `offsets="round"` rounds them as torchvision's `CenterCrop` does (timm checkpoints)."""
    # lazy: as in resize_and_crop_tensor
    from torchvision.transforms.v2 import functional as F

    ch, cw = crop
    h, w = t.shape[-2:]
    if cw > w or ch > h:
        pad = [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
               (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0]
        t = F.pad(t, pad, fill=0)
        h, w = t.shape[-2:]
    place = round if offsets == "round" else int
    top, left = int(place((h - ch) / 2.0)), int(place((w - cw) / 2.0))
    return t[..., top:top + ch, left:left + cw]


def _draft_size(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """The smallest size a JPEG may be DCT-downscaled to: DRAFT_MARGIN × the largest target
    side, and never below a quarter of the image's own size.

    libjpeg's 1/8 scale keeps only each block's DC coefficient (an 8×8 box average), and that
    step alone moved probabilities past 1e-3 on a detailed 100-megapixel frame (1.3e-3; the
    1/4 scale: 4.1e-4, docs/architecture.md). A quarter of 11648×8736 is 2912×2184, 19 MB as
    RGB instead of 305 MB at full size.
    """
    if spec.size:
        side = max(spec.size)
    elif spec.shortest_edge:
        w, h = size
        side = max(resize_target((h, w), spec))
    else:
        return size  # no resize: the crop takes the image's own pixels, so no DCT downscaling
    if spec.crop:
        side = max(side, *spec.crop)
    return (max(DRAFT_MARGIN * side, size[0] // 4), max(DRAFT_MARGIN * side, size[1] // 4))
