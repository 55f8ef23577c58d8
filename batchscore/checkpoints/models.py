"""Models: resolve a checkpoint reference and read what travels with the weights.

Three layouts (the table in README.md says what is read from where):

    transformers   a Hugging Face folder: config.json (`architectures`, `id2label`),
                   preprocessor_config.json, model.safetensors; a headless one (`ViTModel`)
                   embeds, a classifier classifies (and may embed too)
    timm           timm's Hugging Face folder: config.json (`architecture`, `pretrained_cfg`),
                   model.safetensors (`batchscore.checkpoints.timm_models`)
    npz            a google-research/vision_transformer `.npz` file (`batchscore.checkpoints.timm_models`)

Everything about a model comes from its own files: labels and task from `config.json`,
preprocessing from `preprocessor_config.json` (read as the checkpoint's own transformers
image-processor class reads it, with that class's defaults, so legacy forms such as
`"size": 224` mean exactly what transformers makes of them: `batchscore.checkpoints.image_processors`,
which needs neither transformers nor torch), weights from safetensors only. A reference
that is neither an existing directory nor a bucket URI is an error: batchscore never falls
back to a hub download, and never runs code shipped with a checkpoint (`trust_remote_code`
is never set).

`check` is the cheap part of `resolve`: the checkpoint's files, labels, preprocessing and
weights, read without transformers, and without torch for transformers folders (timm
folders and `.npz` files import timm there, to check the architecture; a run does it before
Ray starts, `batchscore validate` too).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import math
import zipfile
from pathlib import Path

from packaging.version import Version

from batchscore.checkpoints import cache, image_processors, timm_models
from batchscore.checkpoints.checkpoint import CheckpointFiles, ModelInfo, PreprocessSpec, TaskSpec
from batchscore.exceptions import CacheError, ModelError
from batchscore.inference.postprocess import Postprocessor
from batchscore.inputs import fs as fsutil

DEMO_CHECKPOINT = Path(__file__).parents[1] / "demo" / "checkpoint"

_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_PICKLE_ENDINGS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
# PIL's resample codes as transformers' torchvision backend resizes with them (its
# `pil_torch_interpolation_mapping`): PIL's NEAREST is torchvision's NEAREST_EXACT (pixel
# centres), not NEAREST; 4 (box) and 5 (hamming) have no torchvision mode.
_TORCHVISION_INTERPOLATION = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# The largest model input side batchscore accepts from a preprocessor config: ViT checkpoints
# use 224-518; a larger value is a typo that would allocate gigabytes per decoded image.
MAX_INPUT_SIDE = 4096


def check(ref: str | None, allow_pickle: bool = False, model_arch: str | None = None) -> CheckpointFiles:
    """Checks a checkpoint's files, cheaply: without importing transformers (nor torch, for a
    transformers folder), without downloading weights (a bucket folder is listed and its two small JSON files read).

    It is the part of `resolve` that needs neither, so a run learns of a missing folder, a
    missing `preprocessor_config.json`, pickle-only or absent weights, or a headless
    `config.json` in well under a second, before Ray starts; `resolve` raises the same
    `ModelError`s (both go through `_check_files`); a local folder's safetensors headers
    are read for the tensor names (`_check_weight_names`). A timm folder's or .npz's
    architecture is checked against timm's model names here (importing timm, for those
    layouts only), and every array of a local .npz against the shape its architecture (or
    `model_arch`) expects.

    Raises:
        ModelError: As `resolve` would for the checkpoint's files.
    """
    if ref is not None and _is_remote(ref):
        fs, root = fsutil.resolve(ref)
        root = root.rstrip("/")
        if root.endswith(".npz"):  # its shapes are read once it is fetched (resolve)
            if not fs.isfile(root):
                raise ModelError(f"model {ref!r}: no such .npz file (batchscore never downloads from a hub)")
            return CheckpointFiles(ref=str(ref), where=ref, name=root.rsplit("/", 1)[-1][:-4], model_type="vit",
                                   labels=(), multi_label=False, weights=root.rsplit("/", 1)[-1],
                                   weights_format="npz", layout="npz", has_head=True)
        try:
            infos = fs.ls(root, detail=True)
        except FileNotFoundError:
            infos = []
        names = {i["name"].rstrip("/").rsplit("/", 1)[-1] for i in infos if i["type"] == "file"}
        if not names:
            raise ModelError(_not_a_folder(ref, ref))
        return _check_files(ref, ref.rstrip("/"), names, lambda name: fs.cat_file(f"{root}/{name}"), allow_pickle)
    path = _local_path(ref)
    if path.suffix == ".npz" and path.is_file():
        return _check_npz(ref, path, model_arch)[0]
    if not path.is_dir():
        raise ModelError(_not_a_folder(ref, path))
    files = _check_files(ref, str(path), _file_names(path), lambda name: (path / name).read_bytes(), allow_pickle)
    if files.layout == "transformers" and files.weights_format == "safetensors":  # headers only, milliseconds
        _check_weight_names(files, _weight_names(path, files.weights))
    return files


# config.json model_type → the prefix of its base model's tensors in a classifier's weights
# (transformers' `base_model_prefix`); a headless model's tensors have none.
_BASE_MODEL_PREFIX = {"vit": "vit", "deit": "deit", "beit": "beit"}


def _check_weight_names(files: CheckpointFiles, keys: dict[str, tuple[int, ...] | None]) -> None:
    """The safetensors tensors (name → shape) against config.json: a classifier's head is there
    with one row per label, and the base model's tensors are of the model type config.json
    names. Otherwise transformers would build the missing parts at random (or fail on the
    shapes), which the model actor refuses, but only after Ray started (exit 4, tens of
    seconds later).

    Raises:
        ModelError: the weights lack the classification head config.json names, have another
            number of classes than its id2label, or are another model type's.
    """
    where = f"{files.where}/{files.weights}"
    prefix = _BASE_MODEL_PREFIX.get(files.model_type)
    others = sorted({k.split(".", 1)[0] for k in keys} & set(_BASE_MODEL_PREFIX.values()) - {prefix})
    if prefix and others and not any(k.startswith(prefix + ".") for k in keys):
        raise ModelError(f"model {files.ref!r}: config.json says model_type {files.model_type!r}, but the tensors "
                         f"in {where} are named for {others[0]!r} ({others[0]}.…, expected {prefix}.…): the "
                         "config and the weights are of different models")
    heads = {k: shape for k, shape in keys.items() if k.count(".") >= 1 and k.split(".")[-2].endswith("classifier")}
    if files.has_head and not heads:
        raise ModelError(f"model {files.ref!r}: config.json names a classification head ({len(files.labels)} labels), "
                         f"but {where} holds no classifier tensor (e.g. classifier.weight): a headless model's "
                         "weights, or another library's names. For embeddings of a headless model, give it a "
                         "config.json whose architectures is that model (e.g. ViTModel) and score with --task embed")
    for name, shape in heads.items():
        if files.has_head and name.endswith(".weight") and shape and shape[0] != len(files.labels):
            raise ModelError(f"model {files.ref!r}: config.json's id2label names {len(files.labels)} classes, but "
                             f"{name} in {where} has {shape[0]} rows: the labels and the weights are of different "
                             "checkpoints")


def _check_npz(ref: str | None, path: Path, model_arch: str | None = None) -> tuple[CheckpointFiles, dict]:
    """A vision_transformer .npz: its arrays' shapes (headers only, no pickle) against its
    architecture's, and labels. Returns (the files, `timm_models.npz_architecture`'s answer)."""
    try:
        shapes = timm_models.npz_shapes(path)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ModelError(f"model {ref!r}: {path} is not a readable .npz of plain arrays: {e}") from None
    arch = timm_models.npz_architecture(shapes, ref, str(path), model_arch)
    headless = arch["num_classes"] == 0 or timm_models.npz_head_is_zero(path, arch["prefix"])
    labels = () if headless else timm_models.npz_labels(path, arch["num_classes"], ref)
    files = CheckpointFiles(ref=str(ref), where=str(path.parent), name=path.stem, model_type="vit", labels=labels,
                            multi_label=False, weights=path.name, weights_format="npz", layout="npz",
                            has_head=not headless)
    return files, arch


def resolve(ref: str | None, allow_pickle: bool = False, model_arch: str | None = None) -> ModelInfo:
    """Resolves a model reference to a local checkpoint and reads its metadata.

    Args:
        ref: A local checkpoint directory, a gs:// or s3:// URI of one (fetched into the
            node's cache, see `batchscore.checkpoints.cache`), or None for the demo checkpoint.
        allow_pickle: Accept pickle weights when there are no safetensors ones; they are
            loaded with `torch.load(weights_only=True)`, which needs torch >= 2.6.
        model_arch: For an .npz: the timm architecture to build; None = from its shapes.

    Raises:
        ModelError: The checkpoint does not exist, lacks a file, holds only pickle weights,
            has no classification head, or preprocessing batchscore does not implement.
    """
    cache_key = None
    if ref is not None and _is_remote(ref):
        try:
            path, cache_key = cache.fetch_checkpoint(ref, allow_pickle=allow_pickle)
        except CacheError as e:
            raise ModelError(str(e)) from None
        if str(ref).rstrip("/").endswith(".npz"):
            path = path / str(ref).rstrip("/").rsplit("/", 1)[-1]
    else:
        path = _local_path(ref)
    if path.suffix == ".npz" and path.is_file():
        return _resolve_npz(ref, path, cache_key, model_arch)
    if not path.is_dir():
        raise ModelError(_not_a_folder(ref, path))
    files = _check_files(ref, str(path), _file_names(path), lambda name: (path / name).read_bytes(), allow_pickle)
    if files.layout == "timm":
        return _resolve_timm(files, path, cache_key)
    config = json.loads((path / "config.json").read_text())
    keys = _weight_names(path, files.weights) if files.weights_format == "safetensors" else {}
    if keys:
        _check_weight_names(files, keys)  # done by `check` for local folders; here for fetched ones too
    hidden = int(config.get("hidden_size") or 0)
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
        architecture=str((config.get("architectures") or ["?"])[0]),
        has_head=files.has_head,
        has_pooler=any(".pooler." in f".{k}" for k in keys),
        hidden_dim=hidden,
        pooler_dim=int(config.get("pooler_output_size") or hidden),
        weights_file=files.weights,
    )


def _resolve_timm(files: CheckpointFiles, path: Path, cache_key: str | None) -> ModelInfo:
    """A folder in timm's Hugging Face layout: preprocessing from `pretrained_cfg`."""
    config = json.loads((path / "config.json").read_text())
    args = dict(config.get("model_args") or {})
    args["num_classes"] = timm_models.num_classes(config)
    # the embedding widths from the checkpoint: its head's input, config.json's num_features...
    features, pre_logits = timm_models.folder_dims(config, timm_models.safetensors_shapes(path / files.weights))
    return ModelInfo(
        ref=files.ref, path=str(path.resolve()), name=files.name, model_type=files.model_type,
        weights_sha256=_sha256_weights(path, path / files.weights), labels=files.labels, multi_label=False,
        preprocess=timm_models.preprocess_from_cfg(config.get("pretrained_cfg") or {}, f"{path}/config.json"),
        cache_key=cache_key, layout="timm", architecture=config["architecture"], has_head=files.has_head,
        has_pooler=True, hidden_dim=features, pooler_dim=pre_logits, model_args=json.dumps(args),
        weights_file=files.weights,
    )


