"""Bad inputs: 1,000 inputs with 5% bad ones of every kind. Rows out = rows in, no good row
lost or mixed up, every bad row carries its stable code; decompression bombs are refused
without allocating their pixels (peak worker memory measured) and without a worker crash."""

from __future__ import annotations

import collections
import io
import struct
import zlib

import numpy as np
import pytest
from conftest import small_photos
from PIL import Image

from batchscore import pipeline
from batchscore.checkpoints import models
from batchscore.checkpoints.checkpoint import PreprocessSpec
from batchscore.config import ScoreConfig
from batchscore.decoding import decode


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG declaring w x h pixels, with no pixel data to speak of."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IEND", b""))


def png_real_bomb(w: int = 100_000, h: int = 100_000, rgb: bool = False) -> bytes:
    """A valid PNG of w x h black pixels, 1-bit (or 8-bit RGB): the 1-bit default is ~5 MB
    that decode to 10^10 pixels (30 GB as RGB)."""
    comp = zlib.compressobj(1)
    rows = (b"\x00" * (1 + (3 * w if rgb else (w + 7) // 8))) * 1000
    idat = b"".join(comp.compress(rows) for _ in range(h // 1000)) + comp.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0) if rgb else struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def gif_huge_frame(frame: int = 30_000) -> bytes:
    """A 10x10 GIF whose first frame declares frame x frame pixels."""
    return (b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, frame, frame, 0) + b"\x02\x02\x4c\x01\x00\x3b")


def psd(w: int = 8, h: int = 8) -> bytes:
    """A valid uncompressed 8-bit RGB Photoshop file (Pillow reads PSD, but it is not allowed)."""
    head = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3) + struct.pack(">III", 0, 0, 0)
    return head + struct.pack(">H", 0) + bytes(range(w * h)) * 3


def eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nnewpath 0 0 moveto 8 8 lineto stroke\n"


def fits() -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                    8", "NAXIS2  =                    8", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    return header + bytes(64).ljust(2880, b"\x00")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def odd_good_images(base: Image.Image) -> dict[str, bytes]:
    """Valid images of the awkward kinds: each must be scored, not flagged."""
    rgb = base.convert("RGB").resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT), rgb.convert("L").convert("RGB")]
    sixteen = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    return {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": encode(Image.fromarray(sixteen), "PNG"),
        "palette.png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "exif-rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "one-pixel.png": encode(rgb.resize((1, 1)), "PNG"),
        "wide-20000x20.png": encode(rgb.resize((20_000, 20)), "PNG"),
    }


def bad_images(good: bytes, good_png: bytes, real_bomb: bytes) -> dict[str, tuple[bytes, str]]:
    """{name: (bytes, expected error code)}: one of every bad kind."""
    return {
        "zero-bytes.jpg": (b"", "decode.empty"),
        "truncated.jpg": (good[: len(good) // 2], "decode.truncated"),
        "truncated.png": (good_png[: len(good_png) // 2], "decode.truncated"),
        "random-bytes.jpg": (np.random.default_rng(7).bytes(5000), "decode.unsupported_format"),
        "html.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "decode.unsupported_format"),
        "photoshop.jpg": (psd(), "decode.unsupported_format"),
        "postscript.jpg": (eps(), "decode.unsupported_format"),
        "fits.jpg": (fits(), "decode.unsupported_format"),
        "bomb-header.png": (png_header_bomb(), "decode.bomb"),
        "bomb-real.png": (real_bomb, "decode.bomb"),
        "bomb-gif-frame.gif": (gif_huge_frame(), "decode.bomb"),
    }


@pytest.fixture(scope="module")
def real_bomb() -> bytes:
    return png_real_bomb()


def test_crafted_files_are_what_they_claim(real_bomb):
    """The PSD, EPS and FITS files are real ones Pillow could open were they allowed."""
    for data, fmt in ((psd(), "PSD"), (eps(), "EPS"), (fits(), "FITS")):
        assert Image.open(io.BytesIO(data)).format == fmt
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # header only; nothing is decoded
    try:
        with Image.open(io.BytesIO(real_bomb)) as im:
            assert im.size == (100_000, 100_000) and im.mode == "1" and len(real_bomb) < 8_000_000
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@pytest.fixture(scope="module")
def battery(session_tmp, real_bomb) -> tuple:
    """1,000 inputs: 950 good (small real photos plus 8 awkward kinds x 3) and 50 bad."""
    d = session_tmp / "battery"
    small_photos(d, 950 - 24, seed=11)
    base = Image.open(d / "img-00001.jpg")
    for copy in range(3):
        for name, data in odd_good_images(base.rotate(90 * copy)).items():
            (d / f"odd{copy}-{name}").write_bytes(data)
    good_jpeg, good_png = (d / "img-00001.jpg").read_bytes(), (d / "img-00000.png").read_bytes()
    kinds = bad_images(good_jpeg, good_png, real_bomb)
    expected_bad = {}
    for i in range(50):
        name, (data, code) = list(kinds.items())[i % len(kinds)]
        path = d / f"bad{i:02d}-{name}"
        path.write_bytes(data)
        expected_bad[str(path)] = code
    assert len(list(d.iterdir())) == 1000
    return d, expected_bad


def reference_probs(paths, checkpoint, spec, labels) -> dict[str, dict[str, float]]:
    """Each good image scored on its own, in this process: decode + the model in fp32."""
    import torch
    from transformers import AutoModelForImageClassification

    net = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    out = {}
    for start in range(0, len(paths), 64):
        chunk = paths[start:start + 64]
        pixels = torch.from_numpy(np.stack([decode.decode_one(p.read_bytes(), spec, 89_478_485) for p in chunk]))
        with torch.inference_mode():
            probs = torch.softmax(net(pixel_values=(pixels.float() * spec.rescale_factor - mean) / std).logits, -1)
        for p, row in zip(chunk, probs.numpy()):
            out[str(p)] = dict(zip(labels, row.tolist()))
    return out


def test_a_thousand_inputs_with_five_percent_bad(ray_session, battery, checkpoints, tmp_path):
    folder, expected_bad = battery
    config = ScoreConfig(input=(str(folder),), output=str(tmp_path / "out"), model=str(checkpoints["vit"]),
                         dtype="fp32", top_k=0, batch_size=16, max_error_fraction=0.06)
    result = pipeline.score(config)
    frame = result.to_pandas().set_index("id")
    listed = sorted(str(p) for p in folder.iterdir())
    assert sorted(frame.index) == listed  # rows out = rows in, one per input

    bad = frame[frame["error"].notna()]
    wrong = {i: (expected_bad.get(i), bad["error"].get(i)) for i in set(bad.index) | set(expected_bad)
             if bad["error_code"].get(i) != expected_bad.get(i)}
    assert not wrong, wrong
    assert (bad["error"].str.split(":").str[0] == bad["error_code"]).all()
    assert result.errors_by_code == dict(collections.Counter(expected_bad.values()))

    good = frame[frame["error"].isna()]
    model = models.resolve(str(checkpoints["vit"]))
    ref = reference_probs([p for p in sorted(folder.iterdir()) if str(p) not in expected_bad],
                          checkpoints["vit"], model.preprocess, model.labels)
    delta = max(abs(dict(zip(row.labels, row.probs))[k] - v) for i, row in good.iterrows() for k, v in ref[i].items())
    print(f"FIGURE battery: {len(listed)} in, {len(frame)} out, {len(good)} scored (of {len(ref)} good), "
          f"{len(bad)} bad all coded {result.errors_by_code}; max |dp| vs each image scored alone {delta:.1e}; "
          f"{result.images_per_second:.1f} images/s")
    assert len(good) == len(ref) == 950 and delta < 1e-4


def test_bombs_are_refused_without_growing_the_worker_s_memory(ray_session, real_bomb):
    bombs = {"header": png_header_bomb(), "real-1bit": real_bomb, "gif-frame": gif_huge_frame(),
             # over the limit by a little: still refused on the header (4.5 GB of RGB if decoded)
             "just-over": png_header_bomb(40_000, 37_500)}
    # Defined here so Ray ships it by value (the test module is not importable in workers).
    def _decode_in_fresh_worker(files: dict[str, bytes], max_image_pixels: int) -> dict:
        def status(key: str) -> int:  # bytes
            return 1024 * int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

        # A pooled worker may have peaked earlier (another test's decode): restart its peak
        # (VmHWM) from now, Linux's clear_refs, so only this task's decoding counts.
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS:")
        spec = PreprocessSpec(size=(224, 224), shortest_edge=None, interpolation="bilinear", crop=None,
                                     rescale_factor=1 / 255, mean=None, std=None)
        batch = {"id": np.array(list(files), dtype=object), "data": np.array(list(files.values()), dtype=object),
                 "error": np.array([""] * len(files), dtype=object), "meta": np.array(["{}"] * len(files), dtype=object)}
        out = decode.decode_batch(batch, spec=spec, max_image_pixels=max_image_pixels)
        peak = status("VmHWM:")
        return {"errors": dict(zip(files, out["error"])), "rss_before": before, "peak": peak}

    task = ray_session.remote(max_calls=1, num_cpus=0.5)(_decode_in_fresh_worker)
    got = ray_session.get(task.remote(bombs, 89_478_485))
    print(f"FIGURE bombs: peak worker RSS {got['peak'] / 2**20:.0f} MiB (before decoding {got['rss_before'] / 2**20:.0f} "
          f"MiB) for {len(bombs)} bombs declaring up to 10^10 pixels")
    assert all(e.startswith("decode.bomb: ") for e in got["errors"].values()), got["errors"]
    # Refused from their headers: decoding them grows the worker's peak by almost nothing (the
    # worker may be a pooled one that already holds memory from an earlier task).
    assert got["peak"] - got["rss_before"] < 64 * 2**20
    # Control: the measurement sees a large image that is allowed and decoded (6000x6000,
    # 108 MB as RGB), in a worker alive and well after the bombs.
    control = ray_session.get(task.remote({"ok": png_real_bomb(6000, 6000, rgb=True)}, 89_478_485))
    grew = (control["peak"] - control["rss_before"]) / 2**20
    print(f"FIGURE bombs control: decoding an allowed 6000x6000 PNG raised the peak by {grew:.0f} MiB")
    assert control["errors"] == {"ok": ""} and grew > 100
