"""Decode: image bytes → uint8 [3, H, W] at the model's input size, or an error string.

A plain function run in CPU tasks. Pillow opens the bytes with a format allowlist and its
decompression-bomb guard on; JPEGs much larger than the target are decoded at a reduced DCT
scale (`Image.draft`), never below `DRAFT_MARGIN` times the target size; EXIF orientation is
applied; every mode becomes 8-bit RGB (16-bit images are scaled, not clipped). Resize and
centre crop then follow the checkpoint's preprocessing exactly as transformers' default
(torchvision) image processors do them: `torchvision.transforms.v2.functional.resize` with
antialias on uint8, and the same crop offsets. Normalisation is left to the device that runs
the model, so four times less data crosses the object store than with float32.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import sys
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchscore.errors import error as _error
from batchscore.models import PreprocessSpec

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Only decode a JPEG at a reduced DCT scale when the result keeps at least this many times the
# target's largest side. Measured on a 2822x2822 photo mosaic (docs/architecture.md): margin 2
# moved pixels by up to 36 levels and probabilities by 5e-3; margin 4 by 2 levels (mean 0.1)
# and 7e-4, inside the 1e-3 bound against transformers.
DRAFT_MARGIN = 4


class DecodeError(Exception):
    """One image cannot be decoded: `code` (see `batchscore.errors`) and a reason."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def decode_batch(batch: dict[str, np.ndarray], *, spec: PreprocessSpec, max_image_pixels: int,
                 nice: int = 0) -> dict[str, np.ndarray]:
    """Decodes `data` into `pixels`; rows that fail keep zero pixels and get an `error`.

    Args:
        batch: Columns `id`, `data` (bytes), `error` ("" or a read error) and `meta`
            (carried through untouched).
        spec: The checkpoint's preprocessing.
        max_image_pixels: Images declaring more pixels are refused before any pixel is decoded.
        nice: Run the decoding in a thread of this niceness (Linux), so that where decode and
            the model share cores the model's threads are served first; 0 = this thread.

    Returns:
        Columns `id`, `pixels` (uint8 [N, 3, H, W]), `error` and `meta`.
    """
    if nice and sys.platform == "linux":
        return _niced(nice).submit(_decode_rows, batch, spec, max_image_pixels).result()
    return _decode_rows(batch, spec, max_image_pixels)


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


def _decode_rows(batch: dict[str, np.ndarray], spec: PreprocessSpec, max_image_pixels: int) -> dict[str, np.ndarray]:
    h, w = spec.output_hw
    n = len(batch["id"])
    pixels = np.zeros((n, 3, h, w), dtype=np.uint8)
    errors = list(batch["error"])
    for i, data in enumerate(batch["data"]):
        if errors[i]:
            continue
        try:
            pixels[i] = decode_one(data, spec, max_image_pixels)
        except DecodeError as e:
            errors[i] = _error(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - an unforeseen failure still costs one row only
            errors[i] = _error("decode.internal", f"{type(e).__name__}: {e}")
    return {"id": batch["id"], "pixels": pixels, "error": np.array(errors, dtype=object), "meta": batch["meta"]}


def decode_one(data: bytes, spec: PreprocessSpec, max_image_pixels: int) -> np.ndarray:
    """Decodes one image to uint8 [3, H, W]; raises `DecodeError` with a short reason."""
    if not data:
        raise DecodeError("decode.empty", "empty file")
    image = open_image(data, max_image_pixels)
    if image.format == "JPEG":
        image.draft(image.mode, _draft_size(image.size, spec))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decode.bomb", f"decompression bomb refused: {e}") from None
    except OSError as e:  # e.g. "image file is truncated (3 bytes not processed)"
        raise _damaged(e) from e
    image = ImageOps.exif_transpose(image)
    return resize_and_crop(to_rgb(image), spec)


def open_image(data: bytes, max_image_pixels: int) -> Image.Image:
    """Opens (parses the header of, but does not decode) an allowed image within the pixel budget.

    The size check is ours, made on the header before any pixel is allocated; Pillow's own
    guard is then armed at the same limit for decoding (it also checks GIF frame extents).
    """
    Image.MAX_IMAGE_PIXELS = None  # header only: our check below gives the clearer message
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise DecodeError(
            "decode.unsupported_format",
            f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)}); "
            f"starts with {data[:8]!r}"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # a header cut short or damaged (Pillow raises all three)
        raise _damaged(e) from e
    finally:
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    w, h = image.size
    if w * h > max_image_pixels:
        raise DecodeError("decode.bomb", f"decompression bomb refused: {w}x{h} pixels exceeds max_image_pixels={max_image_pixels}")
    if w < 1 or h < 1:
        raise DecodeError("decode.no_pixels", f"image has no pixels ({w}x{h})")
    return image


def _damaged(e: Exception) -> DecodeError:
    """Pillow's errors for damaged data: truncated when it says so, else corrupt."""
    reason = f"{type(e).__name__}: {e}" if type(e) is not OSError else str(e)
    return DecodeError("decode.truncated" if "truncated" in str(e).lower() else "decode.corrupt", reason)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. 16/32-bit greyscale is scaled to 8 bits, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image)
        if image.mode == "F":
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:  # I;16*, or I holding 16-bit samples (e.g. 16-bit PNG)
            arr8 = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize and centre crop an RGB image as the checkpoint's image processor does."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    if spec.size or spec.shortest_edge:
        t = F.resize(t, list(resize_target(t.shape[-2:], spec)), interpolation=InterpolationMode(spec.interpolation),
                     antialias=True)
    if spec.crop:
        t = _center_crop(t, spec.crop)
    return t.contiguous().numpy()


def resize_target(hw: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """(height, width) after resize: fixed, or shortest edge kept as transformers computes it."""
    if spec.size:
        return spec.size
    h, w = int(hw[0]), int(hw[1])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop(t, crop: tuple[int, int]):
    """transformers' torchvision-backend centre crop: zero-pad when smaller, then int offsets."""
    from torchvision.transforms.v2 import functional as F

    ch, cw = crop
    h, w = t.shape[-2:]
    if cw > w or ch > h:
        pad = [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
               (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0]
        t = F.pad(t, pad, fill=0)
        h, w = t.shape[-2:]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return t[..., top:top + ch, left:left + cw]


def _draft_size(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """The smallest size a JPEG may be DCT-downscaled to: DRAFT_MARGIN × the largest target side."""
    if spec.size:
        side = max(spec.size)
    else:
        w, h = size
        side = max(resize_target((h, w), spec))
    if spec.crop:
        side = max(side, *spec.crop)
    return (DRAFT_MARGIN * side, DRAFT_MARGIN * side)
