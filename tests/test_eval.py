"""Evaluation against known labels equals scikit-learn's metrics on the same predictions (1e-9):
from per-part statistics merged on the driver, for a labelled folder-per-class set and a
manifest with a label column scored end to end, and for multi-label rows. Unknown ground-truth
labels are counted and named."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pyarrow as pa
import pytest
from sklearn import metrics

import batchscore
from batchscore.demo import SAMPLES
from batchscore.outputs.output import read_committed
from batchscore.reporting import evaluation

TOL = 1e-9


def _ece(conf, correct, bins=15):
    """The textbook ECE (Guo et al.), computed row by row: the reference."""
    conf, correct = np.asarray(conf), np.asarray(correct, dtype=float)
    total, n = 0.0, len(conf)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (conf > lo) & (conf <= hi) if b else (conf >= 0) & (conf <= hi)
        if m.any():
            total += m.sum() / n * abs(correct[m].mean() - conf[m].mean())
    return total


def check_single_label(ev: dict, truth: list[str], labels_written: list[list[str]], probs: list[list[float]],
                       classes: tuple[str, ...]):
    """`ev` (a manifest's evaluation) against sklearn on the rows whose truth is a known class."""
    keep = [i for i, t in enumerate(truth) if t in classes]
    y_true = [truth[i] for i in keep]
    y_pred = [labels_written[i][0] for i in keep]
    assert ev["rows"] == len(keep)
    assert abs(ev["accuracy"] - metrics.accuracy_score(y_true, y_pred)) < TOL
    present = sorted(set(y_true) | set(y_pred), key=classes.index)
    p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    for i, c in enumerate(present):
        got = ev["per_class"][c]
        assert abs(got["precision"] - p[i]) < TOL and abs(got["recall"] - r[i]) < TOL
        assert abs(got["f1"] - f[i]) < TOL and got["support"] == s[i], c
    for avg in ("macro", "weighted"):
        P, R, F, _ = metrics.precision_recall_fscore_support(y_true, y_pred, labels=present, average=avg,
                                                             zero_division=0)
        assert abs(ev[avg]["precision"] - P) < TOL and abs(ev[avg]["recall"] - R) < TOL
        assert abs(ev[avg]["f1"] - F) < TOL, avg
    cm = metrics.confusion_matrix(y_true, y_pred, labels=present)
    ours = np.zeros_like(cm)
    for t, pr, n in ev["confusion"]["counts"]:
        ours[present.index(t), present.index(pr)] = n
    assert ev["confusion"]["labels"] == present and (ours == cm).all()
    if len(labels_written[0]) == len(classes):  # every class written: sklearn's top-k from full scores
        score = np.zeros((len(keep), len(classes)))
        for row, i in enumerate(keep):
            for lb, pr in zip(labels_written[i], probs[i]):
                score[row, classes.index(lb)] = pr
        want = metrics.top_k_accuracy_score(y_true, score, k=5, labels=list(classes))
        assert abs(ev["top5_accuracy"] - want) < TOL
    conf = [probs[i][0] for i in keep]
    assert abs(ev["ece"] - _ece(conf, [a == b for a, b in zip(y_true, y_pred)])) < TOL


def _parts(table: pa.Table, spec, sizes):
    start, parts = 0, []
    for n in sizes:
        part = table.slice(start, n)
        parts.append({"rows": n, **evaluation.part_statistics(part, spec)})
        start += n
    return parts


def test_single_label_statistics_equal_sklearn():
    rng = np.random.default_rng(0)
    classes = tuple(f"c{i}" for i in range(6))
    n = 400
    logits = rng.normal(size=(n, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    order = np.argsort(-probs, 1)
    truth = [classes[min(5, max(0, int(o[0]) + int(rng.integers(-1, 2))))] for o in order]
    truth[::37] = ["mystery"] * len(truth[::37])  # not in the checkpoint: counted, named, left out
    truth[5] = None  # unlabelled
    labels = [[classes[j] for j in o[:5]] for o in order]  # top-5 written
    scores = [[float(np.float32(probs[i, j])) for j in o[:5]] for i, o in enumerate(order)]
    errors = [None] * n
    errors[7] = "decode.truncated: x"
    table = pa.table({"id": [f"img{i}" for i in range(n)], "labels": [None if e else lb for e, lb in zip(errors, labels)],
                      "probs": pa.array([None if e else s for e, s in zip(errors, scores)], pa.list_(pa.float32())),
                      "error": errors, "gt": truth})
    spec = evaluation.EvalSpec("column", False, frozenset(classes), column="gt")
    merged = evaluation.merge(_parts(table, spec, [150, 150, 100]))
    ev = evaluation.summarize(merged, classes, top_k=5)
    ok = [i for i in range(n) if errors[i] is None]
    check_single_label(ev, [truth[i] for i in ok], [labels[i] for i in ok], [scores[i] for i in ok], classes)
    unknown = len([t for i, t in enumerate(truth) if t == "mystery" and errors[i] is None])
    assert ev["unknown"] == {"rows": unknown, "labels": {"mystery": unknown}}
    assert ev["unlabelled"] == 1 and ev["error_rows"] == 1
    # top-5 by hand (5 labels per row written, 6 classes)
    keep = [i for i in ok if truth[i] in classes]
    assert ev["top5_accuracy"] == pytest.approx(np.mean([truth[i] in labels[i] for i in keep]), abs=TOL)


def test_multi_label_statistics_equal_sklearn():
    rng = np.random.default_rng(1)
    classes = ("can", "carton", "milk_bottle", "water_bottle")
    n = 300
    truth = rng.random((n, 4)) < [0.5, 0.3, 0.2, 0.05]
    scores = np.clip(truth * 0.35 + rng.random((n, 4)) * 0.65, 0, 1).astype(np.float32)
    scores = np.round(scores, 6).astype(np.float32)  # the statistics' score resolution
    thresholds = np.array([0.5, 0.6, 0.4, 0.5], np.float32)
    kept = scores >= thresholds
    written_labels, written_probs = [], []
    for i in range(n):
        idx = [j for j in np.argsort(-scores[i]) if kept[i, j]]
        written_labels.append([classes[j] for j in idx])
        written_probs.append([float(scores[i, j]) for j in idx])
    text = [",".join(c for c, t in zip(classes, row) if t) for row in truth]
    text[3] = "can, fork"  # one unknown label among known ones
    text[4] = None  # unlabelled ("" would be a row with no labels)
    table = pa.table({"id": [f"i{i}" for i in range(n)], "labels": written_labels,
                      "probs": pa.array(written_probs, pa.list_(pa.float32())), "error": [None] * n, "gt": text})
    spec = evaluation.EvalSpec("column", True, frozenset(classes), column="gt")
    ev = evaluation.summarize(evaluation.merge(_parts(table, spec, [100, 120, 80])), classes, top_k=0)
    rows = [i for i in range(n) if i != 4]
    y = np.array([[c in [t.strip() for t in text[i].split(",")] for c in classes] for i in rows])
    pred = np.array([[c in written_labels[i] for c in classes] for i in rows])
    s = np.array([[dict(zip(written_labels[i], written_probs[i])).get(c, 0.0) for c in classes] for i in rows])
    p, r, f, sup = metrics.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for j, c in enumerate(classes):
        got = ev["per_label"][c]
        assert abs(got["precision"] - p[j]) < TOL and abs(got["recall"] - r[j]) < TOL
        assert abs(got["f1"] - f[j]) < TOL and got["support"] == sup[j]
        assert abs(got["average_precision"] - metrics.average_precision_score(y[:, j], s[:, j])) < TOL, c
    P, R, F, _ = metrics.precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    assert abs(ev["micro"]["f1"] - F) < TOL and abs(ev["micro"]["precision"] - P) < TOL
    want_map = np.mean([metrics.average_precision_score(y[:, j], s[:, j]) for j in range(4) if y[:, j].any()])
    assert abs(ev["mean_average_precision"] - want_map) < TOL
    assert ev["unknown"]["labels"] == {"fork": 1} and ev["unlabelled"] == 1
    print(f"FIGURE multi-label mAP {ev['mean_average_precision']:.4f} (sklearn {want_map:.4f})")


def _digits() -> dict[str, str]:
    with open(SAMPLES / "labels.csv", newline="") as f:
        return {r["file"]: r["label"] for r in csv.DictReader(f)}


def test_labelled_folder_and_manifest_runs_equal_sklearn(ray_session, tmp_path):
    """End to end with the demo checkpoint: an ImageFolder tree of digits (one folder a
    class, plus a class the checkpoint lacks) and a manifest with a label column."""
    truth = dict(list(_digits().items())[:30])
    tree = tmp_path / "tree"
    for name, label in truth.items():
        (tree / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / name, tree / label / name)
    (tree / "eleven").mkdir()
    for name in list(truth)[:2]:
        shutil.copy(SAMPLES / name, tree / "eleven" / f"x-{name}")
    result = batchscore.score(input=[str(tree)], output=str(tmp_path / "out-tree"), label_source="folder", top_k=0)
    ev = result.evaluation
    rows = read_committed(str(tmp_path / "out-tree")).to_pylist()
    classes = tuple(str(i) for i in range(10))
    check_single_label(ev, [r["id"].rsplit("/", 2)[-2] for r in rows], [r["labels"] for r in rows],
                       [r["probs"] for r in rows], classes)
    assert ev["unknown"] == {"rows": 2, "labels": {"eleven": 2}}
    assert "2 row(s) with labels the checkpoint lacks (eleven)" in result.summary()
    print(f"FIGURE folder run: accuracy {ev['accuracy']:.3f}, top-5 {ev['top5_accuracy']:.3f}, ECE {ev['ece']:.4f}")

    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "digit"])
        for name, label in truth.items():
            w.writerow([str(SAMPLES / name), label])
    result = batchscore.score(input=[str(manifest)], output=str(tmp_path / "out-manifest"), label_column="digit",
                              top_k=3)
    rows = read_committed(str(tmp_path / "out-manifest")).to_pylist()
    assert [r["digit"] for r in rows] == [truth[r["id"].rsplit("/", 1)[-1]] for r in rows]  # carried through
    check_single_label(result.evaluation, [r["digit"] for r in rows], [r["labels"] for r in rows],
                       [r["probs"] for r in rows], classes)
    assert result.evaluation["top5_accuracy"] is None and "needs 5" in result.evaluation["top5_note"]
