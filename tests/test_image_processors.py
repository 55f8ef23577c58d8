"""batchscore.checkpoints.image_processors reads a preprocessor_config.json exactly as transformers does.

The reference is transformers itself: `AutoImageProcessor.from_pretrained` on the same folder,
with each backend (torchvision and PIL), for every class batchscore reads, the published
checkpoints' files and the legacy forms transformers still accepts. A transformers release
that changes a class's defaults fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PREPROCESSOR

from batchscore.checkpoints import image_processors, models
from batchscore.exceptions import ModelError

CASES = {
    # the published checkpoints' files (legacy feature_extractor_type, "size": int)
    "vit-published": ("vit", PREPROCESSOR["vit"]),
    "deit-published": ("deit", PREPROCESSOR["deit"]),
    "beit-published": ("beit", PREPROCESSOR["beit"]),
    # each class's defaults, named by the file, with the legacy "Fast" suffix, or by model_type only
    **{f"{t}-defaults": (t, {"image_processor_type": c}) for t, c in image_processors.MODEL_TYPES.items()},
    **{f"{t}-fast": (t, {"image_processor_type": c + "Fast"}) for t, c in image_processors.MODEL_TYPES.items()},
    **{f"{t}-model-type": (t, {"do_resize": True}) for t in image_processors.MODEL_TYPES},
    # legacy and explicit forms
    "size-list": ("vit", {"image_processor_type": "ViTImageProcessor", "size": [240, 320]}),
    "size-dict": ("vit", {"image_processor_type": "ViTImageProcessor", "size": {"height": 200, "width": 300}}),
    "size-null": ("deit", {"image_processor_type": "DeiTImageProcessor", "size": None, "crop_size": None}),
    "all-null": ("deit", {"image_processor_type": "DeiTImageProcessor", **dict.fromkeys(
        ["do_resize", "resample", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
         "image_std", "default_to_square"])}),
    "shortest-edge": ("deit", {"image_processor_type": "DeiTImageProcessor", "size": {"shortest_edge": 256}}),
    "not-square": ("deit", {"image_processor_type": "DeiTImageProcessor", "size": 256, "default_to_square": False}),
    "crop-int": ("beit", {"image_processor_type": "BeitImageProcessor", "do_center_crop": True, "crop_size": 200}),
    "crop-list": ("deit", {"image_processor_type": "DeiTImageProcessor", "crop_size": [200, 180]}),
    "scalar-mean": ("vit", {"image_processor_type": "ViTImageProcessor", "image_mean": 0.4, "image_std": 0.2}),
    "imagenet-mean": ("deit", {"feature_extractor_type": "DeiTFeatureExtractor",
                               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
    "switches-off": ("beit", {"image_processor_type": "BeitImageProcessor", "do_rescale": False,
                              "do_normalize": False, "do_center_crop": True}),
    "rescale": ("vit", {"image_processor_type": "ViTImageProcessor", "rescale_factor": 0.5, "resample": 0}),
    "resample": ("beit", {"image_processor_type": "BeitImageProcessor", "resample": 1}),
}


def _folder(tmp_path, model_type: str, raw: dict):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    return tmp_path


def _from_transformers(path, backend: str) -> dict:
    """The attributes transformers' own image processor holds for this folder."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(path), backend=backend, local_files_only=True,
                                              trust_remote_code=False)

    def size(s):
        return None if s is None else {k: v for k, v in dict(s).items() if v is not None}

    def channels(v):
        return None if v is None else tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

    def number(v, kind):
        return None if v is None else kind(v)

    return {"cls": type(proc).__name__.removesuffix("Pil"), "do_resize": bool(proc.do_resize), "size": size(proc.size),
            "resample": number(proc.resample, int), "do_center_crop": bool(proc.do_center_crop),
            "crop_size": size(proc.crop_size) if proc.crop_size else None, "do_rescale": bool(proc.do_rescale),
            "rescale_factor": number(proc.rescale_factor, float), "do_normalize": bool(proc.do_normalize),
            "image_mean": channels(proc.image_mean), "image_std": channels(proc.image_std)}


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reads_the_file_as_transformers_does(tmp_path, case, backend):
    model_type, raw = CASES[case]
    path = _folder(tmp_path, model_type, raw)
    ours = image_processors.read(raw, model_type, "preprocessor_config.json").__dict__
    assert ours == _from_transformers(path, backend)


# Files whose pixels are compared with transformers' own pixel_values on real photos: the
# attributes above can agree while the pixels do not (resample 0 is torchvision's
# NEAREST_EXACT; a null default_to_square makes an int size the shortest edge).
PIXEL_CASES = {
    "published-vit": ("vit", PREPROCESSOR["vit"]),
    "published-deit": ("deit", PREPROCESSOR["deit"]),
    "published-beit": ("beit", PREPROCESSOR["beit"]),
    **{f"resample-{r}": ("vit", {"image_processor_type": "ViTImageProcessor", "size": 96, "resample": r})
       for r in (0, 1, 2, 3)},
    "square-null": ("deit", {"image_processor_type": "DeiTImageProcessor", "size": 72, "crop_size": 64,
                             "default_to_square": None}),
    "shortest-edge-crop": ("deit", {"image_processor_type": "DeiTImageProcessor", "size": {"shortest_edge": 80},
                                    "crop_size": [64, 48]}),
    "one-element-mean": ("vit", {"image_processor_type": "ViTImageProcessor", "size": 64, "image_mean": [0.4],
                                 "image_std": [0.2]}),
    "crop-only": ("beit", {"image_processor_type": "BeitImageProcessor", "do_resize": False, "do_center_crop": True,
                           "crop_size": 300}),
}


