"""A checkpoint's preprocessing, read from its preprocessor_config.json without transformers.

The driver must not import transformers (and with it torch and torch._dynamo: ~3 s of one
core, docs/benchmarks.md) to learn how images are resized, cropped and normalised. This module reads
the file the way transformers' `AutoImageProcessor.from_pretrained` does for the image
processors batchscore supports, with each class's own defaults:

    class                 size        crop        resample       mean / std
    ViTImageProcessor     224 × 224   (none)      2 (bilinear)   0.5 / 0.5
    DeiTImageProcessor    256 × 256   224 × 224   3 (bicubic)    0.5 / 0.5
    BeitImageProcessor    224 × 224   224 × 224   3 (bicubic)    0.5 / 0.5
                                      (off by default)

(transformers 5.x; every class rescales by 1/255 and resizes, crops and normalises unless
its file says otherwise.) The class is the file's `image_processor_type` (a `…Fast` suffix
names the same class), else its legacy `feature_extractor_type` (`ViTFeatureExtractor` is
`ViTImageProcessor`), else config.json's `model_type` (MODEL_TYPES). Legacy values mean what
transformers makes of them: `"size": 224` is 224 × 224, `[h, w]` is h × w; a key left out
is the class's default, a key set to `null` is None (as in transformers).

tests/test_image_processors.py proves the result equal to the one built through
transformers' own classes (both backends, every class, the published configs and their
legacy forms); a transformers upgrade that changes a default fails there, not in a score.
"""

from __future__ import annotations

from dataclasses import dataclass

_STANDARD = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN and _STD


@dataclass(frozen=True)
class ProcessorDefaults:
    """One image-processor class's defaults (its class attributes in transformers)."""

    size: dict
    crop_size: dict | None
    do_center_crop: bool | None
    resample: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    default_to_square: bool = True


CLASSES = {
    "ViTImageProcessor": ProcessorDefaults(size={"height": 224, "width": 224}, crop_size=None, do_center_crop=None,
                                           resample=2, image_mean=_STANDARD, image_std=_STANDARD),
    "DeiTImageProcessor": ProcessorDefaults(size={"height": 256, "width": 256},
                                            crop_size={"height": 224, "width": 224}, do_center_crop=True,
                                            resample=3, image_mean=_STANDARD, image_std=_STANDARD),
    "BeitImageProcessor": ProcessorDefaults(size={"height": 224, "width": 224},
                                            crop_size={"height": 224, "width": 224}, do_center_crop=False,
                                            resample=3, image_mean=_STANDARD, image_std=_STANDARD),
}
# config.json model_type → the class transformers picks when preprocessor_config.json names none.
MODEL_TYPES = {"vit": "ViTImageProcessor", "deit": "DeiTImageProcessor", "beit": "BeitImageProcessor"}
# Size-dict key sets transformers accepts (its VALID_SIZE_DICT_KEYS).
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"longest_edge"},
              {"max_height", "max_width"})


class ProcessorError(ValueError):
    """A preprocessor_config.json batchscore cannot read as transformers would."""


@dataclass(frozen=True)
class Processor:
    """What a preprocessor_config.json resolves to: the attributes transformers' image
    processor would hold (sizes as dicts, resample as PIL's integer code)."""

    cls: str
    do_resize: bool
    size: dict | None
    resample: int | None
    do_center_crop: bool
    crop_size: dict | None
    do_rescale: bool
    rescale_factor: float | None
    do_normalize: bool
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None


