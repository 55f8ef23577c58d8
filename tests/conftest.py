"""Shared fixtures: one local Ray for the session, tiny checkpoints, real photos.

Checkpoints are random-init Hugging Face models with the real preprocessing configs of
google/vit-base-patch16-224, facebook/deit-base-patch16-224 and
microsoft/beit-base-patch16-224-pt22k-ft22k (as published), built with `save_pretrained`;
nothing is downloaded. Photos are the real ones shipped inside scikit-image and scikit-learn.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Real preprocessor_config.json contents of the three published checkpoints.
PREPROCESSOR = {
    "vit": {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "resample": 2, "size": 224, "feature_extractor_type": "ViTFeatureExtractor"},
    "deit": {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "DeiTFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
             "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 256},
    "beit": {"crop_size": 224, "do_center_crop": False, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "BeitFeatureExtractor", "image_mean": [0.5, 0.5, 0.5],
             "image_std": [0.5, 0.5, 0.5], "reduce_labels": False, "resample": 2, "size": 224},
}
LABELS = ["can", "carton", "milk_bottle", "water_bottle", "tin", "jar", "box"]


def make_checkpoint(kind: str, path: Path, *, num_labels: int = len(LABELS), calibrate_on: list[Path] = (),
                    logit_std: float = 2.0) -> Path:
    """A tiny random-init checkpoint of `kind` (vit|deit|beit) with its real preprocessing.

    Random init alone gives near-uniform, input-independent outputs, which would hide
    preprocessing errors. With `calibrate_on` images, each classification head is centred on
    the images' mean feature and scaled so logits vary across them with std `logit_std`: the
    probabilities then depend strongly on the pixels.
    """
    import torch
    import transformers as tf
    from PIL import Image

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 image_size=224, patch_size=16, num_labels=num_labels,
                 id2label={i: (LABELS[i] if i < len(LABELS) else f"class_{i}") for i in range(num_labels)})
    torch.manual_seed({"vit": 0, "deit": 1, "beit": 2}[kind])
    if kind == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(**small))
    elif kind == "deit":
        model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**small))
    else:
        model = tf.BeitForImageClassification(tf.BeitConfig(**small, use_mean_pooling=True))
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR[kind], indent=2))
    if calibrate_on:
        heads = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" in n]
        feats: dict[int, list] = {id(h): [] for h in heads}
        hooks = [h.register_forward_pre_hook(lambda mod, args: feats[id(mod)].append(args[0].detach()))
                 for h in heads]
        proc = tf.AutoImageProcessor.from_pretrained(str(path))
        images = [Image.open(p).convert("RGB") for p in calibrate_on]
        with torch.no_grad():
            model.eval()(**proc(images, return_tensors="pt"))
            for h in heads:
                x = torch.cat(feats[id(h)])
                w = torch.randn_like(h.weight) / x.std(0).clamp_min(1e-6)
                w *= logit_std / ((x - x.mean(0)) @ w.T).std()
                h.weight.copy_(w)
                h.bias.copy_(-(x.mean(0) @ w.T))
        for hook in hooks:
            hook.remove()
    model.save_pretrained(path, safe_serialization=True)
    return path


def put(uri: str, data: bytes) -> str:
    """Writes one object or file (creating the bucket or folder), returns its URI."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if "://" in uri and not uri.startswith("file://"):
        if not fs.exists(path.split("/")[0]):
            fs.mkdir(path.split("/")[0])
    else:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    return uri


def upload_dir(local_dir: Path, uri: str) -> None:
    """Copies the files of a local folder under `uri`."""
    for f in sorted(local_dir.iterdir()):
        put(f"{uri.rstrip('/')}/{f.name}", f.read_bytes())


def small_photos(out: Path, n: int, seed: int = 0, size: tuple[int, int] = (48, 160)) -> list[Path]:
    """`n` distinct small images cut from the real photos (random crops, 48-160 px, JPEG or
    PNG), so many-input tests are real pictures yet cheap to decode. Returns their paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in real_photo_paths()]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = (int(v) for v in rng.integers(size[0], size[1], 2))
        x, y = int(rng.integers(0, max(1, img.width - w))), int(rng.integers(0, max(1, img.height - h)))
        crop = img.crop((x, y, x + w, y + h))
        path = out / f"img-{i:05d}.{'jpg' if i % 3 else 'png'}"
        crop.save(path, quality=90) if path.suffix == ".jpg" else crop.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def session_tmp():
    d = Path(tempfile.mkdtemp(prefix="batchscore-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoints(session_tmp, photos) -> dict[str, Path]:
    calibrate_on = sorted(photos.iterdir())
    return {kind: make_checkpoint(kind, session_tmp / f"ckpt-{kind}", calibrate_on=calibrate_on)
            for kind in ("vit", "deit", "beit")}


def real_photo_paths() -> list[Path]:
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    sl = Path(sklearn.__file__).parent / "datasets" / "images"
    names = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "rocket.jpg",
             "retina.jpg", "hubble_deep_field.jpg", "logo.png", "no_time_for_that_tiny.gif"]
    return [sk / n for n in names] + [sl / "china.jpg", sl / "flower.jpg"]


@pytest.fixture(scope="session")
def photos(session_tmp) -> Path:
    """A directory of real photos: RGB, greyscale, RGBA, palette GIF, large JPEGs, the same
    photos re-encoded as TIFF, WebP (lossless) and BMP, and a 2822x2822 JPEG mosaic of real
    photos that decode reads at half scale (JPEG draft mode)."""
    from PIL import Image

    d = session_tmp / "photos"
    d.mkdir()
    for p in real_photo_paths():
        shutil.copy(p, d / p.name)
    Image.open(d / "coffee.png").save(d / "coffee.tif")
    Image.open(d / "chelsea.png").save(d / "chelsea.webp", lossless=True)
    Image.open(d / "astronaut.png").save(d / "astronaut.bmp")
    retina = Image.open(d / "retina.jpg")
    hubble = Image.open(d / "hubble_deep_field.jpg").resize(retina.size)
    mosaic = Image.new("RGB", (2 * retina.width, 2 * retina.height))
    for i, tile in enumerate((retina, hubble, hubble, retina)):
        mosaic.paste(tile, ((i % 2) * retina.width, (i // 2) * retina.height))
    mosaic.save(d / "mosaic-large.jpg", quality=90)
    return d


@pytest.fixture(scope="session")
def object_stores(session_tmp):
    """A GCS emulator and a moto S3 server on loopback, started here and stopped by PID.

    Their addresses go into the environment the way users point their own clients at them
    (STORAGE_EMULATOR_HOST, AWS_ENDPOINT_URL), before Ray starts, so Ray workers and CLI
    subprocesses inherit them. Model downloads go to a private cache.
    """
    import emulators

    servers = [emulators.start_gcs(session_tmp / "gcs.log"), emulators.start_s3(session_tmp / "s3.log")]
    env = {k: v for server in servers for k, v in server.env.items()}
    env["BATCHSCORE_CACHE"] = str(session_tmp / "cache")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for server in servers:
        server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(object_stores):
    """One local Ray for the whole session, on loopback, stopped at the end.

    It starts after the object stores, so its workers see their addresses."""
    import ray

    from batchscore.driver.runtime import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield ray
    ray.shutdown()
