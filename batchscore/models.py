"""Models: resolve a checkpoint reference and read what travels with the weights.

Everything about a model comes from its own files: labels and task from `config.json`,
preprocessing from `preprocessor_config.json` (resolved through the checkpoint's own
transformers image-processor class, so defaults and legacy forms such as `"size": 224` mean
exactly what transformers makes of them), weights from safetensors only. A reference that is
neither an existing directory nor a bucket URI is an error: batchscore never falls back to a
hub download, and never runs code shipped with a checkpoint (`trust_remote_code` is never set).

`check` is the cheap part of `resolve`: the checkpoint's files, labels and weights, read
without transformers or torch (a run does it before Ray starts; `batchscore validate` too).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).parent / "demo" / "checkpoint"

_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_PICKLE_ENDINGS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
# Keys of a preprocessor config that do not change the pixels of a classification input.
_INERT_PREPROCESSOR_KEYS = {
    "image_processor_type", "feature_extractor_type", "processor_class", "do_reduce_labels",
    "do_convert_rgb", "backend",
}
_TORCHVISION_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ModelError(ValueError):
    """A checkpoint is missing, unsafe, or not one batchscore can score with."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw pixels become the model's input, as the checkpoint defines it.

    Decode applies resize and crop on uint8 pixels; predict applies rescale and normalize on
    the device. `size` is (height, width) or, with `shortest_edge`, the shortest edge only.
    """

    size: tuple[int, int] | None
    shortest_edge: int | None
    interpolation: str
    crop: tuple[int, int] | None
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @property
    def output_hw(self) -> tuple[int, int]:
        """The (height, width) of the uint8 array decode hands to predict."""
        if self.crop:
            return self.crop
        if self.size:
            return self.size
        raise ModelError("preprocessor config: a shortest_edge resize without a crop gives no fixed input size")


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows about a checkpoint before any actor loads it."""

    ref: str
    path: str
    name: str
    model_type: str
    weights_sha256: str
    labels: tuple[str, ...]
    multi_label: bool
    preprocess: PreprocessSpec
    cache_key: str | None = None  # content key of a checkpoint fetched from a bucket
    weights_format: str = "safetensors"  # or "pickle", only with allow_pickle

    @property
    def tag(self) -> str:
        """The `model` column: name and weights hash."""
        return f"{self.name}@sha256:{self.weights_sha256[:16]}"


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint's own files say, read without transformers or torch (`check`)."""

    ref: str
    where: str  # the folder or bucket URI that was looked at
    name: str
    model_type: str
    labels: tuple[str, ...]
    multi_label: bool
    weights: str  # the weights file: model.safetensors, its index, or pytorch_model.bin
    weights_format: str  # "safetensors", or "pickle" (only with allow_pickle)

    def summary(self) -> str:
        return (f"{self.name} ({self.model_type}): {len(self.labels)} labels, weights {self.weights} "
                f"({self.weights_format}), at {self.where}")


def check(ref: str | None, allow_pickle: bool = False) -> CheckpointFiles:
    """Checks a checkpoint's files, cheaply: without importing transformers or torch, without
    downloading weights (a bucket folder is listed and its two small JSON files read).

    It is the part of `resolve` that needs neither, so a run learns of a missing folder, a
    missing `preprocessor_config.json`, pickle-only or absent weights, or a headless
    `config.json` in well under a second, before Ray starts; `resolve` raises the same
    `ModelError`s (both go through `_check_files`). What only transformers can tell
    (how it reads the preprocessing) is left to `resolve`.

    Raises:
        ModelError: As `resolve` would for the checkpoint's files.
    """
    if ref is not None and _is_remote(ref):
        from batchscore import fs as fsutil

        fs, root = fsutil.resolve(ref)
        root = root.rstrip("/")
        try:
            infos = fs.ls(root, detail=True)
        except FileNotFoundError:
            infos = []
        names = {i["name"].rstrip("/").rsplit("/", 1)[-1] for i in infos if i["type"] == "file"}
        if not names:
            raise ModelError(_not_a_folder(ref, ref))
        return _check_files(ref, ref.rstrip("/"), names, lambda name: fs.cat_file(f"{root}/{name}"), allow_pickle)
    path = _local_path(ref)
    if not path.is_dir():
        raise ModelError(_not_a_folder(ref, path))
    return _check_files(ref, str(path), _file_names(path), lambda name: (path / name).read_bytes(), allow_pickle)