def _resolve_npz(ref: str | None, path: Path, cache_key: str | None, model_arch: str | None) -> ModelInfo:
    """A vision_transformer .npz: architecture from its shapes (or `model_arch`), the README's
    preprocessing, labels as `timm_models.npz_labels` finds them."""
    files, arch = _check_npz(ref, path, model_arch)
    kwargs = dict(arch["kwargs"], num_classes=arch["num_classes"] if files.has_head else 0)
    if model_arch:
        kwargs = {"num_classes": kwargs["num_classes"], "global_pool": kwargs["global_pool"]}
    if files.has_head and arch["pre_logits"]:
        raise ModelError(f"model {ref!r}: {path} has a head on a pre-logits layer, which timm's loader drops; "
                         "score it with task embed")
    return ModelInfo(
        ref=str(ref), path=str(path.resolve()), name=files.name, model_type="vit",
        weights_sha256=_sha256_weights(path.parent, path), labels=files.labels, multi_label=False,
        preprocess=timm_models.npz_preprocess(arch["img_size"]), cache_key=cache_key, weights_format="npz",
        layout="npz", architecture=model_arch or "vit_base_patch16_224", has_head=files.has_head,
        has_pooler=bool(arch["pre_logits"]), hidden_dim=arch["dim"], pooler_dim=arch["pre_logits"] or arch["dim"],
        model_args=json.dumps(kwargs), weights_file=path.name,
    )


