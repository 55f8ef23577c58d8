"""Decoding on the model's device (`batchscore.decoding.device_decode`), run here with torchvision's
decode_jpeg on the CPU: the same code as on a GPU but for the device string. Pixels are
compared with the Pillow path (`decode.decode_batch`); refused images fall back per image."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import PREPROCESSOR
from PIL import Image

from batchscore.checkpoints import models
from batchscore.checkpoints.checkpoint import PreprocessSpec
from batchscore.decoding import decode, device_decode
from batchscore.exceptions import ConfigError
from batchscore.inference import predict
from batchscore.inference.feed import FeedOptions

BIG = 10**9


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, PreprocessSpec]:
    """The published preprocessing of ViT (resize 224 bilinear) and DeiT (256 bicubic, crop 224)."""
    out = {}
    wide = {**PREPROCESSOR["vit"], "size": {"height": 40, "width": 64}}  # not square: orientation shows
    for kind, config in (("vit", PREPROCESSOR["vit"]), ("deit", PREPROCESSOR["deit"]), ("wide", wide)):
        d = tmp_path_factory.mktemp(kind)
        (d / "preprocessor_config.json").write_text(json.dumps(config))
        out[kind] = models.preprocess_spec(d)
    return out


def jpeg(image: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    image.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def batch_of(files: dict[str, bytes], errors: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    errors = errors or {}
    return {"id": np.array(list(files), dtype=object), "data": np.array(list(files.values()), dtype=object),
            "error": np.array([errors.get(k, "") for k in files], dtype=object),
            "meta": np.array([json.dumps({"n": i}) for i in range(len(files))], dtype=object)}


def on_device(batch, spec, decoder=None):
    checked = device_decode.check_batch(batch, spec=spec, max_image_pixels=BIG)
    decoder = decoder or device_decode.DeviceDecoder(spec, "cpu", BIG)
    pixels, errors = decoder(checked)
    return checked, pixels.numpy(), errors, decoder


def test_device_path_matches_the_pillow_path_on_real_photos(photos, specs):
    """Small JPEGs: the same pixels (torchvision and Pillow both run libjpeg-turbo, then the
    same resize). Large ones differ by the CPU path's DCT draft scale only (FIGURE lines)."""
    files = {p.name: p.read_bytes() for p in sorted(photos.iterdir())}
    for kind in ("vit", "deit"):
        spec, batch = specs[kind], batch_of(files)
        checked, ours, errors, decoder = on_device(batch, spec)
        ref = decode.decode_batch(batch, spec=spec, max_image_pixels=BIG)
        assert errors == list(ref["error"]) == [""] * len(files)
        assert decoder.stats["device"] == sum(1 for f in files if f.endswith(".jpg"))
        for i, name in enumerate(files):
            diff = np.abs(ours[i].astype(int) - ref["pixels"][i].astype(int))
            drafted = Image.open(photos / name).size[0] >= 4 * 4 * 224 // 2 and name.endswith(".jpg")
            if not name.endswith(".jpg") or not drafted:
                assert diff.max() == 0, (kind, name, diff.max())
            print(f"FIGURE device-vs-pillow {kind} {name}: max {diff.max()} mean {diff.mean():.3f} levels")


def test_model_outputs_of_both_paths_agree(photos, checkpoints):
    """Probabilities from the in-actor torchvision path vs the Pillow path, calibrated ViT, fp32."""
    info = models.resolve(str(checkpoints["vit"]))
    files = {p.name: p.read_bytes() for p in sorted(photos.iterdir())}
    batch = batch_of(files)
    plain = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=0, batch_size=4))
    pixels = decode.decode_batch(batch, spec=info.preprocess, max_image_pixels=BIG)
    ref = plain(pixels).to_pylist()
    ours_actor = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=0, batch_size=4,
                                   feeding=FeedOptions(decode_on_device=True, max_image_pixels=BIG)))
    ours = ours_actor(device_decode.check_batch(batch, spec=info.preprocess, max_image_pixels=BIG)).to_pylist()
    assert [r["id"] for r in ours] == [r["id"] for r in ref] == list(files)
    worst = 0.0
    for a, b in zip(ours, ref):
        pa_, pb = dict(zip(a["labels"], a["probs"])), dict(zip(b["labels"], b["probs"]))
        worst = max(worst, max(abs(pa_[k] - pb[k]) for k in pb))
    print(f"FIGURE device-vs-pillow max |dp| (ViT test checkpoint, fp32, {len(files)} photos): {worst:.2e}")
    assert worst < 1e-3


