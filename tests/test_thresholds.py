"""Multi-label thresholds: per-label thresholds, rows with no label, single-logit heads as
transformers' pipeline scores them, and the thresholds in the resume fingerprint."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from batchscore import plan
from batchscore.checkpoints import models
from batchscore.config import ScoreConfig
from batchscore.demo import SAMPLES
from batchscore.exceptions import ConfigError
from batchscore.inference import postprocess, predict
from batchscore.inference.postprocess import Postprocessor, Thresholds


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_per_label_thresholds_by_hand():
    labels = ("a", "b", "c", "d")
    post = Postprocessor(labels, top_k=3, multi_label=True, thresholds=Thresholds(0.5, {"b": 0.9, "c": 0.2}))
    scores = [[0.8, 0.85, 0.3, 0.6],   # b under its 0.9; c over its 0.2 → a, d, c
              [0.4, 0.89, 0.1, 0.2],   # nothing at or above its threshold → no label (not an error)
              [0.95, 0.99, 0.9, 0.7]]  # all four pass; top_k caps at 3 → b, a, c
    logits = torch.tensor([[_logit(p) for p in row] for row in scores])
    idx, probs = post(logits)
    table = post.table(np.array(["r0", "r1", "bad", "r2"], dtype=object), ["", "", "decode.empty: empty", ""],
                       idx, probs, np.array(["{}"] * 4, dtype=object)).to_pylist()
    assert [r["labels"] for r in table] == [["a", "d", "c"], [], None, ["b", "a", "c"]]
    assert [r["error"] for r in table] == [None, None, "decode.empty: empty", None]
    assert np.allclose(table[0]["probs"], [0.8, 0.6, 0.3], atol=1e-6)
    assert table[1]["probs"] == [] and table[2]["probs"] is None
    assert np.allclose(table[3]["probs"], [0.99, 0.95, 0.9], atol=1e-6)
    # A threshold is inclusive: a score exactly at it is kept.
    exact = Postprocessor(("x",), 0, True, Thresholds(0.5))(torch.tensor([[0.0]]))
    assert exact[0].tolist() == [[0]] and exact[1].tolist() == [[0.5]]


def test_thresholds_file_json_and_yaml(tmp_path):
    labels = ("can", "carton", "milk_bottle")
    (tmp_path / "t.json").write_text(json.dumps({"can": 0.3, "carton": 0.7}))
    (tmp_path / "t.yaml").write_text("can: 0.3\ncarton: 0.7\n")
    a = postprocess.load_thresholds(0.5, str(tmp_path / "t.json"), labels, True)
    b = postprocess.load_thresholds(0.5, str(tmp_path / "t.yaml"), labels, True)
    assert a.per_label == b.per_label == {"can": 0.3, "carton": 0.7}
    assert a.vector(labels).tolist() == pytest.approx([0.3, 0.7, 0.5])
    assert a.sha256 and a.sha256 != b.sha256
    (tmp_path / "bad.yaml").write_text("can: 0.3\nmilk: 0.4\njar: 0.2\n")
    with pytest.raises(ConfigError, match=r"2 label\(s\) the checkpoint does not have: 'jar', 'milk'"):
        postprocess.load_thresholds(0.5, str(tmp_path / "bad.yaml"), labels, True)
    (tmp_path / "range.yaml").write_text("can: 1.5\n")
    with pytest.raises(ConfigError, match="from 0 to 1, got can: 1.5"):
        postprocess.load_thresholds(0.5, str(tmp_path / "range.yaml"), labels, True)
    with pytest.raises(ConfigError, match="single-label"):
        postprocess.load_thresholds(0.5, str(tmp_path / "t.json"), labels, False)
    with pytest.raises(ConfigError, match="threshold: expected a number from 0 to 1"):
        ScoreConfig(threshold=2.0)


def test_thresholds_are_in_the_resume_fingerprint(tmp_path, multi_label_checkpoint):
    """The plan's fingerprint holds the default threshold and the sha256 of the file's contents,
    as read once by the plan."""
    t = tmp_path / "t.yaml"
    t.write_text("can: 0.3\n")
    base = ScoreConfig(input=(str(SAMPLES / "digit-0000.png"),), output="o", model=str(multi_label_checkpoint))
    fp = plan.prepare(base).fingerprint("w")
    assert fp["threshold"] == 0.5 and fp["thresholds_sha256"] is None
    assert plan.prepare(base.with_overrides(threshold=0.6)).fingerprint("w") != fp
    with_file = plan.prepare(base.with_overrides(thresholds=str(t))).fingerprint("w")
    assert with_file["thresholds_sha256"] == hashlib.sha256(t.read_bytes()).hexdigest()
    t.write_text("can: 0.4\n")
    assert plan.prepare(base.with_overrides(thresholds=str(t))).fingerprint("w") != with_file  # the contents count


@pytest.fixture(scope="module")
def multi_label_checkpoint(tmp_path_factory, photos):
    from conftest import make_checkpoint

    path = make_checkpoint("vit", tmp_path_factory.mktemp("ml") / "ckpt", num_labels=4,
                           calibrate_on=sorted(photos.iterdir()))
    config = json.loads((path / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_multi_label_checkpoint_by_hand(multi_label_checkpoint):
    """The actor's rows equal thresholding transformers' own sigmoid scores by hand; thresholds
    are chosen so that one image has no label at all."""
    from transformers import AutoModelForImageClassification

    info = models.resolve(str(multi_label_checkpoint))
    assert info.multi_label
    pixels = np.random.default_rng(1).integers(0, 256, (6, 3, 224, 224), dtype=np.uint8)
    net = AutoModelForImageClassification.from_pretrained(str(multi_label_checkpoint)).eval()
    x = (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.5  # the checkpoint's rescale and normalisation
    with torch.no_grad():
        scores = torch.sigmoid(net(pixel_values=x).logits).numpy()
    labels = info.labels
    # Image 0 gets no label: every threshold just above its score (and clear of every other score).
    per_label = {}
    for c, label in enumerate(labels):
        t = float(scores[0, c]) + 1e-3
        assert not np.any(np.abs(scores[:, c] - t) < 5e-4)
        per_label[label] = min(t, 1.0)
    thresholds = Thresholds(0.5, per_label)
    p = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=2, thresholds=thresholds))
    rows = p({"id": np.array([str(i) for i in range(6)], dtype=object), "pixels": pixels,
              "error": np.array([""] * 6, dtype=object), "meta": np.array(["{}"] * 6, dtype=object)}).to_pylist()
    for i, row in enumerate(rows):
        kept = sorted(((scores[i, c], labels[c]) for c in range(4) if scores[i, c] >= per_label[labels[c]]),
                      reverse=True)[:2]
        assert row["labels"] == [lb for _, lb in kept], i
        assert np.allclose(row["probs"], [s for s, _ in kept], atol=1e-5)
    assert rows[0]["labels"] == [] and any(r["labels"] for r in rows)
    print(f"FIGURE multi-label rows by label count: {[len(r['labels']) for r in rows]}")


def test_single_logit_head_is_a_sigmoid_like_transformers_pipeline(tmp_path, photos):
    """A one-logit head: transformers' pipeline applies a sigmoid; so do we (threshold 0 keeps
    the label on every row, as the pipeline reports it)."""
    import transformers
    from conftest import make_checkpoint
    from PIL import Image

    from batchscore.decoding import decode

    path = make_checkpoint("vit", tmp_path / "one", num_labels=1, calibrate_on=sorted(photos.iterdir()))
    info = models.resolve(str(path))
    files = sorted(p for p in photos.iterdir() if p.suffix in (".png", ".jpg"))[:5]
    batch = {"id": np.array([str(f) for f in files], dtype=object),
             "data": np.array([f.read_bytes() for f in files], dtype=object),
             "error": np.array([""] * len(files), dtype=object), "meta": np.array(["{}"] * len(files), dtype=object)}
    decoded = decode.decode_batch(batch, spec=info.preprocess, max_image_pixels=10**9)
    p = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=5, thresholds=Thresholds(0.0)))
    ours = p(decoded).to_pylist()
    pipe = transformers.pipeline("image-classification", model=str(path), device="cpu")
    theirs = [pipe(Image.open(f))[0] for f in files]
    got = [r["probs"][0] for r in ours]
    want = [t["score"] for t in theirs]
    assert [r["labels"] for r in ours] == [[t["label"]] for t in theirs]
    print(f"FIGURE single-logit max |p - p_transformers| = {max(abs(a - b) for a, b in zip(got, want)):.2e}")
    assert np.allclose(got, want, atol=1e-3)
    assert len(set(np.round(want, 3))) > 1  # the scores depend on the image
    # At the default 0.5, rows below it hold no label.
    half = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=5, thresholds=Thresholds(0.5)))(decoded).to_pylist()
    assert [bool(r["labels"]) for r in half] == [s >= 0.5 for s in want]


def test_validate_runs_the_thresholds_and_label_source_checks(tmp_path, capsys):
    """`batchscore validate` (no Ray) fails, exit 2, on what `score` rejects before Ray: a
    thresholds file with an unknown label or a value of 1.5, per-label thresholds for a
    single-label checkpoint, a labels file that does not exist, a baseline without a
    committed run; and says what it checked when they are fine."""
    import shutil

    from batchscore import cli
    from batchscore.demo import CHECKPOINT, SAMPLES

    multi = tmp_path / "multi"
    shutil.copytree(CHECKPOINT, multi)  # the demo's files, read as a multi-label head
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    (tmp_path / "unknown.yaml").write_text("'3': 0.4\nnine: 0.2\n")
    (tmp_path / "range.yaml").write_text("'3': 1.5\n")
    (tmp_path / "good.yaml").write_text("'3': 0.4\n")
    base = ["validate", "--input", str(SAMPLES), "--output", str(tmp_path / "out")]

    def validate(*extra):
        capsys.readouterr()
        code = cli.main(base + list(extra))
        return code, capsys.readouterr().err

    for extra, says in (
            (["--model", str(multi), "--thresholds", str(tmp_path / "unknown.yaml")], "'nine'"),
            (["--model", str(multi), "--thresholds", str(tmp_path / "range.yaml")], "from 0 to 1, got 3: 1.5"),
            (["--thresholds", str(tmp_path / "good.yaml")], "single-label"),  # the demo checkpoint: softmax
            (["--label-source", str(tmp_path / "missing.csv")], "cannot read labels file"),
            (["--baseline", str(tmp_path / "no-run")], "no committed run")):
        code, err = validate(*extra)
        assert code == cli.EXIT_BAD_JOB, (extra, err)
        assert "FAILED" in err and says in err, (extra, err)
    code, err = validate("--model", str(multi), "--thresholds", str(tmp_path / "good.yaml"),
                         "--label-source", str(SAMPLES / "labels.csv"))
    assert code == 0, err
    assert "validate: thresholds: default 0.5, 1 per-label from" in err
    assert "validate: label source: " in err and "labelled id(s), multi-label evaluation" in err