def _weight_names(path: Path, weights: str) -> dict[str, tuple[int, ...] | None]:
    """The tensors of a safetensors checkpoint, name → shape, from the file's header (a
    sharded one: names from its index, shapes None).

    Raises:
        ModelError: the file is not safetensors (a git-lfs pointer, empty, cut short).
    """
    file = path / weights
    if weights.endswith(".index.json"):
        return dict.fromkeys(json.loads(file.read_text()).get("weight_map", {}))
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if n < 0:
                raise ValueError(f"{size} bytes, fewer than a safetensors header's 8")
            if not 0 < n <= min(size - 8, 100 * 2**20):
                raise ValueError(f"it declares a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            # Each tensor's bytes end at its data_offsets[1]: a file cut short (an interrupted
            # copy) holds fewer, which safetensors would only find in the actors.
            end = 8 + n + max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            if end > size:
                raise ValueError(f"it is cut short: its header places tensor data up to byte {end}, but the file "
                                 f"has {size} bytes")
            return {k: tuple(v["shape"]) for k, v in tensors.items()}
        except (ValueError, KeyError, TypeError) as e:
            f.seek(0)
            lfs = f.read(40).startswith(b"version https://git-lfs")
            raise ModelError(f"{file}: not a safetensors file ({e})" + (
                "; it is a git-lfs pointer: fetch the weights with `git lfs pull`" if lfs else "")) from None


def task_for(task: str, files: CheckpointFiles | ModelInfo) -> str:
    """The task a run does: `task`, or (auto) classify with a head, embed without one.

    Raises:
        ModelError: classification asked of a headless checkpoint.
    """
    if task == "auto":
        return "classify" if files.has_head else "embed"
    if task != "embed" and not files.has_head:
        raise ModelError(f"model {files.ref!r}: task {task} needs a classification head, but the checkpoint is "
                         "headless (no trained head: no labels); use task embed for its embeddings")
    return task


def task_spec(model: ModelInfo, task: str = "auto", embed_pool: str = "auto", embed_normalize: bool = False,
              embed_dtype: str = "float32") -> TaskSpec:
    """The run's `TaskSpec` from its checkpoint and task settings (as in `ScoreConfig`).

    Raises:
        ModelError: classification of a headless checkpoint, or a pooler it does not have.
    """
    task = task_for(task, model)
    if task == "classify":
        return TaskSpec(task)
    pool = embed_pool
    if pool == "auto":
        pool = "pooler" if model.has_pooler else "cls"
    if pool == "pooler" and not model.has_pooler:
        raise ModelError(f"model {model.ref!r}: embed_pool pooler, but the checkpoint has no trained pooler "
                         "weights; use cls (the final [CLS] token) or mean (of the patch tokens)")
    dim = model.pooler_dim if pool == "pooler" else model.hidden_dim
    if dim <= 0:
        raise ModelError(f"model {model.ref!r}: task {task} with embed_pool {pool}, but the checkpoint does not say "
                         f"how wide that embedding is (its {model.layout} files name no width for it)")
    return TaskSpec(task, pool, embed_normalize, embed_dtype, dim)


def top_k_used(top_k: int, labels: tuple[str, ...]) -> tuple[int, str | None]:
    """(labels per row a run writes, a warning when `top_k` asks for more classes than there are)."""
    if not labels:  # headless: the run embeds, no labels are written
        return 0, None
    k = Postprocessor(tuple(labels), top_k, multi_label=False).k
    if top_k > len(labels):
        return k, f"top_k={top_k} but the checkpoint has {len(labels)} classes: using {k}"
    return k, None


def _local_path(ref: str | None) -> Path:
    return DEMO_CHECKPOINT if ref is None else Path(str(ref).removeprefix("file://")).expanduser()


def _file_names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_file()}


