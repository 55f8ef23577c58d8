"""Decode: bytes → uint8 [3, H, W] exactly as transformers preprocesses, or a coded error."""

from __future__ import annotations

import concurrent.futures
import io
import os
import struct
import sys
import threading
import zlib

import numpy as np
import pytest
from conftest import make_checkpoint, real_photo_paths
from PIL import Image

from batchscore.checkpoints import models
from batchscore.checkpoints.checkpoint import PreprocessSpec
from batchscore.decoding import decode
from batchscore.decoding.decode import DecodeError, decode_batch, decode_one

BIG = 10**9


def spec(h: int, w: int, crop=None, interpolation="bilinear") -> PreprocessSpec:
    return PreprocessSpec(size=(h, w), shortest_edge=None, interpolation=interpolation, crop=crop,
                          rescale_factor=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=48, h=32) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.mark.parametrize("kind", ["vit", "deit", "beit"])
def test_pixels_equal_transformers_image_processor(tmp_path, kind):
    """For every real photo (none large enough for draft mode), our uint8 pixels normalised as
    the checkpoint says equal transformers' own pixel_values."""
    import torch
    import transformers

    ckpt = make_checkpoint(kind, tmp_path / kind)
    info = models.resolve(str(ckpt))
    proc = transformers.AutoImageProcessor.from_pretrained(str(ckpt))
    mean = torch.tensor(info.preprocess.mean)[:, None, None]
    std = torch.tensor(info.preprocess.std)[:, None, None]
    for path in real_photo_paths():
        if path.name in ("retina.jpg",):  # 1411 px: decoded at half scale, see test_draft_*
            continue
        ref = proc(transformers.image_utils.load_image(str(path)), return_tensors="pt")["pixel_values"][0]
        ours = (torch.from_numpy(decode_one(path.read_bytes(), info.preprocess, BIG)).float() / 255 - mean) / std
        assert ours.shape == ref.shape
        assert float((ours - ref).abs().max()) < 1e-5, path.name


def test_draft_mode_is_used_for_large_jpegs_and_stays_faithful(photos, monkeypatch):
    data = (photos / "mosaic-large.jpg").read_bytes()  # 2822 x 2822
    s = spec(224, 224)
    drafted = decode_one(data, s, BIG)
    monkeypatch.setattr(decode, "DRAFT_MARGIN", 10**6)  # never draft
    full = decode_one(data, s, BIG)
    diff = np.abs(full.astype(int) - drafted.astype(int))
    print(f"FIGURE draft vs full decode of a 2822px JPEG at 224: max {diff.max()} levels, mean {diff.mean():.3f}")
    assert diff.max() > 0, "draft mode was not used"
    assert diff.mean() < 0.5 and diff.max() <= 8


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "RGB"])
def test_every_mode_becomes_rgb(mode):
    src = gradient()
    image = src.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_one(encode(image, fmt), spec(32, 48), BIG)
    assert out.shape == (3, 32, 48) and out.dtype == np.uint8
    expected = np.asarray(image.convert("RGB")).transpose(2, 0, 1).astype(int)
    assert np.abs(out.astype(int) - expected).mean() < 3