def resolve(ref: str | None, allow_pickle: bool = False) -> ModelInfo:
    """Resolves a model reference to a local checkpoint and reads its metadata.

    Args:
        ref: A local checkpoint directory, a gs:// or s3:// URI of one (fetched into the
            node's cache, see `batchscore.cache`), or None for the demo checkpoint.
        allow_pickle: Accept pickle weights when there are no safetensors ones; they are
            loaded with `torch.load(weights_only=True)`, which needs torch >= 2.6.

    Raises:
        ModelError: The checkpoint does not exist, lacks a file, holds only pickle weights,
            has no classification head, or preprocessing batchscore does not implement.
    """
    cache_key = None
    if ref is not None and _is_remote(ref):
        from batchscore import cache

        try:
            path, cache_key = cache.fetch_checkpoint(ref, allow_pickle=allow_pickle)
        except cache.CacheError as e:
            raise ModelError(str(e)) from None
    else:
        path = _local_path(ref)
    if not path.is_dir():
        raise ModelError(_not_a_folder(ref, path))
    files = _check_files(ref, str(path), _file_names(path), lambda name: (path / name).read_bytes(), allow_pickle)
    return ModelInfo(
        ref="<demo>" if ref is None else str(ref),
        path=str(path.resolve()),
        name=files.name,
        model_type=files.model_type,
        weights_sha256=_sha256_weights(path, path / files.weights),
        labels=files.labels,
        multi_label=files.multi_label,
        preprocess=preprocess_spec(path),
        cache_key=cache_key,
        weights_format=files.weights_format,
    )


def top_k_used(top_k: int, labels: tuple[str, ...]) -> tuple[int, str | None]:
    """(labels per row a run writes, a warning when `top_k` asks for more classes than there are)."""
    from batchscore.postprocess import Postprocessor

    k = Postprocessor(tuple(labels), top_k, multi_label=False).k
    if top_k > len(labels):
        return k, f"top_k={top_k} but the checkpoint has {len(labels)} classes: using {k}"
    return k, None


def _local_path(ref: str | None) -> Path:
    return DEMO_CHECKPOINT if ref is None else Path(str(ref).removeprefix("file://")).expanduser()


def _file_names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_file()}


def _not_a_folder(ref: str | None, where) -> str:
    return (f"model {ref!r}: expected a local Hugging Face checkpoint directory or a gs:// or s3:// URI of one, "
            f"but {where} does not exist or is not a directory (batchscore never downloads from a hub)")


def _check_files(ref: str | None, where: str, names: set[str], read, allow_pickle: bool) -> CheckpointFiles:
    """The checks on a checkpoint folder's files that need neither transformers nor torch.

    `names` are the file names in the folder (`where`), `read(name)` returns one's bytes.
    The one place these `ModelError` messages are made, for `check` and `resolve` alike.
    """
    for needed in ("config.json", "preprocessor_config.json"):
        if needed not in names:
            raise ModelError(f"model {ref!r}: {needed} is missing from {where}")
    weights = [w for w in _SAFETENSORS if w in names]
    weights_format = "safetensors"
    if not weights:
        pickles = [w for w in _PICKLE_WEIGHTS if w in names]
        if not pickles:
            others = sorted(n for n in names if n.endswith(_PICKLE_ENDINGS))
            hint = (f"; found pickle file(s) {others}, which are not a Hugging Face checkpoint: load them "
                    "yourself and `save_pretrained(dir, safe_serialization=True)`") if others else ""
            raise ModelError(f"model {ref!r}: no model.safetensors in {where}{hint}")
        if not allow_pickle:
            raise ModelError(
                f"model {ref!r}: only pickle weights found ({', '.join(pickles)}); batchscore loads "
                "safetensors only unless --allow-pickle is given. Better: convert once with "
                "`model.save_pretrained(dir, safe_serialization=True)`"
            )
        _require_safe_torch_load(ref)
        weights, weights_format = pickles, "pickle"
    if weights[0].endswith(".index.json"):  # sharded: every shard the index names must be there
        shards = set(_json(ref, where, weights[0], read).get("weight_map", {}).values())
        missing = sorted(str(s) for s in shards if s not in names)
        if missing or not shards:
            raise ModelError(f"model {ref!r}: {weights[0]} in {where} names shard(s) missing from it: "
                             f"{missing or 'none named'}")
    config = _json(ref, where, "config.json", read)
    labels, multi_label = _labels(config, ref)
    _refuse_unimplemented(_json(ref, where, "preprocessor_config.json", read), f"{where}/preprocessor_config.json")
    remote = ref is not None and _is_remote(ref)
    return CheckpointFiles(
        ref="<demo>" if ref is None else str(ref),
        where=where,
        name=("batchscore-demo-digits" if ref is None else
              str(ref).rstrip("/").rsplit("/", 1)[-1] if remote else Path(where).resolve().name),
        model_type=str(config.get("model_type", "?")),
        labels=labels,
        multi_label=multi_label,
        weights=weights[0],
        weights_format=weights_format,
    )