def _not_a_folder(ref: str | None, where) -> str:
    looked = "" if "://" in str(where) or Path(where).is_absolute() else f" (looked for {Path(where).absolute()})"
    return (f"model {ref!r}: expected a local Hugging Face checkpoint directory or a gs:// or s3:// URI of one, "
            f"but {where} does not exist or is not a directory{looked} (batchscore never downloads from a hub)")


def _check_files(ref: str | None, where: str, names: set[str], read, allow_pickle: bool) -> CheckpointFiles:
    """The checks on a checkpoint folder's files that need neither transformers nor torch.

    `names` are the file names in the folder (`where`), `read(name)` returns one's bytes.
    The one place these `ModelError` messages are made, for `check` and `resolve` alike.
    """
    if "config.json" not in names:
        raise ModelError(f"model {ref!r}: config.json is missing from {where}")
    config = _json(ref, where, "config.json", read)
    remote = ref is not None and _is_remote(ref)
    name = ("batchscore-demo-digits" if ref is None else
            str(ref).rstrip("/").rsplit("/", 1)[-1] if remote else Path(where).resolve().name)
    if _timm_config(config):
        return _check_timm_files(ref, where, names, config, name)
    if "preprocessor_config.json" not in names:
        raise ModelError(f"model {ref!r}: preprocessor_config.json is missing from {where}")
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
    labels, multi_label = _labels(config, ref)
    # the preprocessing too: an image processor or a resize batchscore does not implement fails here
    _preprocess_from(_json(ref, where, "preprocessor_config.json", read), config.get("model_type"),
                     f"{where}/preprocessor_config.json")
    return CheckpointFiles(
        ref="<demo>" if ref is None else str(ref),
        where=where,
        name=name,
        model_type=str(config.get("model_type", "?")),
        labels=labels,
        multi_label=multi_label,
        weights=weights[0],
        weights_format=weights_format,
        has_head=bool(labels),
    )


