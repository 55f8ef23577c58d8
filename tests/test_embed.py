"""Embeddings, timm checkpoints and vision_transformer .npz files, against the
libraries themselves: transformers for a headless ViT, timm for its own layouts.

Every checkpoint is a tiny random-init model made here (width 32, 2 layers); nothing is
downloaded. Heads are calibrated on the photos (as conftest does) so probabilities depend
strongly on the pixels, and a preprocessing mistake breaks the bounds.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LABELS

from batchscore import ScoreConfig, pipeline
from batchscore.checkpoints import models, timm_models
from batchscore.checkpoints.checkpoint import ModelInfo, PreprocessSpec
from batchscore.decoding import decode
from batchscore.exceptions import ModelError
from batchscore.inference import predict
from batchscore.outputs import output

IN21K_PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224,
                      "image_processor_type": "ViTImageProcessor"}  # google/vit-base-patch32-224-in21k's


def tiny_vit_config(**kw):
    import transformers as tf

    return tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        image_size=224, **kw)


@pytest.fixture(scope="module")
def headless(session_tmp) -> Path:
    """A headless ViTModel, patch 32, with a pooler, and the in21k preprocessing."""
    import torch
    import transformers as tf

    path = session_tmp / "vit-headless-p32"
    if not path.exists():
        torch.manual_seed(3)
        tf.ViTModel(tiny_vit_config(patch_size=32)).save_pretrained(path, safe_serialization=True)
        (path / "preprocessor_config.json").write_text(json.dumps(IN21K_PREPROCESSOR))
    return path


@functools.lru_cache(maxsize=8)
def decoded(files: tuple[Path, ...], spec: PreprocessSpec) -> dict:
    """batchscore's decode of `files` (once per preprocessing: the 2822 px mosaic takes a while)."""
    n = len(files)
    batch = {"id": np.array([f.name for f in files], dtype=object),
             "data": np.array([f.read_bytes() for f in files], dtype=object),
             "error": np.array([""] * n, dtype=object), "meta": np.array([""] * n, dtype=object)}
    return decode.decode_batch(batch, spec=spec, max_image_pixels=ScoreConfig().max_image_pixels)


def in_process(files: list[Path], model: ModelInfo, dtype: str = "fp32", **settings) -> pa.Table:
    """batchscore's decode and predict functions on `files`, without Ray."""
    task = models.task_spec(model, **settings)
    table = predict.Predictor(model, predict.PredictSpec("cpu", dtype, top_k=0, batch_size=16, task=task))(
        decoded(tuple(files), model.preprocess))
    assert table.column("error").null_count == len(files), table.column("error").to_pylist()
    return table


