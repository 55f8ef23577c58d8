"""timm checkpoints: timm's Hugging Face layout, and google-research/vision_transformer `.npz` files.

Both are scored through timm: the architecture is built with `timm.create_model(name,
pretrained=False, ...)` (nothing is downloaded) and the weights come from the checkpoint's own
file, never a pickle:

    timm folder   config.json with `architecture`, `pretrained_cfg` (input_size, interpolation,
                  crop_pct, crop_mode, mean, std), `num_classes`, maybe `model_args` and
                  `label_names`; weights in model.safetensors, loaded strictly
    .npz          a JAX/Flax ViT (ViT-B_16.npz, the AugReg files): the architecture from the
                  arrays' shapes (or `model_arch`), weights through timm's own npz loader
                  (`np.load` with pickle off), the preprocessing of the vision_transformer
                  README (resize to the model's size, mean and std 0.5)

Labels come from the checkpoint: `label_names` in config.json, else timm's bundled ImageNet
class names when the checkpoint names that label set (a pretrained_cfg tag such as
`augreg2_in21k_ft_in1k` with the matching class count; an .npz with 1,000 or 21,843 classes,
the two label sets vision_transformer trained on), else `<stem>.labels.txt` beside an .npz.

`models.check` reads files only, for a bad job's fast failure before Ray starts; for these two
layouts it also imports timm (`check_architecture`, `npz_architecture` with a `model_arch`), so
an architecture timm does not know fails there, not in the actors.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np

from batchscore.checkpoints.checkpoint import ModelInfo, PreprocessSpec
from batchscore.exceptions import ModelError

# timm's `_NUM_CLASSES_TO_SUBSET`, and the tag word that names each set.
_IMAGENET_SETS = {1000: ("in1k", "imagenet_synsets.txt"), 11821: ("in12k", "imagenet12k_synsets.txt"),
                  21841: ("in22k", "imagenet22k_synsets.txt"), 21843: ("in21k", "imagenet21k_goog_synsets.txt")}
# Resampling timm names that decode implements (torchvision on uint8, antialiased).
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_NPZ_PREFIXES = ("", "opt/target/")


def is_timm_config(config: dict) -> bool:
    """timm's Hugging Face layout names one `architecture`; transformers' names `architectures`."""
    return "architecture" in config and "architectures" not in config


def check_architecture(name, ref, where: str, what: str = "architecture") -> None:
    """A model name timm can build (`timm.is_model`, a pretrained tag allowed), else a
    `ModelError` with timm's closest names. Imports timm (and torch)."""
    import timm  # lazy: timm imports torch; only the timm and .npz layouts need it

    if isinstance(name, str) and name and timm.is_model(name):
        return
    close = difflib.get_close_matches(str(name).split(".", 1)[0], timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(f"model {ref!r}: {what} {name!r} in {where} is not a model timm {timm.__version__} knows{hint}")


def check_config(config: dict, ref, where: str) -> None:
    """The keys of a timm config.json that scoring needs, and its architecture.

    Raises:
        ModelError: `pretrained_cfg` (the preprocessing) missing or not a mapping, or an
            architecture timm does not know.
    """
    if "pretrained_cfg" not in config:
        raise ModelError(f"model {ref!r}: config.json in {where} has no 'pretrained_cfg' key, which holds the "
                         "model's preprocessing (input_size, interpolation, crop_pct, crop_mode, mean, std); "
                         "timm's save_for_hf / push_to_hf_hub write it")
    if not isinstance(config["pretrained_cfg"], dict):
        raise ModelError(f"model {ref!r}: config.json in {where}: pretrained_cfg is not a mapping")
    if not isinstance(config.get("model_args") or {}, dict):
        raise ModelError(f"model {ref!r}: config.json in {where}: model_args is not a mapping")
    check_architecture(config.get("architecture"), ref, f"config.json in {where}")


def safetensors_shapes(path: Path | str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file, from its header (no tensor data read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}


def folder_dims(config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(width of the final features, width of timm's pre-logits output) of a timm folder, from the
    checkpoint: the classifier weight's input width (`pretrained_cfg.classifier`, when the
    weights hold a head), else `num_features` / `head_hidden_size` / `embed_dim` of config.json
    (top level, `model_args`, `pretrained_cfg`). 0 where the checkpoint does not say."""
    pretrained = config.get("pretrained_cfg") or {}
    args = config.get("model_args") or {}

    def first(*keys) -> int:
        for source in (config, args, pretrained):
            for key in keys:
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return 0

    features = first("num_features", "embed_dim")
    classifiers = pretrained.get("classifier") or "head"
    classifier = classifiers if isinstance(classifiers, str) else next(iter(classifiers), "head")
    head = shapes.get(f"{classifier}.weight")
    head_in = head[1] if head is not None and len(head) >= 2 else 0
    pre_logits = head_in or first("head_hidden_size") or features
    return features or pre_logits, pre_logits


def num_classes(config: dict) -> int:
    pretrained = config.get("pretrained_cfg") or {}
    return int(config.get("num_classes", pretrained.get("num_classes", 0)) or 0)


def folder_labels(config: dict, ref, where: str) -> tuple[str, ...]:
    """Labels of a timm folder: `label_names` (their `label_descriptions` when every name has
    one), else timm's ImageNet names when the pretrained_cfg tag names the set; () when headless.

    Raises:
        ModelError: a head without label names anywhere.
    """
    n = num_classes(config)
    if n == 0:
        return ()
    pretrained = config.get("pretrained_cfg") or {}
    names = config.get("label_names", pretrained.get("label_names"))
    if names:
        if isinstance(names, dict):
            names = [names.get(str(i), names.get(i)) for i in range(len(names))]
        descriptions = config.get("label_descriptions", pretrained.get("label_descriptions")) or {}
        if all(str(x) in descriptions for x in names):
            names = [descriptions[str(x)] for x in names]
        if len(names) != n or any(x is None for x in names):
            raise ModelError(f"model {ref!r}: config.json in {where} has {n} classes but label_names names "
                             f"{len(names)} (numbered 0..{len(names) - 1} expected)")
        return tuple(str(x) for x in names)
    tag = str(pretrained.get("tag") or "")
    said = re.findall(r"in1k|in12k|in21k|in22k", tag)
    if n in _IMAGENET_SETS and said and said[-1] == _IMAGENET_SETS[n][0]:
        return imagenet_labels(n)
    raise ModelError(f"model {ref!r}: config.json in {where} has a {n}-class head but no label_names, and its "
                     f"pretrained_cfg tag {tag!r} names no ImageNet label set of {n} classes; add label_names "
                     "(a list of class names in head order) to config.json")


def imagenet_labels(n: int) -> tuple[str, ...]:
    """timm's bundled ImageNet class names (WordNet lemmas, e.g. 'tench, Tinca tinca') for the set
    of `n` classes, read from timm's package data without importing timm (or torch)."""
    root = Path(importlib.util.find_spec("timm").submodule_search_locations[0]) / "data" / "_info"
    synsets = (root / _IMAGENET_SETS[n][1]).read_text().split()
    lemmas = dict(line.split("\t", 1) for line in (root / "imagenet_synset_to_lemma.txt").read_text().splitlines()
                  if "\t" in line)
    return tuple(lemmas.get(s, s) for s in synsets)


def preprocess_from_cfg(pretrained_cfg: dict, where: str):
    """A `PreprocessSpec` equal to timm's eval transform (`resolve_data_config` +
    `create_transform`): resize to floor(size / crop_pct) (shortest edge for `center`, both
    sides for `squash`), centre crop with torchvision's rounded offsets, x/255, mean, std."""
    from timm.data import resolve_data_config  # lazy: timm imports torch

    data = resolve_data_config(pretrained_cfg=pretrained_cfg)
    _, h, w = (int(v) for v in data["input_size"])
    crop_pct, mode, interpolation = float(data["crop_pct"]), data["crop_mode"], data["interpolation"]
    if interpolation not in _INTERPOLATIONS:
        raise ModelError(f"{where}: interpolation {interpolation!r} is not implemented; expected one of "
                         f"{list(_INTERPOLATIONS)}")
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    if mode == "squash":
        size, shortest = scale, None
    elif mode == "center" and scale[0] == scale[1]:
        size, shortest = None, scale[0]
    else:
        raise ModelError(f"{where}: crop_mode {mode!r} with input size {h}x{w} is not implemented by batchscore's "
                         "decode; expected center (square input) or squash")
    return PreprocessSpec(size=size, shortest_edge=shortest, interpolation=interpolation, crop=(h, w),
                          rescale_factor=1 / 255, mean=tuple(float(v) for v in data["mean"]),
                          std=tuple(float(v) for v in data["std"]), crop_offsets="round")


# -- vision_transformer .npz ------------------------------------------------------------------

def npz_shapes(path: Path | str) -> dict[str, tuple[int, ...]]:
    """{array name: shape} of an .npz, from each member's header: no pickle, no data read.

    Raises:
        ValueError: not an .npz of plain arrays (object arrays need pickle and are refused).
    """
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                if dtype.hasobject:
                    raise ValueError(f"array {info.filename[:-4]!r} holds Python objects (pickle); refused")
                shapes[info.filename[:-4]] = tuple(int(s) for s in shape)
    return shapes


def npz_architecture(shapes: dict[str, tuple[int, ...]], ref, where: str, model_arch: str | None = None) -> dict:
    """The timm VisionTransformer arguments the arrays' shapes imply, and what the file holds;
    every array timm's loader reads is checked against the shape that architecture (or
    `model_arch`, a timm ViT, whose patch and position embeddings timm resamples) expects.

    Returns:
        {"kwargs": create_model kwargs, "prefix", "num_classes", "pre_logits" (its width or 0),
         "dim", "img_size"}.

    Raises:
        ModelError: not a plain ViT in the vision_transformer key layout (naming the first
            missing array), an array of another shape than the architecture's (naming both),
            or a `model_arch` timm does not know or that is no VisionTransformer.
    """
    def refuse(what: str):
        return ModelError(f"model {ref!r}: {where} is not a vision_transformer ViT .npz: {what}")

    prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in shapes), None)
    if prefix is None and not any(k.startswith("params/") for k in shapes):
        raise refuse(f"missing array 'embedding/kernel' (among its {len(shapes)} arrays)")
    if prefix is None or f"{prefix}conv_root/kernel" in shapes or f"{prefix}pos_embedding" in shapes \
            or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in shapes:
        raise ModelError(f"model {ref!r}: {where} is a hybrid (ResNet+ViT) or big_vision checkpoint; batchscore reads "
                         "plain ViT .npz files (ViT-B_16.npz, the AugReg ViT files)")

    def need(name: str, ndim: int) -> tuple[int, ...]:
        shape = shapes.get(prefix + name)
        if shape is None:
            raise refuse(f"missing array '{prefix}{name}'")
        if len(shape) != ndim:
            raise refuse(f"array '{prefix}{name}' has shape {shape}, expected {ndim} dimensions")
        return shape

    p, _, _, dim = need("embedding/kernel", 4)
    block = "Transformer/encoderblock_0/"
    _, heads, head_dim = need(f"{block}MultiHeadDotProductAttention_1/query/kernel", 3)
    mlp = need(f"{block}MlpBlock_3/Dense_0/kernel", 2)[1]
    tokens = need("Transformer/posembed_input/pos_embedding", 3)[1]
    depth = 1 + max(int(m.group(1)) for k in shapes
                    for m in [re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k)] if m)
    has_cls = f"{prefix}cls" in shapes
    grid = math.isqrt(max(tokens - has_cls, 0))
    if grid * grid != tokens - has_cls or grid == 0:
        raise ModelError(f"model {ref!r}: {where}: {tokens} position embeddings are not a square grid")
    head = shapes.get(f"{prefix}head/kernel")
    classes = head[-1] if head else 0
    pre_logits = shapes.get(f"{prefix}pre_logits/kernel")
    pre_width = pre_logits[-1] if pre_logits else 0
    built = {"dim": dim, "depth": depth, "heads": heads, "head_dim": head_dim, "mlp": mlp, "cls": has_cls,
             "patch": p, "tokens": tokens}
    named = (f"the ViT its arrays imply (width {dim}, {depth} blocks, {heads} heads of {head_dim}, "
             f"MLP {mlp}, patch {p})")
    if model_arch:
        built = dict(vit_dims(model_arch, ref, where), patch=None, tokens=None)  # timm resamples these two
        named = (f"model_arch {model_arch} (width {built['dim']}, {built['depth']} blocks, {built['heads']} heads "
                 f"of {built['head_dim']}, MLP {built['mlp']})")
    for name, want in npz_expected_shapes(built, classes, pre_width).items():
        got = shapes.get(prefix + name)
        if got is None:
            raise refuse(f"missing array '{prefix}{name}' (expected by {named})")
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
            raise ModelError(f"model {ref!r}: {where}: array '{prefix}{name}' has shape {got}, but {named} "
                             f"expects {shown}")
    kwargs = dict(img_size=grid * p, patch_size=p, embed_dim=dim, depth=depth, num_heads=heads,
                  mlp_ratio=mlp / dim, class_token=has_cls, global_pool="token" if has_cls else "avg",
                  num_classes=classes)
    return {"kwargs": kwargs, "prefix": prefix, "num_classes": classes, "dim": built["dim"], "img_size": grid * p,
            "pre_logits": pre_width}