def test_palette_with_transparency():
    image = gradient().convert("P")
    image.info["transparency"] = 0
    out = decode_one(encode(image, "PNG", transparency=0), spec(32, 48), BIG)
    assert out.shape == (3, 32, 48)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode.startswith("I")
    out = decode_one(encode(image, "PNG"), spec(32, 48), BIG)
    expected = (values >> 8).astype(np.uint8)
    assert np.abs(out[0].astype(int) - expected).max() <= 1
    assert out[0].max() >= 254 and out[0].min() == 0 and (out[0] == 255).mean() < 0.05


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    image.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_one(encode(image, "JPEG", exif=exif, quality=95), spec(40, 20), BIG)
    assert out.shape == (3, 40, 20)
    top, bottom = out[:, :15].reshape(3, -1).mean(1), out[:, 25:].reshape(3, -1).mean(1)
    assert top[0] > 200 and top[2] < 60, top  # red on top after rotation
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = decode_one(data, spec(16, 16), BIG)
    assert out[0].mean() > 200 and out[2].mean() < 50


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated(fmt: str) -> bytes:
    data = encode(Image.open(real_photo_paths()[0]).convert("RGB"), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize("data, reason", [
    (b"", "decode.empty: empty file"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "decode.unsupported_format: not an image in an allowed format"),
    (b"<html><body>404 Not Found</body></html>", "decode.unsupported_format: not an image in an allowed format"),
    (lambda: truncated("JPEG"), "decode.truncated: image file is truncated"),
    (lambda: truncated("PNG"), "decode.truncated: "),
    (lambda: encode(gradient(), "PPM"), "decode.unsupported_format: not an image in an allowed format"),
    (png_header_only(100_000, 100_000), "decode.bomb: decompression bomb refused"),
    (png_header_only(20_000, 5_000), "decode.bomb: decompression bomb refused"),
])
def test_bad_inputs_become_error_rows(data, reason):
    data = data() if callable(data) else data
    batch = {"id": np.array(["good", "bad"], dtype=object),
             "data": np.array([encode(gradient(), "PNG"), data], dtype=object),
             "error": np.array(["", ""], dtype=object), "meta": np.array(["{}", "{}"], dtype=object)}
    out = decode_batch(batch, spec=spec(32, 48), max_image_pixels=50_000_000)
    assert out["error"][0] == ""
    assert out["error"][1].startswith(reason), out["error"][1]
    assert out["pixels"].shape == (2, 3, 32, 48) and out["pixels"][0].any() and not out["pixels"][1].any()


def test_bomb_is_refused_before_decoding():
    with pytest.raises(DecodeError, match=r"100000x100000 pixels exceeds max_image_pixels"):
        decode.open_image(png_header_only(100_000, 100_000), max_image_pixels=89_478_485)


def test_read_errors_pass_through():
    batch = {"id": np.array(["x"], dtype=object), "data": np.array([b""], dtype=object),
             "error": np.array(["read.not_found: FileNotFoundError: x"], dtype=object), "meta": np.array(["{}"], dtype=object)}
    out = decode_batch(batch, spec=spec(8, 8), max_image_pixels=BIG)
    assert out["error"][0] == "read.not_found: FileNotFoundError: x"


def test_shortest_edge_resize_follows_transformers():
    s = PreprocessSpec(size=None, shortest_edge=64, interpolation="bicubic", crop=(56, 56),
                       rescale_factor=1 / 255, mean=None, std=None)
    assert decode.resize_target((300, 451), s) == (64, 96)
    assert decode.resize_target((451, 300), s) == (96, 64)
    out = decode_one(encode(gradient(451, 300), "PNG"), s, BIG)
    assert out.shape == (3, 56, 56)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are niced one by one on Linux only")
def test_niced_decode_runs_in_a_lower_priority_thread_and_gives_the_same_pixels(photos):
    files = sorted(photos.glob("*.jpg"))[:3]
    batch = {"id": np.array([f.name for f in files], dtype=object),
             "data": np.array([f.read_bytes() for f in files], dtype=object),
             "error": np.array([""] * len(files), dtype=object), "meta": np.array(["{}"] * len(files), dtype=object)}
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    plain = decode_batch(batch, spec=spec(32, 32), max_image_pixels=BIG)
    niced = decode_batch(batch, spec=spec(32, 32), max_image_pixels=BIG, nice=mine + 7)
    assert np.array_equal(plain["pixels"], niced["pixels"]) and list(plain["error"]) == list(niced["error"])
    assert plain["pixels"].any()
    pool = decode._NICED[mine + 7]
    assert pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result() == mine + 7
    # Only the decode thread was reniced: this thread (a Ray worker's, for its next task) was not.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are niced one by one on Linux only")
def test_decode_niceness_is_only_ever_raised():
    """In a worker already nicer than decode_nice, decode stays as nice: lowering needs
    privileges, and a failed renice in the pool's initializer would fail every batch."""
    def renice_in_a_thread(start: int, ask: int) -> int:
        def run() -> int:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, start)
            decode._renice(ask)
            return os.getpriority(os.PRIO_PROCESS, tid)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert renice_in_a_thread(mine + 5, mine + 2) == mine + 5
    assert renice_in_a_thread(mine + 5, mine + 8) == mine + 8
