"""batchscore against transformers itself: same photos, same checkpoint, same probabilities.

For ViT, DeiT and BEiT checkpoints (random init, real preprocessing configs), every
probability batchscore writes must be within 1e-3 of `transformers.pipeline(
"image-classification")` in fp32, and within 2e-2 of the pipeline run in the same dtype for
bf16 and fp16 (fp16 runs on the CPU here, slowly, so its code path is exercised). The gap to
fp32 is printed too. fp32 for every model and bf16 for ViT run the whole pipeline on Ray;
the other dtypes run the same decode and predict code in this process (the dtype only
changes the predictor, and each pipeline run costs ~8 s of fixed start-up here). The
checkpoints are sharpened so their outputs depend strongly on the pixels, and a negative
control shows that a wrong preprocessing step breaks the 1e-3 bound, so passing means the
preprocessing really matches.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from batchscore import ScoreConfig, pipeline
from batchscore.checkpoints import models
from batchscore.decoding import decode
from batchscore.inference import predict

TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}


class References(dict):
    """transformers' own pipeline, computed once per (kind, dtype): {file name: {label: prob}}."""

    def __init__(self, checkpoints, photos):
        super().__init__()
        self.checkpoints, self.photos = checkpoints, photos

    def __missing__(self, key):
        import torch
        import transformers

        kind, dtype = key
        files = sorted(self.photos.iterdir())
        pipe = transformers.pipeline("image-classification", model=str(self.checkpoints[kind]), device="cpu",
                                     dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
        results = pipe([str(f) for f in files], top_k=len(pipe.model.config.id2label), batch_size=4)
        self[key] = {f.name: {r["label"]: r["score"] for r in res} for f, res in zip(files, results)}
        return self[key]


@pytest.fixture(scope="module")
def references(checkpoints, photos):
    return References(checkpoints, photos)


def scored(tmp_path, photos, checkpoint, dtype, **overrides):
    config = ScoreConfig(input=(str(photos),), output=str(tmp_path / f"out-{dtype}"), model=str(checkpoint),
                         dtype=dtype, top_k=0, batch_size=4, progress_seconds=1000)
    result = pipeline.score(dataclasses.replace(config, **overrides))
    frame = result.to_pandas()
    assert frame["error"].isna().all(), frame[frame["error"].notna()][["id", "error"]]
    return {i.rsplit("/", 1)[-1]: dict(zip(labels, probs)) for i, labels, probs in
            zip(frame["id"], frame["labels"], frame["probs"])}


def scored_in_process(photos, checkpoint, dtype):
    """The pipeline's decode and predict functions, called here without Ray."""
    model = models.resolve(str(checkpoint))
    files = sorted(photos.iterdir())
    n = len(files)
    batch = {"id": np.array([f.name for f in files], dtype=object),
             "data": np.array([f.read_bytes() for f in files], dtype=object),
             "error": np.array([""] * n, dtype=object), "meta": np.array([""] * n, dtype=object)}
    batch = decode.decode_batch(batch, spec=model.preprocess, max_image_pixels=ScoreConfig().max_image_pixels)
    rows = predict.Predictor(model, predict.PredictSpec("cpu", dtype, top_k=0, batch_size=4))(batch).to_pylist()
    assert all(r["error"] is None for r in rows), [(r["id"], r["error"]) for r in rows if r["error"]]
    return {r["id"]: dict(zip(r["labels"], r["probs"])) for r in rows}


def max_abs_diff(ours, ref) -> float:
    assert ours.keys() == ref.keys()
    return max(abs(ours[f][label] - ref[f][label]) for f in ref for label in ref[f])


def test_reference_is_discriminative(references):
    """Guard: the sharpened checkpoints give clearly different outputs per photo."""
    for kind in ("vit", "deit", "beit"):
        ref = references[kind, "fp32"]
        tops = [max(p.values()) for p in ref.values()]
        argmaxes = {max(p, key=p.get) for p in ref.values()}
        assert max(tops) > 0.5 and len(argmaxes) >= 2, (kind, tops, argmaxes)


END_TO_END = {("vit", "fp32"), ("deit", "fp32"), ("beit", "fp32"), ("vit", "bf16")}


@pytest.mark.parametrize("kind", ["vit", "deit", "beit"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_matches_transformers_pipeline(request, tmp_path, photos, checkpoints, references, kind, dtype):
    end_to_end = (kind, dtype) in END_TO_END
    if end_to_end:
        request.getfixturevalue("ray_session")
        ours = scored(tmp_path, photos, checkpoints[kind], dtype)
    else:
        ours = scored_in_process(photos, checkpoints[kind], dtype)
    diff = max_abs_diff(ours, references[kind, dtype])
    to_fp32 = max_abs_diff(ours, references[kind, "fp32"])
    where = "pipeline" if end_to_end else "in process"
    print(f"FIGURE {kind} {dtype} ({where}): max |p - p_transformers({dtype})| = {diff:.2e} over {len(ours)} photos "
          f"(vs transformers fp32: {to_fp32:.2e})")
    assert diff <= TOLERANCE[dtype]


def test_wrong_preprocessing_is_caught(ray_session, tmp_path, photos, checkpoints, references, monkeypatch):
    """Negative control: DeiT without its centre crop (plain resize to 224) breaks the 1e-3 bound."""
    real = models.preprocess_spec

    def no_crop(path):
        return dataclasses.replace(real(path), size=(224, 224), crop=None)

    monkeypatch.setattr(models, "preprocess_spec", no_crop)
    ours = scored(tmp_path, photos, checkpoints["deit"], "fp32")
    diff = max_abs_diff(ours, references["deit", "fp32"])
    print(f"FIGURE deit without its centre crop: max diff {diff:.2e}")
    assert diff > 1e-2


def test_probabilities_are_sorted_top_k(ray_session, tmp_path, photos, checkpoints):
    frame = pipeline.score(ScoreConfig(input=(str(photos),), output=str(tmp_path / "top3"),
                                       model=str(checkpoints["vit"]), dtype="fp32", top_k=3)).to_pandas()
    for labels, probs in zip(frame["labels"], frame["probs"]):
        assert len(labels) == len(probs) == 3
        assert np.all(np.diff(probs) <= 0), probs