def npz_expected_shapes(a: dict, classes: int, pre_logits: int) -> dict[str, tuple]:
    """{array name (no prefix): shape} timm's loader reads for a ViT of `a` (dim, depth, heads,
    head_dim, mlp, cls, patch, tokens; None for a size that may be anything)."""
    d, h, hd, m = a["dim"], a["heads"], a["head_dim"], a["mlp"]
    shapes = {"embedding/kernel": (a["patch"], a["patch"], 3, d), "embedding/bias": (d,),
              "Transformer/posembed_input/pos_embedding": (1, a["tokens"], d),
              "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,)}
    if a["cls"]:
        shapes["cls"] = (1, 1, d)
    if pre_logits:
        shapes["pre_logits/kernel"], shapes["pre_logits/bias"] = (d, pre_logits), (pre_logits,)
    if classes:
        shapes["head/kernel"], shapes["head/bias"] = (pre_logits or d, classes), (classes,)
    for i in range(a["depth"]):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{b}{ln}/scale"] = shapes[f"{b}{ln}/bias"] = (d,)
        for n in ("query", "key", "value"):
            shapes[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = (d, h, hd)
            shapes[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = (h, hd)
        shapes[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = (h, hd, d)
        shapes[f"{b}MultiHeadDotProductAttention_1/out/bias"] = (d,)
        shapes[f"{b}MlpBlock_3/Dense_0/kernel"], shapes[f"{b}MlpBlock_3/Dense_0/bias"] = (d, m), (m,)
        shapes[f"{b}MlpBlock_3/Dense_1/kernel"], shapes[f"{b}MlpBlock_3/Dense_1/bias"] = (m, d), (d,)
    return shapes


def vit_dims(model_arch: str, ref, where: str) -> dict:
    """Width, depth, heads, head width, MLP width and class token of timm's `model_arch`, built on
    the meta device (no memory, no weights). Imports timm.

    Raises:
        ModelError: an architecture timm does not know, or one that is no plain VisionTransformer.
    """
    import timm  # lazy: timm and torch only where a model_arch is built
    import torch

    check_architecture(model_arch, ref, f"the job (for {where})", what="model_arch")
    try:
        with torch.device("meta"):
            net = timm.create_model(model_arch, pretrained=False, num_classes=0)
    except Exception as e:  # noqa: BLE001 - timm's own error, reported as the job's
        raise ModelError(f"model {ref!r}: timm cannot build model_arch {model_arch!r}: {e}") from None
    blocks = getattr(net, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None) if attn is not None else None
    if attn is None or not hasattr(attn, "qkv") or fc1 is None or not hasattr(net, "patch_embed"):
        raise ModelError(f"model {ref!r}: model_arch {model_arch!r} is not a plain timm VisionTransformer, so timm "
                         f"cannot load the vision_transformer .npz {where} into it")
    return {"dim": int(net.embed_dim), "depth": len(blocks), "heads": int(attn.num_heads),
            "head_dim": int(attn.head_dim), "mlp": int(fc1.out_features), "cls": net.cls_token is not None}


def npz_head_is_zero(path: Path, prefix: str) -> bool:
    """The ImageNet-21k vision_transformer files ship a head zeroed by its authors: headless."""
    with np.load(path, allow_pickle=False) as w:
        return not np.any(w[f"{prefix}head/kernel"]) and not np.any(w[f"{prefix}head/bias"])


def npz_labels(path: Path, classes: int, ref) -> tuple[str, ...]:
    """`<stem>.labels.txt` beside the file (one label a line), else the ImageNet set of that size."""
    sidecar = path.with_name(f"{path.stem}.labels.txt")
    if sidecar.is_file():
        labels = tuple(line.strip() for line in sidecar.read_text().splitlines() if line.strip())
        if len(labels) != classes:
            raise ModelError(f"model {ref!r}: {sidecar} names {len(labels)} labels, the head has {classes}")
        return labels
    if classes in (1000, 21843):
        return imagenet_labels(classes)
    raise ModelError(f"model {ref!r}: a {classes}-class .npz needs its labels: write {sidecar.name} (one label "
                     "per line, in head order) beside it")


def npz_preprocess(img_size: int):
    """The vision_transformer README's: resize to the model's size (no crop), mean and std 0.5."""
    return PreprocessSpec(size=(img_size, img_size), shortest_edge=None, interpolation="bilinear", crop=None,
                          rescale_factor=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# -- loading (in the actors) -------------------------------------------------------------------

def build(model: ModelInfo, path: str) -> tuple[object, object | None]:
    """(the timm model with the checkpoint's weights, an npz pre-logits pooler or None), on the CPU;
    `path` is the checkpoint on this node (`models.local_path`): the folder, or the .npz file.

    Raises:
        RuntimeError: a weight of the architecture is missing from the checkpoint, or the
            checkpoint holds weights the architecture does not (it would be scored wrongly).
    """
    import timm  # lazy: timm and torch only in the inference actors
    import torch

    path = Path(path)
    args = json.loads(model.model_args)
    if model.layout == "timm":
        from safetensors.torch import load_file  # lazy: imports torch

        net = timm.create_model(model.architecture, pretrained=False, **args)
        result = net.load_state_dict(load_file(path / model.weights_file), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"model {model.ref!r}: {model.architecture} does not match model.safetensors: "
                               f"missing {sorted(result.missing_keys)[:10]}, unexpected "
                               f"{sorted(result.unexpected_keys)[:10]}; refusing to score")
        return net.eval(), None
    net = timm.create_model(model.architecture, pretrained=False, **args)
    net.load_pretrained(str(path))  # timm's own .npz loader: np.load(allow_pickle=False)
    pooler = None
    if model.has_pooler:  # the representation layer timm's loader leaves out: tanh(dense(cls))
        prefix = _npz_prefix(path)
        with np.load(path, allow_pickle=False) as w:
            kernel, bias = w[f"{prefix}pre_logits/kernel"], w[f"{prefix}pre_logits/bias"]
        pooler = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            pooler.weight.copy_(torch.from_numpy(kernel.T.copy()))
            pooler.bias.copy_(torch.from_numpy(bias))
    return net.eval(), pooler


def _npz_prefix(path: Path) -> str:
    with np.load(path, allow_pickle=False) as w:
        return next(p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in w.files)