def class_name(raw: dict, model_type: str | None, where: str) -> str:
    """The image-processor class transformers would build for this file (see the module doc).

    Raises:
        ProcessorError: the class is not one of CLASSES, or nothing names one.
    """
    named = raw.get("image_processor_type")
    if named is None and raw.get("feature_extractor_type") is not None:
        named = str(raw["feature_extractor_type"]).replace("FeatureExtractor", "ImageProcessor")
    if named is not None:
        named = str(named)
        base = named[:-4] if named.endswith("Fast") else named
        base = base[:-3] if base.endswith("Pil") else base
        if base not in CLASSES:
            raise ProcessorError(f"{where}: image processor {named!r} is not one batchscore reads; expected one of "
                                 f"{sorted(CLASSES)} (ViT, DeiT and BEiT checkpoints)")
        return base
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise ProcessorError(f"{where}: names no image_processor_type, and config.json's model_type {model_type!r} is "
                         f"not one of {sorted(MODEL_TYPES)}; expected an image_processor_type among {sorted(CLASSES)}")


def read(raw: dict, model_type: str | None, where: str) -> Processor:
    """Resolves a preprocessor_config.json's contents as transformers would.

    Args:
        raw: The file's JSON object.
        model_type: config.json's `model_type` (used when the file names no class).
        where: The file's path, for messages.

    Raises:
        ProcessorError: an unsupported class, or a value of the wrong kind (a size that is
            not an int, [height, width] or a size dict; a resample that is not an integer).
    """
    name = class_name(raw, model_type, where)
    defaults = CLASSES[name]

    def value(key: str, default):
        # absent: the class's default; present, even null: the file's value (null stays None, as
        # transformers sets it after building the processor)
        return raw[key] if key in raw else default

    # null is falsy there too: an int size becomes the shortest edge
    square = bool(value("default_to_square", defaults.default_to_square))
    size = value("size", defaults.size)
    crop = value("crop_size", defaults.crop_size)
    resample = value("resample", defaults.resample)
    if resample is not None and (isinstance(resample, bool) or not isinstance(resample, int)):
        raise ProcessorError(f"{where}: resample must be one of PIL's integer filter codes, got {resample!r}")
    rescale = value("rescale_factor", defaults.rescale_factor)
    if rescale is not None and (isinstance(rescale, bool) or not isinstance(rescale, (int, float))):
        raise ProcessorError(f"{where}: rescale_factor must be a number, got {rescale!r}")
    return Processor(
        cls=name,
        do_resize=bool(value("do_resize", defaults.do_resize)),
        size=None if size is None else _size_dict(size, square, f"{where}: size"),
        resample=resample,
        do_center_crop=bool(value("do_center_crop", defaults.do_center_crop)),
        crop_size=None if crop is None else _size_dict(crop, True, f"{where}: crop_size"),
        do_rescale=bool(value("do_rescale", defaults.do_rescale)),
        rescale_factor=None if rescale is None else float(rescale),
        do_normalize=bool(value("do_normalize", defaults.do_normalize)),
        image_mean=_channels(value("image_mean", defaults.image_mean), f"{where}: image_mean"),
        image_std=_channels(value("image_std", defaults.image_std), f"{where}: image_std"),
    )


def _size_dict(size, default_to_square: bool, where: str) -> dict:
    """transformers' `get_size_dict`: an int is square (or the shortest edge), a list is
    [height, width], a dict is kept when its keys are one of the accepted sets."""
    if isinstance(size, bool):
        raise ProcessorError(f"{where}: expected an int, [height, width] or a size dict, got {size!r}")
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return {"height": size[0], "width": size[1]}
    if isinstance(size, dict):
        kept = {k: v for k, v in size.items() if v is not None}
        if set(kept) in _SIZE_KEYS and all(isinstance(v, int) and not isinstance(v, bool) for v in kept.values()):
            return kept
    raise ProcessorError(f"{where}: expected an int, [height, width] or a dict with keys height and width (or "
                         f"shortest_edge), got {size!r}")


def _channels(values, where: str) -> tuple[float, ...] | None:
    """Mean or std per RGB channel: a list of three numbers, or one number (bare or in a list)
    for all three."""
    if values is None:
        return None
    if isinstance(values, list) and len(values) == 1:
        values = values[0]
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (float(values),) * 3
    if isinstance(values, (list, tuple)) and len(values) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tuple(float(v) for v in values)
    raise ProcessorError(f"{where}: expected three numbers (R, G, B) or one for all three, got {values!r}")