def _json(ref: str | None, where: str, name: str, read) -> dict:
    try:
        data = json.loads(read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"model {ref!r}: {name} in {where} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"model {ref!r}: {name} in {where}: expected a JSON object, got {type(data).__name__}")
    return data


def local_path(model: ModelInfo) -> str:
    """The checkpoint folder on this node: the driver's path, or this node's cached copy."""
    if model.cache_key is None:
        return model.path
    from batchscore import cache

    allow_pickle = model.weights_format == "pickle"
    return str(cache.fetch_checkpoint(model.ref, expect_key=model.cache_key, allow_pickle=allow_pickle)[0])


def _require_safe_torch_load(ref: str | None) -> None:
    """Pickle weights need torch >= 2.6; the installed version is read from its metadata, so
    this check (part of `check`) does not import torch."""
    import importlib.metadata as md

    from packaging.version import Version

    try:
        version = md.version("torch")
    except md.PackageNotFoundError:
        raise ModelError(f"model {ref!r}: pickle weights need torch >= 2.6, which is not installed") from None
    if Version(version.split("+")[0]) < Version("2.6"):
        raise ModelError(f"model {ref!r}: pickle weights need torch >= 2.6 for a safe weights_only load "
                         f"(CVE-2025-32434); this is torch {version}")


def _is_remote(ref: str) -> bool:
    return "://" in ref and not ref.startswith("file://")


def _labels(config: dict, ref: str | None) -> tuple[tuple[str, ...], bool]:
    archs = config.get("architectures") or []
    if not any(a.endswith("ForImageClassification") or a.endswith("ForImageClassificationWithTeacher")
               for a in archs):
        raise ModelError(
            f"model {ref!r}: expected a checkpoint with an image-classification head, but its "
            f"config.json names architectures {archs}; a headless checkpoint would be scored by a "
            "randomly initialised head"
        )
    id2label = config.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ModelError(f"model {ref!r}: config.json id2label is not a mapping of class index to label")
    n = len(id2label)
    try:
        labels = tuple(str(id2label[str(i)]) for i in range(n))
    except KeyError as e:
        raise ModelError(f"model {ref!r}: config.json id2label is not numbered 0..{n - 1}: missing {e}") from None
    if n == 0:
        raise ModelError(f"model {ref!r}: config.json has no id2label")
    return labels, config.get("problem_type") == "multi_label_classification"


def preprocess_spec(path: Path) -> PreprocessSpec:
    """Reads preprocessing through the checkpoint's own transformers image-processor class."""
    from transformers import AutoImageProcessor

    raw = json.loads((path / "preprocessor_config.json").read_text())
    where = f"{path}/preprocessor_config.json"
    try:
        proc = AutoImageProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelError(f"{where}: transformers cannot build its image processor: {e}") from e
    _refuse_unimplemented(raw, where, proc)

    size = shortest = None
    if proc.do_resize:
        s = proc.size
        if s.height and s.width:
            size = (int(s.height), int(s.width))
        elif s.shortest_edge and not s.longest_edge:
            shortest = int(s.shortest_edge)
        else:
            raise ModelError(f"{where}: size {dict(s.__dict__) if hasattr(s, '__dict__') else s} is not implemented; "
                             "expected height and width, or shortest_edge")
    crop = None
    if getattr(proc, "do_center_crop", False):
        c = proc.crop_size
        crop = (int(c.height), int(c.width))
    resample = int(proc.resample) if proc.resample is not None else 2
    if resample not in _TORCHVISION_INTERPOLATION or resample in (4, 5):
        raise ModelError(f"{where}: resample={resample} is not implemented; expected 0 (nearest), 1, 2 or 3")
    spec = PreprocessSpec(
        size=size,
        shortest_edge=shortest,
        interpolation=_TORCHVISION_INTERPOLATION[resample],
        crop=crop,
        rescale_factor=float(proc.rescale_factor) if proc.do_rescale else None,
        mean=tuple(float(v) for v in proc.image_mean) if proc.do_normalize else None,
        std=tuple(float(v) for v in proc.image_std) if proc.do_normalize else None,
    )
    if size is None and shortest is None and crop is None:
        raise ModelError(f"{where}: neither resize nor crop is set, so images have no fixed size")
    spec.output_hw  # noqa: B018 - raises when the spec has no fixed output size
    return spec


def _refuse_unimplemented(raw: dict, where: str, proc=None) -> None:
    """Preprocessing batchscore's decode does not implement, from the file (`check`) and, once
    transformers has read it, from the image processor (`preprocess_spec`)."""
    for key in ("do_pad", "do_flip_channel_order"):
        if raw.get(key) or getattr(proc, key, False):
            raise ModelError(f"{where}: {key}=true is not implemented by batchscore's decode")
    if raw.get("crop_pct") is not None:
        raise ModelError(f"{where}: crop_pct is not implemented by batchscore's decode")


def _sha256_weights(path: Path, weights: Path) -> str:
    files = [weights]
    if weights.name.endswith(".index.json"):  # sharded: hash the shards, in name order
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