def vectors(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def draft_decoded(files) -> np.ndarray:
    """False for the 2822 px mosaic, which decode reads in JPEG draft mode (pixels within 2 levels
    of a full decode; docs/architecture.md measures 7e-4 in probability): it is bounded apart."""
    return np.array([f.name != "mosaic-large.jpg" for f in files])


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# -- headless transformers ViT --------------------------------------------------------------------

def test_headless_vit_embeds_like_transformers(headless, photos):
    import torch
    import transformers as tf
    from PIL import Image

    files = sorted(photos.iterdir())
    model = models.resolve(str(headless))
    assert not model.has_head and model.has_pooler
    assert models.task_for("auto", model) == "embed"
    with pytest.raises(ModelError, match="headless"):
        models.task_for("classify", model)

    proc = tf.ViTImageProcessor.from_pretrained(str(headless))
    net = tf.ViTModel.from_pretrained(str(headless)).eval()
    with torch.no_grad():
        out = net(**proc([Image.open(f).convert("RGB") for f in files], return_tensors="pt"))
    reference = {"pooler": out.pooler_output.numpy(), "cls": out.last_hidden_state[:, 0].numpy(),
                 "mean": out.last_hidden_state[:, 1:].mean(1).numpy()}

    ours = {pool: vectors(in_process(files, model, embed_pool=pool)) for pool in ("auto", "cls", "mean")}
    assert np.array_equal(ours["auto"], vectors(in_process(files, model, embed_pool="pooler")))
    # The 2822 px mosaic is decoded in JPEG draft mode (pixels within 2 levels of a full decode,
    # docs/architecture.md), so it is bounded apart; every other photo decodes as transformers does.
    full = draft_decoded(files)
    for pool, name in (("auto", "pooler"), ("cls", "cls"), ("mean", "mean")):
        diff = np.abs(ours[pool] - reference[name])
        print(f"FIGURE headless ViT-B/32-style {name}: max |e - e_transformers| = {diff[full].max():.2e} over "
              f"{full.sum()} photos, {diff[~full].max():.2e} on the draft-decoded mosaic (fp32; |e| up to "
              f"{np.abs(reference[name]).max():.1f})")
        assert ours[pool].shape == (len(files), 32) and diff[full].max() <= 1e-4, (pool, diff[full].max())
        assert diff[~full].max() <= 2e-3

    normalised = vectors(in_process(files, model, embed_normalize=True))
    assert np.allclose(np.linalg.norm(normalised, axis=1), 1, atol=1e-5)
    unit = reference["pooler"] / np.linalg.norm(reference["pooler"], axis=1, keepdims=True)
    assert np.abs(normalised - unit)[full].max() <= 1e-4

    bf16 = vectors(in_process(files, model, dtype="bf16"))
    worst = cosine(bf16, reference["pooler"]).min()
    print(f"FIGURE headless pooler bf16: min cosine to transformers fp32 = {worst:.5f}")
    assert worst >= 0.999


def test_classify_plus_embed_is_one_pass_with_unchanged_probabilities(checkpoints, photos, tmp_path):
    import torch
    import transformers as tf
    from safetensors.torch import load_file

    files = sorted(photos.iterdir())[:8]
    model = models.resolve(str(checkpoints["vit"]))
    assert model.has_head and not model.has_pooler
    plain = in_process(files, model, task="classify")
    both = in_process(files, model, task="classify+embed")
    assert both.column("labels").to_pylist() == plain.column("labels").to_pylist()
    assert np.array_equal(np.array(both.column("probs").to_pylist()), np.array(plain.column("probs").to_pylist()))

    # the same weights without the head, as a headless ViTModel checkpoint: the same embeddings
    twin = tmp_path / "twin"
    net, info = tf.ViTModel.from_pretrained(str(checkpoints["vit"]), add_pooling_layer=False,
                                            output_loading_info=True)
    assert not info["missing_keys"]
    net.save_pretrained(twin, safe_serialization=True)
    assert json.loads((twin / "config.json").read_text())["architectures"] == ["ViTModel"]
    assert not any(k.startswith("classifier") for k in load_file(twin / "model.safetensors"))
    (twin / "preprocessor_config.json").write_text((checkpoints["vit"] / "preprocessor_config.json").read_text())
    headless = in_process(files, models.resolve(str(twin)))
    assert np.allclose(vectors(both), vectors(headless), atol=1e-6)
    assert vectors(both).shape == (len(files), 32)

    # one forward pass: the encoder runs once per chunk, not once for the logits and once more
    predictor = predict.Predictor(model, predict.PredictSpec("cpu", "fp32", top_k=3, batch_size=4,
                                  task=models.task_spec(model, "classify+embed")))
    calls = []
    predictor.net.base_model.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        logits, vector = predictor.forward(torch.zeros(4, 3, 224, 224))
    assert len(calls) == 1 and logits.shape == (4, len(LABELS)) and vector.shape == (4, 32)


# -- timm checkpoints ----------------------------------------------------------------------------

def calibrate_timm_head(net, images, logit_std: float = 2.0) -> None:
    """Centre and scale a timm head on `images` so its logits vary strongly across them."""
    import torch

    with torch.no_grad():
        feats = net.forward_head(net.forward_features(images), pre_logits=True)
        w = torch.randn_like(net.head.weight) / feats.std(0).clamp_min(1e-6)
        w *= logit_std / ((feats - feats.mean(0)) @ w.T).std()
        net.head.weight.copy_(w)
        net.head.bias.copy_(-(feats.mean(0) @ w.T))


def timm_reference(net, files, data_config) -> np.ndarray:
    """timm's own eval transform (PIL) and model: softmax probabilities [N, C]."""
    import torch
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**data_config)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return torch.softmax(net(x), -1).numpy()


def ours_probs(table: pa.Table, labels) -> np.ndarray:
    rows = table.to_pylist()
    return np.array([[dict(zip(r["labels"], r["probs"]))[lb] for lb in labels] for r in rows])