def _timm_config(config: dict) -> bool:
    return timm_models.is_timm_config(config)


def _check_timm_files(ref: str | None, where: str, names: set[str], config: dict, name: str) -> CheckpointFiles:
    """A folder in timm's Hugging Face layout: model.safetensors (never pickle) and labels."""
    if "model.safetensors" not in names:
        found = sorted(n for n in names if n.endswith(_PICKLE_ENDINGS))
        raise ModelError(f"model {ref!r}: no model.safetensors in timm checkpoint {where}"
                         + (f" (found {found}: batchscore does not load pickle weights of timm checkpoints)"
                            if found else ""))
    timm_models.check_config(config, ref, where)  # pretrained_cfg there; an architecture timm knows
    labels = timm_models.folder_labels(config, ref, where)
    return CheckpointFiles(ref="<demo>" if ref is None else str(ref), where=where, name=name,
                           model_type=str(config["architecture"]), labels=labels, multi_label=False,
                           weights="model.safetensors", weights_format="safetensors", layout="timm",
                           has_head=bool(labels))


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
    allow_pickle = model.weights_format == "pickle"
    folder = cache.fetch_checkpoint(model.ref, expect_key=model.cache_key, allow_pickle=allow_pickle)[0]
    return str(folder / model.weights_file) if model.layout == "npz" else str(folder)