def test_refused_and_other_formats_fall_back_per_image_keeping_order_and_ids(photos, specs):
    spec = specs["deit"]
    chelsea = Image.open(photos / "chelsea.png").convert("RGB")
    base = jpeg(chelsea)
    bad_huffman = bytearray(base)
    at = bytes(bad_huffman).index(b"\xff\xc4")  # the first DHT: libjpeg refuses its table at decode
    bad_huffman[at + 5:at + 21] = b"\xff" * 16
    png = io.BytesIO()
    chelsea.save(png, "PNG")
    files = {
        "jpeg": base,
        "png": png.getvalue(),
        "progressive": jpeg(chelsea, progressive=True),
        "cmyk": jpeg(chelsea.convert("CMYK")),
        "grey": jpeg(chelsea.convert("L")),
        "corrupt": bytes(bad_huffman),
        "truncated": base[: len(base) // 2],
        "unreadable": b"",
        "webp": (lambda b: (chelsea.save(b, "WEBP", lossless=True), b.getvalue())[1])(io.BytesIO()),
        "jpeg-again": jpeg(chelsea.rotate(90, expand=True)),
    }
    batch = batch_of(files, errors={"unreadable": "read.not_found: FileNotFoundError: gone"})
    checked, ours, errors, decoder = on_device(batch, spec)
    ref = decode.decode_batch(batch, spec=spec, max_image_pixels=BIG)
    route = dict(zip(files, checked["route"]))
    assert route == {"jpeg": 2, "png": 1, "progressive": 3, "cmyk": 1, "grey": 2, "corrupt": 2, "truncated": 0,
                     "unreadable": 0, "webp": 1, "jpeg-again": 2}
    assert list(checked["id"]) == list(files) and list(checked["meta"]) == list(batch["meta"])
    assert errors == list(ref["error"])  # the same error rows, codes and reasons
    assert errors[list(files).index("corrupt")].startswith("decode.corrupt: ")
    assert errors[list(files).index("truncated")].startswith("decode.truncated: ")
    assert errors[list(files).index("unreadable")].startswith("read.not_found")
    assert np.array_equal(ours, ref["pixels"])  # every row's pixels, zero for error rows
    assert decoder.stats == {**decoder.stats, "device": 4, "cpu_task": 3, "fallback": 0}


def test_a_decoder_refusing_progressive_jpegs_falls_back_and_stops_trying(photos, specs, monkeypatch):
    """nvJPEG's batched call fails whole; the group is split until the refused images are
    found, those are decoded on the CPU, and after a whole group of progressive JPEGs is
    refused they go to the CPU directly."""
    import torchvision.io

    spec = specs["vit"]
    real = torchvision.io.decode_jpeg

    def refuses_progressive(tensors, **kw):
        if any(b"\xff\xc2" in bytes(t.numpy()) for t in tensors):
            raise RuntimeError("nvjpeg: progressive JPEG not supported (simulated)")
        return real(tensors, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_progressive)
    sources = [Image.open(photos / n).convert("RGB") for n in ("chelsea.png", "coffee.png", "astronaut.png")]
    files = {}
    for i, im in enumerate(sources * 2):
        files[f"p{i}" if i % 2 else f"b{i}"] = jpeg(im, progressive=bool(i % 2))
    batch = batch_of(files)
    decoder = device_decode.DeviceDecoder(spec, "cpu", BIG)
    checked, ours, errors, _ = on_device(batch, spec, decoder)
    ref = decode.decode_batch(batch, spec=spec, max_image_pixels=BIG)
    assert errors == [""] * len(files) and np.array_equal(ours, ref["pixels"])
    assert decoder.stats["device"] == 3 and decoder.stats["fallback"] == 3
    assert decoder.progressive_on_device is False
    calls = decoder.stats["calls"]
    on_device(batch, spec, decoder)
    assert decoder.stats["calls"] == calls + 1  # the baseline group only: progressive ones went to the CPU


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_the_device_as_pillow_does(photos, specs, orientation):
    spec = specs["wide"]
    image = Image.open(photos / "chelsea.png").convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = orientation
    files = {"rotated": jpeg(image, exif=exif.tobytes())}
    checked, ours, errors, _ = on_device(batch_of(files), spec)
    assert checked["orientation"][0] == orientation and errors == [""]
    assert np.array_equal(ours[0], decode.decode_one(files["rotated"], spec, BIG))


def test_groups_keep_to_the_pixel_budget_and_sizes_come_from_the_header(photos):
    assert device_decode.groups([5, 5, 5, 20, 1], budget=10) == [[0, 1], [2], [3], [4]]
    assert device_decode.groups([], budget=10) == []
    for name in ("rocket.jpg", "china.jpg", "mosaic-large.jpg"):
        w, h = Image.open(photos / name).size
        assert device_decode._pixels_of((photos / name).read_bytes()) == w * h


def test_decode_device_resolves_from_the_actors_gpus():
    assert device_decode.resolve("auto", 0) == "cpu"
    assert device_decode.resolve("auto", 1) == "cuda"
    assert device_decode.resolve("torchvision", 0) == "torchvision"
    with pytest.raises(ConfigError, match="decode_device=cuda needs inference actors with a GPU"):
        device_decode.resolve("cuda", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: nvJPEG against the CPU path")
def test_nvjpeg_matches_the_cpu_path_within_a_few_levels(photos, specs):
    files = {p.name: p.read_bytes() for p in sorted(photos.iterdir())}
    batch = batch_of(files)
    for kind in ("vit", "deit"):
        spec = specs[kind]
        checked = device_decode.check_batch(batch, spec=spec, max_image_pixels=BIG)
        pixels, errors = device_decode.DeviceDecoder(spec, "cuda", BIG)(checked)
        ref = decode.decode_batch(batch, spec=spec, max_image_pixels=BIG)
        diff = np.abs(pixels.cpu().numpy().astype(int) - ref["pixels"].astype(int))
        print(f"FIGURE nvjpeg-vs-pillow {kind}: max {diff.max()} mean {diff.mean():.3f} levels")
        assert errors == [""] * len(files) and diff.mean() < 2.0