@pytest.fixture(scope="module")
def timm_folder(session_tmp, photos) -> Path:
    """A tiny timm ViT saved in timm's Hugging Face layout: crop_pct 0.9, bicubic (its pretrained_cfg)."""
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf

    path = session_tmp / "timm-vit"
    torch.manual_seed(4)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                            num_classes=len(LABELS)).eval()
    cfg = resolve_data_config(model=net)
    assert cfg["crop_pct"] < 1 and cfg["interpolation"] == "bicubic", cfg
    transform = create_transform(**cfg)
    calibrate_timm_head(net, torch.stack([transform(Image.open(f).convert("RGB")) for f in sorted(photos.iterdir())]))
    save_for_hf(net, str(path), model_config={"label_names": LABELS}, safe_serialization=True)
    return path


def test_timm_checkpoint_scores_like_timm(timm_folder, photos):
    import timm
    from timm.data import resolve_data_config

    config = json.loads((timm_folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["pretrained_cfg"]["crop_pct"] == 0.9
    files = sorted(photos.iterdir())
    model = models.resolve(str(timm_folder))
    assert model.layout == "timm" and model.labels == tuple(LABELS)
    assert model.preprocess.shortest_edge == 248 and model.preprocess.crop == (224, 224)  # floor(224 / 0.9)

    net = timm.create_model(f"local-dir:{timm_folder}", pretrained=True).eval()  # timm reading the folder itself
    reference = timm_reference(net, files, resolve_data_config(model=net))
    assert reference.max(1).max() > 0.5 and len(set(reference.argmax(1))) >= 2  # discriminative
    ours = ours_probs(in_process(files, model, task="classify"), LABELS)
    diff, full = np.abs(ours - reference).max(1), draft_decoded(files)
    print(f"FIGURE timm ViT (crop_pct 0.9, bicubic): max |p - p_timm| = {diff[full].max():.2e} over {full.sum()} "
          f"photos, {diff[~full].max():.2e} on the draft-decoded mosaic (fp32)")
    assert diff[full].max() <= 1e-3 and diff[~full].max() <= 2e-3

    embedded = vectors(in_process(files, model, task="embed"))  # pooler = timm's pre-logits features
    import torch
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**resolve_data_config(model=net))
    with torch.no_grad():
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        pre_logits = net.forward_head(net.forward_features(x), pre_logits=True).numpy()
    assert np.abs(embedded - pre_logits)[full].max() < 1e-3

    # Negative control: without timm's crop_pct (resize straight to 224) the bound breaks.
    import dataclasses

    wrong = dataclasses.replace(model, preprocess=dataclasses.replace(model.preprocess, shortest_edge=224))
    diff = np.abs(ours_probs(in_process(files, wrong, task="classify"), LABELS) - reference).max()
    print(f"FIGURE timm ViT without its crop_pct: max diff {diff:.2e}")
    assert diff > 1e-2


# -- vision_transformer .npz ---------------------------------------------------------------------

def write_vit_npz(net, path: Path, head: bool = True) -> Path:
    """A timm VisionTransformer's weights in the google-research/vision_transformer key layout
    (the inverse of timm's `_load_weights`)."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    dim, heads = net.embed_dim, net.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    if head:
        w["head/kernel"], w["head/bias"] = sd["head.weight"].T, sd["head.bias"]
    for i in range(len(net.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for n, (qw, qb) in zip(("query", "key", "value"), zip(qkv_w, qkv_b)):
            w[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = qw.T.reshape(dim, heads, dim // heads)
            w[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = qb.reshape(heads, dim // heads)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = \
            sd[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).transpose(1, 2, 0)
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[b + norm + ".weight"], sd[b + norm + ".bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)
    return path


NPZ_ARCH = dict(patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def npz_files(session_tmp, photos) -> dict[str, Path]:
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform

    folder = session_tmp / "npz"
    folder.mkdir(exist_ok=True)
    torch.manual_seed(5)
    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=len(LABELS), **NPZ_ARCH).eval()
    transform = create_transform(**README_DATA)
    calibrate_timm_head(net, torch.stack([transform(Image.open(f).convert("RGB")) for f in sorted(photos.iterdir())]))
    (folder / "ViT-tiny.labels.txt").write_text("\n".join(LABELS) + "\n")
    return {"head": write_vit_npz(net, folder / "ViT-tiny.npz"),
            "headless": write_vit_npz(net, folder / "ViT-tiny-in21k.npz", head=False)}


# The vision_transformer README's preprocessing, as timm's transform: resize to 224 (squash, no crop), 0.5/0.5.
README_DATA = dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def timm_from_npz(path: Path, num_classes: int):
    """timm loading the .npz itself (its pretrained-file path, `custom_load` = its npz loader)."""
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay={"file": str(path), "custom_load": True}, **NPZ_ARCH).eval()


def test_vision_transformer_npz_scores_like_timm(npz_files, photos):
    files = sorted(photos.iterdir())
    checked = models.check(str(npz_files["head"]))
    assert checked.layout == "npz" and checked.labels == tuple(LABELS)
    model = models.resolve(str(npz_files["head"]))
    assert json.loads(model.model_args)["depth"] == 2 and model.preprocess.size == (224, 224)
    reference = timm_reference(timm_from_npz(npz_files["head"], len(LABELS)), files, README_DATA)
    assert reference.max(1).max() > 0.5 and len(set(reference.argmax(1))) >= 2
    diff, full = np.abs(ours_probs(in_process(files, model, task="classify"), LABELS) - reference).max(1), \
        draft_decoded(files)
    print(f"FIGURE vision_transformer .npz (tiny ViT): max |p - p_timm| = {diff[full].max():.2e} over {full.sum()} "
          f"photos, {diff[~full].max():.2e} on the draft-decoded mosaic (fp32)")
    assert diff[full].max() <= 1e-3 and diff[~full].max() <= 2e-3


def test_headless_npz_gives_embeddings(npz_files, photos):
    import torch
    from PIL import Image
    from timm.data import create_transform

    files = sorted(photos.iterdir())[:6]
    model = models.resolve(str(npz_files["headless"]))
    assert not model.has_head and models.task_for("auto", model) == "embed"
    ours = vectors(in_process(files, model))
    net = timm_from_npz(npz_files["headless"], 0)
    transform = create_transform(**README_DATA)
    with torch.no_grad():
        cls = net.forward_features(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))[:, 0]
    assert ours.shape == (len(files), 32) and np.abs(ours - cls.numpy()).max() < 1e-3


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"embedding/kernel": np.array([object()], dtype=object)})
    with pytest.raises(ModelError, match="pickle"):
        models.check(str(path))


# -- review fixes: widths from the checkpoint, bad checkpoints refused before Ray -----------------

def timm_tiny_folder(path: Path, classes: int, width: int = 48) -> Path:
    """A random-init timm ViT in timm's HF layout whose config.json names no `num_features` (as
    hand-written and older configs do not): the width has to come from model_args or the weights."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(6)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=width, depth=1, num_heads=2,
                            num_classes=classes).eval()
    save_for_hf(net, str(path), model_config={"label_names": LABELS[:classes]} if classes else None,
                safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    config.pop("num_features")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("task,classes", [("auto", 0), ("classify+embed", len(LABELS))])
def test_timm_folder_embeds_with_the_checkpoints_width(tmp_path, task, classes):
    """The embedding width comes from the checkpoint's weights (its head's input), not only from
    config.json's num_features, which may be absent."""
    import timm
    import torch
    from safetensors.torch import load_file

    folder = timm_tiny_folder(tmp_path / "timm", classes)
    model = models.resolve(str(folder))
    spec = models.task_spec(model, task)
    assert (spec.task, spec.pool, spec.dim) == ("classify+embed" if classes else "embed", "pooler", 48)
    if classes:  # a classifier's width from its head weight alone, whatever config.json says
        assert timm_models.folder_dims({"pretrained_cfg": {"classifier": "head"}},
                                       timm_models.safetensors_shapes(folder / "model.safetensors")) == (48, 48)

    pixels = np.random.default_rng(1).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "pixels": pixels,
             "error": np.array(["", "", ""], dtype=object), "meta": np.array(["", "", ""], dtype=object)}
    table = predict.Predictor(model, predict.PredictSpec("cpu", "fp32", top_k=2, batch_size=4, task=spec))(batch)
    ours = vectors(table)

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=48, depth=1, num_heads=2,
                            num_classes=classes).eval()
    net.load_state_dict(load_file(folder / "model.safetensors"))
    pre = model.preprocess
    x = (torch.from_numpy(pixels).float() * pre.rescale_factor - torch.tensor(pre.mean).view(1, 3, 1, 1)) \
        / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = net.forward_head(net.forward_features(x), pre_logits=True).numpy()
    assert ours.shape == (3, 48) and np.abs(ours - reference).max() < 1e-4
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 48)
    if classes:
        assert all(len(labels) == 2 for labels in table.column("labels").to_pylist())