def _require_safe_torch_load(ref: str | None) -> None:
    """Pickle weights need torch >= 2.6; the installed version is read from its metadata, so
    this check (part of `check`) does not import torch."""
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
    """(labels, multi_label) of a transformers checkpoint; () for a headless one (`ViTModel`)."""
    archs = config.get("architectures") or []
    if any(a.endswith("Model") and not a.endswith("PreTrainedModel") for a in archs):
        return (), False  # headless: embeddings only (its config's id2label names no trained head)
    if not any(a.endswith("ForImageClassification") or a.endswith("ForImageClassificationWithTeacher")
               for a in archs):
        raise ModelError(
            f"model {ref!r}: expected a checkpoint with an image-classification head (…ForImageClassification) "
            f"or a headless vision model (e.g. ViTModel, for embeddings), but its config.json names "
            f"architectures {archs}"
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
    """Reads preprocessing from the checkpoint's preprocessor_config.json as its transformers
    image-processor class would (`batchscore.checkpoints.image_processors`: the class's own defaults and
    legacy forms, without importing transformers or torch).

    Raises:
        ModelError: an image processor batchscore does not read, or preprocessing its decode
            does not implement (padding, a resize that is not height × width or a shortest
            edge, resample 4 or 5, no fixed output size).
    """
    def read(name: str) -> bytes:
        return (path / name).read_bytes()

    raw = _json(str(path), str(path), "preprocessor_config.json", read)
    config = _json(str(path), str(path), "config.json", read) if (path / "config.json").is_file() else {}
    return _preprocess_from(raw, config.get("model_type"), f"{path}/preprocessor_config.json")


def _preprocess_from(raw: dict, model_type: str | None, where: str) -> PreprocessSpec:
    """`preprocess_spec` of a preprocessor_config.json's contents (`where`: its path)."""
    try:
        proc = image_processors.read(raw, model_type, where)
    except image_processors.ProcessorError as e:
        raise ModelError(str(e)) from None
    _refuse_unimplemented(raw, where)

    size = shortest = None
    if proc.do_resize:
        s = proc.size or {}
        if s.get("height") and s.get("width"):
            size = (int(s["height"]), int(s["width"]))
        elif s.get("shortest_edge") and not s.get("longest_edge"):
            shortest = int(s["shortest_edge"])
        else:
            raise ModelError(f"{where}: size {s} is not implemented; expected height and width, or shortest_edge")
    crop = None
    if proc.do_center_crop:
        c = proc.crop_size
        if c is None:
            raise ModelError(f"{where}: do_center_crop is true but there is no crop_size ({proc.cls} has no default "
                             "one); expected crop_size as an int or {\"height\": …, \"width\": …}")
        if not (c.get("height") and c.get("width")):
            raise ModelError(f"{where}: crop_size {c} is not implemented; expected height and width")
        crop = (int(c["height"]), int(c["width"]))
    for key, needed in (("rescale_factor", proc.do_rescale), ("image_mean", proc.do_normalize),
                        ("image_std", proc.do_normalize), ("resample", proc.do_resize)):
        values = getattr(proc, key)
        if not needed:
            continue
        if values is None:
            raise ModelError(f"{where}: {key} is null; expected a value (or the key left out, for the default)")
        if not all(math.isfinite(v) for v in (values if isinstance(values, tuple) else [values])):
            raise ModelError(f"{where}: {key} {values} is not finite; expected finite numbers")
    # values that would make every row wrong (a zero std: inf and NaN; a zero factor: one constant input)
    if proc.do_rescale and not proc.rescale_factor > 0:
        raise ModelError(f"{where}: rescale_factor must be > 0 (usually 1/255), got {proc.rescale_factor}")
    if proc.do_normalize and not all(v > 0 for v in proc.image_std):
        raise ModelError(f"{where}: every image_std must be > 0, got {list(proc.image_std)}")
    for name, sides in (("size", size), ("shortest_edge", shortest and [shortest]), ("crop_size", crop)):
        if sides and not all(0 < v <= MAX_INPUT_SIDE for v in sides):
            raise ModelError(f"{where}: {name} {list(sides)} is out of range; expected sides of 1 to "
                             f"{MAX_INPUT_SIDE} pixels")
    if proc.resample not in _TORCHVISION_INTERPOLATION:
        raise ModelError(f"{where}: resample={proc.resample} is not implemented; expected 0 (nearest), 1 (lanczos), "
                         "2 (bilinear) or 3 (bicubic)")
    spec = PreprocessSpec(
        size=size,
        shortest_edge=shortest,
        interpolation=_TORCHVISION_INTERPOLATION[proc.resample],
        crop=crop,
        rescale_factor=proc.rescale_factor if proc.do_rescale else None,
        mean=proc.image_mean if proc.do_normalize else None,
        std=proc.image_std if proc.do_normalize else None,
    )
    if size is None and shortest is None and crop is None:
        raise ModelError(f"{where}: neither resize nor crop is set, so images have no fixed size")
    if crop is None and size is None:
        raise ModelError(f"{where}: a shortest_edge resize ({shortest}) without a centre crop gives no fixed input "
                         "size; expected size with height and width, or do_center_crop with a crop_size")
    return spec


def _refuse_unimplemented(raw: dict, where: str) -> None:
    """Preprocessing batchscore's decode does not implement (`check` and `preprocess_spec`)."""
    for key in ("do_pad", "do_flip_channel_order"):
        if raw.get(key):
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
