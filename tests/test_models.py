"""Model resolution: local safetensors checkpoints only, metadata from the checkpoint's files."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from conftest import make_checkpoint

from batchscore.checkpoints import models
from batchscore.exceptions import ModelError


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("batchscore tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_hub_id_is_an_error_not_a_download(no_network):
    with pytest.raises(ModelError, match=r"does not exist or is not a directory \(looked for /.*/google/"
                                         r"vit-base-patch16-224\) \(batchscore never downloads"):
        models.resolve("google/vit-base-patch16-224")


def test_missing_directory_says_where(no_network, tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path / "nope")):
        models.resolve(str(tmp_path / "nope"))


def pickle_twin(src, dst, state=None):
    """The same checkpoint with its weights as pytorch_model.bin (or `state` pickled instead)."""
    import torch
    from safetensors.torch import load_file

    dst.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(src / name, dst / name)
    torch.save(load_file(src / "model.safetensors") if state is None else state, dst / "pytorch_model.bin")
    return dst


def test_pickle_only_checkpoint_is_refused_without_allow_pickle(tmp_path):
    ckpt = pickle_twin(make_checkpoint("vit", tmp_path / "m"), tmp_path / "pk")
    with pytest.raises(ModelError, match=r"only pickle weights found \(pytorch_model.bin\).*unless --allow-pickle"):
        models.resolve(str(ckpt))


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "last.ckpt"])
def test_bare_pickle_files_are_refused_with_a_hint(tmp_path, name):
    ckpt = pickle_twin(make_checkpoint("vit", tmp_path / "m"), tmp_path / "pk")
    (ckpt / "pytorch_model.bin").rename(ckpt / name)
    for allow in (False, True):
        with pytest.raises(ModelError, match=rf"no model.safetensors in .*found pickle file\(s\) \['{name}'\]"):
            models.resolve(str(ckpt), allow_pickle=allow)


def test_allowed_pickle_checkpoint_scores_like_its_safetensors_twin(tmp_path):
    import numpy as np

    from batchscore.inference.predict import Predictor, PredictSpec

    st = make_checkpoint("vit", tmp_path / "st")
    info = models.resolve(str(pickle_twin(st, tmp_path / "pk")), allow_pickle=True)
    assert info.weights_format == "pickle"
    batch = {"id": np.array(["a", "b"], dtype=object), "error": np.array(["", ""], dtype=object),
             "meta": np.array(["", ""], dtype=object),
             "pixels": np.random.default_rng(0).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)}
    ours = Predictor(info, PredictSpec("cpu", "fp32", top_k=0))(batch).to_pylist()
    twin = Predictor(models.resolve(str(st)), PredictSpec("cpu", "fp32", top_k=0))(batch).to_pylist()
    assert [r["labels"] for r in ours] == [r["labels"] for r in twin]
    assert np.allclose([r["probs"] for r in ours], [r["probs"] for r in twin], atol=1e-6)


class _Evil:
    """Unpickling this would create a file: what a booby-trapped checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_booby_trapped_pickle_is_not_executed_even_when_allowed(tmp_path):
    from batchscore.inference.predict import Predictor, PredictSpec

    marker = tmp_path / "pwned"
    ckpt = pickle_twin(make_checkpoint("vit", tmp_path / "m"), tmp_path / "pk", state={"w": _Evil(str(marker))})
    info = models.resolve(str(ckpt), allow_pickle=True)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|not an allowed global|Unsupported global"):
        Predictor(info, PredictSpec("cpu", "fp32", top_k=1))
    assert not marker.exists()