@pytest.fixture(scope="module")
def plain_npz(tmp_path_factory) -> Path:
    """A random-init headless ViT (width 32, 2 blocks, MLP 64) in the vision_transformer layout."""
    import timm
    import torch

    torch.manual_seed(7)
    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **NPZ_ARCH).eval()
    return write_vit_npz(net, tmp_path_factory.mktemp("npz") / "ViT-plain.npz", head=False)


def npz_like(path: Path, dst: Path, **changes) -> Path:
    arrays = dict(np.load(path, allow_pickle=False))
    arrays.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        arrays.pop(k)
    np.savez(dst, **arrays)
    return dst


def test_npz_arrays_are_checked_against_the_architecture(plain_npz, tmp_path):
    """A random .npz, or one wrong-shaped array, is refused by `check` (before Ray), naming the
    array and both shapes."""
    assert models.check(str(plain_npz)).headless
    model = models.resolve(str(plain_npz))
    assert models.task_spec(model).dim == 32

    random = tmp_path / "random.npz"
    np.savez(random, **{"embedding/kernel": np.zeros((16, 16, 3, 32), np.float32),
                        "Transformer/posembed_input/pos_embedding": np.zeros((1, 197, 32), np.float32),
                        "foo": np.zeros(3, np.float32)})
    with pytest.raises(ModelError, match=r"not a vision_transformer ViT \.npz: missing array "
                                                r"'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"):
        models.check(str(random))

    mlp = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    wrong = npz_like(plain_npz, tmp_path / "wrong.npz", **{mlp: np.zeros((32, 99), np.float32)})
    with pytest.raises(ModelError, match=rf"array '{mlp}' has shape \(32, 99\), but the ViT its arrays imply "
                                                r"\(width 32, 2 blocks, 2 heads of 16, MLP 64, patch 16\) expects "
                                                r"\(32, 64\)"):
        models.check(str(wrong))
    gone = npz_like(plain_npz, tmp_path / "gone.npz", **{"Transformer/encoderblock_1/LayerNorm_2/bias": None})
    with pytest.raises(ModelError, match="missing array 'Transformer/encoderblock_1/LayerNorm_2/bias'"):
        models.check(str(gone))

    # model_arch: its shapes are timm's (patch and position embeddings resampled by timm's loader)
    with pytest.raises(ModelError, match=r"array 'embedding/kernel' has shape \(16, 16, 3, 32\), but "
                                                r"model_arch vit_tiny_patch16_224 .* expects \(\*, \*, 3, 192\)"):
        models.check(str(plain_npz), model_arch="vit_tiny_patch16_224")
    with pytest.raises(ModelError, match="did you mean 'vit_tiny_patch16_224'"):
        models.check(str(plain_npz), model_arch="vit_tiny_patch16_244")