@pytest.mark.parametrize("case", sorted(PIXEL_CASES))
def test_pixels_equal_transformers_pixel_values(tmp_path, case):
    import torch
    from conftest import real_photo_paths
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    from batchscore.decoding.decode import decode_one

    model_type, raw = PIXEL_CASES[case]
    path = _folder(tmp_path, model_type, raw)
    spec = models.preprocess_spec(path)
    proc = AutoImageProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    for photo in [p for p in real_photo_paths() if p.name in ("chelsea.png", "rocket.jpg", "camera.png")]:
        ref = proc(load_image(str(photo)), return_tensors="pt")["pixel_values"][0]
        ours = torch.from_numpy(decode_one(photo.read_bytes(), spec, 10**9)).float()
        ours = ours * spec.rescale_factor if spec.rescale_factor else ours
        if spec.mean is not None:
            ours = (ours - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
        assert ours.shape == ref.shape, photo.name
        assert float((ours - ref).abs().max()) < 1e-5, (photo.name, float((ours - ref).abs().max()))


def test_every_class_is_the_one_transformers_maps_its_model_type_to():
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
    )

    for model_type, cls in image_processors.MODEL_TYPES.items():
        assert IMAGE_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"] == cls
    assert set(image_processors.MODEL_TYPES.values()) == set(image_processors.CLASSES)


@pytest.mark.parametrize("raw, says", [
    ({"image_processor_type": "CLIPImageProcessor"}, "image processor 'CLIPImageProcessor' is not one batchscore reads"),
    ({"image_processor_type": "ViTImageProcessor", "size": "224"}, "size: expected an int, [height, width]"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"h": 224}}, "size: expected an int"),
    ({"image_processor_type": "ViTImageProcessor", "resample": "bicubic"}, "resample must be one of PIL's integer"),
    ({"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]}, "image_mean: expected three numbers"),
    ({"image_processor_type": "ViTImageProcessor", "do_center_crop": True}, "do_center_crop is true but there is no crop_size (ViTImageProcessor has no default one)"),
    ({"image_processor_type": "ViTImageProcessor", "resample": 5}, "resample=5 is not implemented"),
    ({"image_processor_type": "ViTImageProcessor", "size": 224, "default_to_square": None}, "no fixed input size"),
    ({"image_processor_type": "ViTImageProcessor", "image_std": [0, 0, 0]}, "every image_std must be > 0"),
    ({"image_processor_type": "ViTImageProcessor", "rescale_factor": 0}, "rescale_factor must be > 0"),
    ({"image_processor_type": "ViTImageProcessor", "image_std": [float("inf")] * 3}, "image_std (inf, inf, inf) is not"),
    ({"image_processor_type": "ViTImageProcessor", "image_mean": float("nan")}, "image_mean (nan, nan, nan) is not"),
    ({"image_processor_type": "ViTImageProcessor", "rescale_factor": float("inf")}, "rescale_factor inf is not finite"),
    ({"image_processor_type": "ViTImageProcessor", "size": -5}, "size [-5, -5] is out of range"),
    ({"image_processor_type": "DeiTImageProcessor", "crop_size": 100000}, "crop_size [100000, 100000] is out of"),
    ({"image_processor_type": "ViTImageProcessor", "size": None}, "size {} is not implemented"),
    ({"image_processor_type": "ViTImageProcessor", "image_std": None}, "image_std is null; expected a value"),
])
def test_unreadable_preprocessing_fails_at_check_before_ray(tmp_path, raw, says):
    """`models.check` (the driver's first step, and `batchscore validate`'s) reads the
    preprocessing too: a file batchscore cannot read is a ModelError naming the file."""
    from conftest import make_checkpoint

    ckpt = make_checkpoint("vit", tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError) as e:
        models.check(str(ckpt))
    assert says in str(e.value) and "preprocessor_config.json" in str(e.value)


def test_no_class_and_unknown_model_type_says_what_is_expected(tmp_path):
    with pytest.raises(image_processors.ProcessorError, match="model_type 'convnext' is not one of"):
        image_processors.read({"do_resize": True}, "convnext", "x/preprocessor_config.json")


def test_the_driver_resolves_a_checkpoint_without_transformers_or_torch(tmp_path):
    """The driver's imports and `models.resolve` leave transformers and torch unimported
    (they cost seconds of start-up on the driver's critical path)."""
    from conftest import make_checkpoint

    ckpt = make_checkpoint("deit", tmp_path / "ckpt")
    code = ("import sys; from batchscore import cli, pipeline; from batchscore.checkpoints import models; "
            f"spec = models.resolve({str(ckpt)!r}).preprocess; "
            "print(spec.crop, sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["(224,", "224)", "[]"]