def test_headless_checkpoint_embeds_and_is_refused_classification(tmp_path):
    """A headless `ViTModel` is scored with task embed (auto); classification is a bad job."""

    ckpt = make_checkpoint("vit", tmp_path / "m")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["ViTModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    checked = models.check(str(ckpt))
    assert checked.headless and checked.labels == ()
    assert models.task_for("auto", checked) == "embed"
    with pytest.raises(ModelError, match=r"task classify needs a classification head.*use task embed"):
        models.task_for("classify", checked)
    info = models.resolve(str(ckpt))
    assert models.task_spec(info).pool == "cls"  # no pooler weights in a classifier's file
    with pytest.raises(ModelError, match="no trained pooler"):
        models.task_spec(info, embed_pool="pooler")
    config["architectures"] = ["ViTForMaskedImageModeling"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"image-classification head.*\['ViTForMaskedImageModeling'\]"):
        models.resolve(str(ckpt))


def test_missing_preprocessor_config(tmp_path):
    ckpt = make_checkpoint("vit", tmp_path / "m")
    (ckpt / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="preprocessor_config.json is missing"):
        models.resolve(str(ckpt))


def test_unimplemented_preprocessing_is_refused(tmp_path):
    ckpt = make_checkpoint("vit", tmp_path / "m")
    pp = json.loads((ckpt / "preprocessor_config.json").read_text())
    (ckpt / "preprocessor_config.json").write_text(json.dumps({**pp, "crop_pct": 0.875}))
    with pytest.raises(ModelError, match="crop_pct is not implemented"):
        models.resolve(str(ckpt))


@pytest.mark.parametrize("kind, size, crop, interpolation, mean", [
    ("vit", (224, 224), None, "bilinear", (0.5, 0.5, 0.5)),
    ("deit", (256, 256), (224, 224), "bicubic", (0.485, 0.456, 0.406)),
    ("beit", (224, 224), None, "bilinear", (0.5, 0.5, 0.5)),
])
def test_preprocessing_and_labels_come_from_the_checkpoint(tmp_path, kind, size, crop, interpolation, mean):
    info = models.resolve(str(make_checkpoint(kind, tmp_path / kind)))
    p = info.preprocess
    assert (p.size, p.crop, p.interpolation, p.mean) == (size, crop, interpolation, mean)
    assert p.output_hw == (224, 224)
    assert info.labels[:2] == ("can", "carton") and info.model_type == kind
    assert info.tag.startswith(f"{kind}@sha256:") and len(info.weights_sha256) == 64


def test_demo_checkpoint():
    info = models.resolve(None)
    assert info.labels == tuple(str(i) for i in range(10))
    assert info.preprocess.output_hw == (32, 32)
    assert info.tag.startswith("batchscore-demo-digits@sha256:")


def test_weights_hash_tracks_the_weights(tmp_path):
    a = make_checkpoint("vit", tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert models.resolve(str(a)).weights_sha256 == models.resolve(str(b)).weights_sha256
    with open(b / "model.safetensors", "ab") as f:
        f.write(b" ")
    assert models.resolve(str(a)).weights_sha256 != models.resolve(str(b)).weights_sha256


def test_weights_of_another_model_are_refused_before_ray(tmp_path):
    """config.json and model.safetensors must be of one model: a classifier's config over a
    headless model's weights, or a DeiT config over ViT weights, is a ModelError from `check`
    (before Ray), not random layers refused by the model actor tens of seconds later."""
    import transformers as tf

    vit = make_checkpoint("vit", tmp_path / "vit")
    headless = tmp_path / "headless-weights"
    shutil.copytree(vit, headless)
    base = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, image_size=224, patch_size=16), add_pooling_layer=False)
    base.save_pretrained(tmp_path / "base")
    shutil.copy(tmp_path / "base" / "model.safetensors", headless / "model.safetensors")
    with pytest.raises(ModelError, match="holds no classifier tensor .e.g. classifier.weight.: a headless model's"):
        models.check(str(headless))
    with pytest.raises(ModelError, match="holds no classifier tensor"):
        models.resolve(str(headless))

    wrong_type = tmp_path / "deit-config"
    shutil.copytree(vit, wrong_type)
    config = json.loads((wrong_type / "config.json").read_text())
    (wrong_type / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ModelError, match="model_type 'deit', but the tensors in .* are named for 'vit'"):
        models.check(str(wrong_type))
    assert models.check(str(vit)).has_head  # the matching pair passes

    relabelled = tmp_path / "relabelled"  # id2label edited: 5 names for a head of 7 rows
    shutil.copytree(vit, relabelled)
    (relabelled / "config.json").write_text(json.dumps({**config, "id2label": {str(i): f"c{i}" for i in range(5)},
                                                        "label2id": {f"c{i}": i for i in range(5)}}))
    with pytest.raises(ModelError, match="id2label names 5 classes, but classifier.weight in .* has 7 rows"):
        models.check(str(relabelled))


@pytest.mark.parametrize("content, says", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 343000000\n", "git lfs pull"),
    (b"", "0 bytes, fewer than a safetensors header's 8"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ", "declares a header of 16 bytes in a file of 14"),
])
def test_a_file_that_is_not_safetensors_is_a_model_error(tmp_path, content, says):
    """A git-lfs pointer (a Hub repo cloned without git lfs), an empty or a cut file: exit 2
    from `check` with what the file is, not a MemoryError or JSONDecodeError (exit 4)."""
    ckpt = make_checkpoint("vit", tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(content)
    with pytest.raises(ModelError, match=f"model.safetensors: not a safetensors file.*{says}"):
        models.check(str(ckpt))
