"""Decode on the model's device: JPEGs decoded in batches by `torchvision.io.decode_jpeg`
(nvJPEG on a GPU), then resized and cropped there exactly as the CPU path does.

Used when `decode_device` is `cuda` (or `auto` with GPU actors), and with `torchvision`,
which runs the same code on the actor's own device (on a CPU: libjpeg-turbo through
torchvision; this is how the path is tested without a GPU). Two halves:

    CPU tasks   `check_batch`: the header of every image is checked as decode does
                (`decode.open_image`: format allowlist, bomb guard, damaged headers). A
                plain JPEG (RGB or greyscale, ending in its EOI marker) is passed on as its
                bytes, with its EXIF orientation; anything else (PNG, WebP, CMYK, MPO, a cut
                short JPEG, ...) is decoded right there by `decode.decode_one` and passed on
                as pixels, so only what the device can take goes to it.
    the actor   `DeviceDecoder`: the JPEGs of a batch in groups of at most `GROUP_PIXELS`
                decoded pixels, one `decode_jpeg(list, device=...)` call each; a group the
                decoder refuses is split in halves until the images it refuses are found
                (nvJPEG's batched call fails whole, returning nothing), and those are decoded
                by `decode.decode_one` on the actor's CPU: a refusal costs that image a CPU
                decode, never the batch. EXIF orientation, resize and crop then run on the
                device, with the CPU path's `decode.resize_and_crop_tensor`.

Rows keep their order and ids; error rows have the same codes as on the CPU path.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

import numpy as np

from batchscore.checkpoints.checkpoint import PreprocessSpec
from batchscore.decoding import decode
from batchscore.errors import error as _error
from batchscore.exceptions import ConfigError
from batchscore.inputs import formats as _formats

log = logging.getLogger(__name__)

# What `check_batch` hands on for each row.
ROUTE_NONE = 0  # an error row: nothing to decode
ROUTE_PIXELS = 1  # decoded by the CPU task: `data` holds uint8 [3, H, W] at the model's size
ROUTE_JPEG = 2  # a baseline JPEG for the device decoder: `data` holds the file's bytes
ROUTE_PROGRESSIVE = 3  # a progressive JPEG: decoded in groups of its own (nvJPEG may refuse them)

# Decoded pixels per decode_jpeg call (RGB: 3 bytes each): 64 Mpx is 192 MiB of GPU memory,
# ~420 photos of 500x375 or 10 of 3000x2000.
GROUP_PIXELS = 64 * 2**20
# EXIF orientation → tensor ops on [C, H, W] (as PIL.ImageOps.exif_transpose).
_EXIF_ORIENTATION = 0x0112


def resolve(decode_device: str, gpus: float) -> str:
    """The config's `decode_device` for actors holding `gpus` GPUs: auto → cuda with GPUs,
    else cpu.

    Raises:
        ConfigError: cuda asked for, but the actors have no GPU.
    """
    if decode_device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if decode_device == "cuda" and gpus <= 0:
        raise ConfigError("decode_device=cuda needs inference actors with a GPU (gpus_per_actor > 0); "
                          "use decode_device cpu, or torchvision to decode in the actor on its CPU")
    return decode_device


def check_batch(batch: dict[str, np.ndarray], *, spec: PreprocessSpec, max_image_pixels: int,
                formats: tuple[str, ...] = _formats.DEFAULT_FORMATS, nice: int = 0) -> dict[str, np.ndarray]:
    """The CPU half: header checks; JPEGs passed on as bytes, everything else decoded here.

    Args:
        batch: Columns `id`, `data` (bytes), `error` ("" or a read error) and `meta`.
        spec, max_image_pixels, formats, nice: As for `decode.decode_batch`.

    Returns:
        Columns `id`, `data` (bytes: a JPEG file, or uint8 [3, H, W] pixels), `route`
        (int8, ROUTE_*), `orientation` (int8 EXIF orientation, 1 = as stored), `error`,
        `meta` and `decode_seconds` (CPU seconds per row).
    """
    if nice:
        if sys.platform == "linux":
            return decode._niced(nice).submit(_check_rows, batch, spec, max_image_pixels, formats).result()
    return _check_rows(batch, spec, max_image_pixels, formats)


def _check_rows(batch, spec, max_image_pixels, formats) -> dict[str, np.ndarray]:
    began = time.perf_counter()
    n = len(batch["id"])
    data = np.empty(n, dtype=object)
    route = np.zeros(n, dtype=np.int8)
    orientation = np.ones(n, dtype=np.int8)
    errors = list(batch["error"])
    for i, raw in enumerate(batch["data"]):
        data[i] = b""
        if errors[i]:
            continue
        try:
            kind, orientation[i] = jpeg_route(raw, max_image_pixels, formats)
            if kind:
                route[i], data[i] = kind, raw
            else:
                route[i], data[i] = ROUTE_PIXELS, decode.decode_one(raw, spec, max_image_pixels, formats).tobytes()
        except decode.DecodeError as e:
            errors[i] = _error(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - a bug of ours still costs one row only
            log.exception("decode.internal on %s (a bug in batchscore: please report it)", batch["id"][i])
            errors[i] = _error("decode.internal", f"{type(e).__name__}: {e}")
    seconds = np.full(n, (time.perf_counter() - began) / max(n, 1))
    return {"id": batch["id"], "data": data, "route": route, "orientation": orientation,
            "error": np.array(errors, dtype=object), "meta": batch["meta"], "decode_seconds": seconds}


def jpeg_route(data: bytes, max_image_pixels: int, formats: tuple[str, ...]) -> tuple[int, int]:
    """(ROUTE_JPEG or ROUTE_PROGRESSIVE, EXIF orientation) for a JPEG the device decoder can
    take, (0, 1) for an image the CPU must decode.

    The device takes plain JPEGs only: RGB or greyscale (CMYK/YCCK converts differently),
    not MPO (decode_jpeg would read its first picture, but Pillow is the reference for it),
    and ending in the EOI marker (a cut-short file is the CPU path's `decode.truncated`;
    libjpeg would fill the rest with grey).

    Raises:
        DecodeError: as `decode.open_image` (format not allowed, bomb, damaged header, ...).
    """
    if not data:
        raise decode.DecodeError("decode.empty", "empty file")
    image = decode.open_image(data, max_image_pixels, formats)
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return 0, 1
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block: let the CPU path say what it makes of it
        return 0, 1
    if orientation not in range(1, 9):
        orientation = 1  # as exif_transpose: an unknown value leaves the image as stored
    progressive = image.info.get("progressive") or image.info.get("progression")
    return (ROUTE_PROGRESSIVE if progressive else ROUTE_JPEG), orientation


def orient(t, orientation: int):
    """Applies an EXIF orientation (1-8) to a [C, H, W] tensor, as `ImageOps.exif_transpose`."""
    import torch  # lazy: torch in the inference actor only; the CPU tasks import this module without it

    if orientation == 2:
        return t.flip(-1)
    if orientation == 3:
        return t.flip(-2, -1)
    if orientation == 4:
        return t.flip(-2)
    if orientation == 5:
        return t.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(t, -1, dims=(-2, -1))
    if orientation == 7:
        return t.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(t, 1, dims=(-2, -1))
    return t


def groups(sizes: list[int], budget: int = GROUP_PIXELS) -> list[list[int]]:
    """Positions in `sizes` (decoded pixels per image) split into runs of at most `budget`
    pixels each (an image larger than the budget goes alone)."""
    out, current, total = [], [], 0
    for i, size in enumerate(sizes):
        if current and total + size > budget:
            out.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        out.append(current)
    return out


class DeviceDecoder:
    """The actor half: a `check_batch` batch → uint8 [N, 3, H, W] on `device`, and errors.

    Attributes:
        stats: Counts since the actor started: images decoded on the device, fell back to
            the CPU (refused by the device decoder), came decoded from the CPU tasks; decode
            calls, and seconds in them.
    """

    def __init__(self, spec: PreprocessSpec, device, max_image_pixels: int,
                 formats: tuple[str, ...] = _formats.DEFAULT_FORMATS, group_pixels: int = GROUP_PIXELS):
        import torch  # lazy: torch in the inference actor only; the CPU tasks import this module without it

        self.spec, self.device = spec, torch.device(device)
        self.max_image_pixels, self.formats, self.group_pixels = max_image_pixels, formats, group_pixels
        self.progressive_on_device = True  # until a whole group of progressive JPEGs is refused
        self.stats = {"device": 0, "fallback": 0, "cpu_task": 0, "calls": 0, "seconds": 0.0}

    def __call__(self, batch: dict[str, np.ndarray]):
        """Returns (pixels uint8 [N, 3, H, W] on the device, errors list, "" for none)."""
        import torch  # lazy: torch in the inference actor only; the CPU tasks import this module without it

        began = time.perf_counter()
        h, w = self.spec.output_hw
        n = len(batch["id"])
        errors = list(batch["error"])
        route = np.asarray(batch["route"])
        out = torch.zeros((n, 3, h, w), dtype=torch.uint8, device=self.device)
        ready = [i for i in range(n) if route[i] == ROUTE_PIXELS and not errors[i]]
        if ready:
            host = np.stack([np.frombuffer(batch["data"][i], np.uint8).reshape(3, h, w) for i in ready])
            out[torch.as_tensor(ready, device=self.device)] = torch.from_numpy(host).to(self.device)
            self.stats["cpu_task"] += len(ready)
        fallback = []
        for kind in (ROUTE_JPEG, ROUTE_PROGRESSIVE):
            rows = [i for i in range(n) if route[i] == kind and not errors[i]]
            if kind == ROUTE_PROGRESSIVE and not self.progressive_on_device:
                fallback += rows
                continue
            for group in groups([_pixels_of(batch["data"][i]) for i in rows], self.group_pixels):
                picked = [rows[j] for j in group]
                decoded = self._decode([batch["data"][i] for i in picked])
                if kind == ROUTE_PROGRESSIVE and all(isinstance(t, Exception) for t in decoded):
                    self.progressive_on_device = False
                    log.info("device decoder refused a whole group of progressive JPEGs (%s): they are decoded "
                             "on the CPU from now on", decoded[0])
                for i, t in zip(picked, decoded):
                    if isinstance(t, Exception):
                        fallback.append(i)
                        continue
                    try:
                        out[i] = decode.resize_and_crop_tensor(orient(t, int(batch["orientation"][i])), self.spec)
                        self.stats["device"] += 1
                    except Exception as e:  # noqa: BLE001 - one image only; the CPU path decides
                        log.warning("device resize of %s failed (%s): decoded on the CPU", batch["id"][i], e)
                        fallback.append(i)
        for i in sorted(fallback):
            try:
                pixels = decode.decode_one(batch["data"][i], self.spec, self.max_image_pixels, self.formats)
                out[i] = torch.from_numpy(pixels).to(self.device)
                self.stats["fallback"] += 1
            except decode.DecodeError as e:
                errors[i] = _error(e.code, str(e))
            except Exception as e:  # noqa: BLE001 - a bug of ours still costs one row only
                log.exception("decode.internal on %s (a bug in batchscore: please report it)", batch["id"][i])
                errors[i] = _error("decode.internal", f"{type(e).__name__}: {e}")
        self.stats["seconds"] += time.perf_counter() - began
        return out, errors

    def _decode(self, files: list[bytes]) -> list:
        """Decoded [3, H, W] tensors on the device, or the exception for each file refused.
        A refused call is split in halves (the batched decoder returns nothing on an error)."""
        import torch  # lazy: torch and torchvision in the inference actor only
        from torchvision.io import ImageReadMode, decode_jpeg

        self.stats["calls"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders, each call
                tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except Exception as e:  # noqa: BLE001 - RuntimeError from libjpeg/nvJPEG, or GPU memory
            if len(files) == 1:
                return [e]
            half = len(files) // 2
            return self._decode(files[:half]) + self._decode(files[half:])


def _pixels_of(jpeg: bytes) -> int:
    """Pixels a JPEG decodes to, from its SOF marker (no Pillow here: the actor's time is the GPU's)."""
    at, n = 2, len(jpeg)
    while at + 9 < n:
        if jpeg[at] != 0xFF:
            at += 1
            continue
        marker = jpeg[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            at += 1 if marker == 0xFF else 2
            continue
        length = (jpeg[at + 2] << 8) | jpeg[at + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = (jpeg[at + 5] << 8) | jpeg[at + 6], (jpeg[at + 7] << 8) | jpeg[at + 8]
            return max(1, height * width)
        at += 2 + length
    return 1