def test_bad_timm_and_npz_checkpoints_fail_validate_with_exit_2(plain_npz, tmp_path, capsys):
    """No pretrained_cfg, an architecture timm does not know, a random .npz: each is a
    ModelError of `check`, exit 2 from `validate`, before Ray (not an actor dying after it)."""
    from batchscore import cli

    good = timm_tiny_folder(tmp_path / "good", 0)
    config = json.loads((good / "config.json").read_text())
    bad = {}
    for name, change in (("no-cfg", lambda c: c.pop("pretrained_cfg")),
                         ("typo", lambda c: c.update(architecture="vit_tiny_patch16_244"))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        edited = json.loads(json.dumps(config))
        change(edited)
        (folder / "config.json").write_text(json.dumps(edited))
        bad[name] = folder
    random = tmp_path / "random.npz"
    np.savez(random, **{"embedding/kernel": np.zeros((16, 16, 3, 32), np.float32), "foo": np.zeros(3)})
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(b"\x89PNG")

    expected = {bad["no-cfg"]: "has no 'pretrained_cfg' key",
                bad["typo"]: "'vit_tiny_patch16_244' in config.json in .* is not a model timm .* knows; did you mean "
                             "'vit_tiny_patch16_224'",
                random: r"not a vision_transformer ViT \.npz: missing array 'Transformer/encoderblock_0/"}
    for model, message in expected.items():
        with pytest.raises(ModelError, match=message):
            models.check(str(model))
        capsys.readouterr()
        code = cli.main(["validate", "--input", str(inputs), "--model", str(model), "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == cli.EXIT_BAD_JOB and "Traceback" not in err, err
        assert re.search(message, err), err
    capsys.readouterr()
    assert cli.main(["validate", "--input", str(inputs), "--model", str(good), "--output", str(tmp_path / "o")]) == 0


def test_inspect_text_of_an_embed_only_run_names_the_task():
    from batchscore.reporting import report

    found = {"run_id": "r", "output": "/o", "model": "m@sha256:0", "model_type": "vit", "rows": 2, "scored": 2,
             "errors": 0, "errors_by_code": {}, "images_per_second": 1.0, "total_seconds": 2.0, "files": 1,
             "started_at": "a", "finished_at": "b", "resumed": False, "top1_labels": {}, "distinct_top1_labels": 0,
             "mismatches": {}, "evaluation": None, "drift": None,
             "task": {"task": "embed", "pool": "cls", "normalize": False, "dtype": "float16", "dim": 768}}
    text = report.format_report(found)
    assert "task: embed (pool cls, dim 768, float16)" in text and "top-1 labels" not in text, text
    both = report.format_report({**found, "task": {**found["task"], "task": "classify+embed"},
                                 "top1_labels": {"cat": 2}, "distinct_top1_labels": 1})
    assert "task: classify+embed (pool cls" in both and "top-1 labels (1 distinct):" in both


# -- end to end: the embedding column in a committed output --------------------------------------

def test_embedding_column_reads_back_without_ray(ray_session, headless, photos, tmp_path):
    import duckdb
    import pandas as pd

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("astronaut.png", "camera.png", "chelsea.webp", "coffee.tif", "horse.png", "logo.png"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    result = pipeline.score(ScoreConfig(input=(str(folder),), output=str(out), model=str(headless), dtype="fp32",
                                        embed_normalize=True, max_error_fraction=0.5, progress_seconds=1000))
    assert result.rows == 7 and result.errors == 1
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["schema"] == output.SCHEMA_NAME_V2
    assert manifest["task"] == {"task": "embed", "pool": "pooler", "normalize": True, "dtype": "float32", "dim": 32}

    table = output.read_committed(str(out))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert "labels" not in table.column_names
    assert table.schema.metadata[b"batchscore.schema"] == b"batchscore.predictions.v2"
    parts = [pq.read_table(out / f["name"]) for f in manifest["files"]]
    assert all(p.schema.field("embedding").type == pa.list_(pa.float32(), 32) for p in parts)

    df = pd.read_parquet(out)
    assert len(df) == 7 and df[df.error.notna()].embedding.isna().all()
    good = df[df.error.isna()]
    matrix = np.stack(good.embedding)
    assert matrix.shape == (6, 32) and matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-5)

    # DuckDB (2.0) refuses list_* functions on a list column holding any null row, even filtered
    # out; a cast to its fixed-size ARRAY type works (README: "Embeddings").
    rows = duckdb.sql(f"""SELECT a.id, b.id, array_cosine_similarity(a.embedding::FLOAT[32], b.embedding::FLOAT[32])
                          FROM read_parquet('{out}/part-*.parquet') a, read_parquet('{out}/part-*.parquet') b
                          WHERE a.error IS NULL AND b.error IS NULL""").fetchall()
    assert len(rows) == 36
    ids = sorted(good.id)
    expected = matrix @ matrix.T
    got = {(a, b): cos for a, b, cos in rows}
    order = list(good.id)
    assert max(abs(got[a, b] - expected[order.index(a), order.index(b)]) for a in ids for b in ids) < 1e-5
    dim = duckdb.sql(f"SELECT DISTINCT len(embedding) FROM read_parquet('{out}/part-*.parquet') "
                     "WHERE embedding IS NOT NULL").fetchall()
    assert dim == [(32,)]

    # `batchscore inspect` on an embeddings output
    from batchscore.reporting import report

    text = report.format_report(report.inspect_output(str(out)))
    # an embed-only run says its task and has no empty "top-1 labels (0 distinct):" section
    assert "task: embed (pool pooler, dim 32, float32, L2-normalised)" in text and "top-1 labels" not in text, text


def test_demo_embeds_the_digits_with_nearest_neighbour_accuracy():
    """What `batchscore demo --task embed` reports, from the same decode and predict code
    (in process: the pipeline itself is run on Ray by the test above)."""
    import pandas as pd

    from batchscore import demo

    files = sorted(p for p in demo.SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    model = models.resolve(None)
    table = in_process(files, model, task="embed")
    frame = pd.DataFrame({"id": [f.name for f in files], "embedding": list(vectors(table))})
    correct, labelled = demo.nearest_neighbour_accuracy(frame)
    print(f"FIGURE demo --task embed: 1-nearest-neighbour accuracy {100 * correct / labelled:.1f}% "
          f"({correct}/{labelled} demo digits, cls embeddings of the demo classifier)")
    assert labelled == 360 and correct / labelled > 0.9
