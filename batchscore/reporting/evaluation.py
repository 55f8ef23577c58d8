"""Evaluation: a run's predictions against known labels, from per-part sufficient statistics.

Where ground truth comes from (`label_source`):

    folder    the ImageFolder layout: each image's parent folder is its class
              (`fridgeObjects/can/1.jpg` → `can`)
    column    `label_column` of a manifest or Parquet input, or a tar sample's member of that
              extension (`.cls`, `.txt`); carried to the write stage as a passthrough column
    a file    CSV, JSONL or JSON of `file` (or `id`) and `label_column` (default `label`):
              rows matched by id, else by file name (the demo's samples/labels.csv)

A multi-label row's labels are separated by commas, or written as a JSON list; an empty value
is a row with no labels, a missing one (null, no entry) a row without ground truth.

Why statistics per part, not a pass over the rows: the driver never holds per-image rows
(docs/architecture.md). Each write task computes, for the rows it writes, the counts every
figure is made of, and puts them in its part's statistics (and so in the part's footer, which
`--resume` reads back): for single-label checkpoints the sparse confusion counts, top-5 hits
and calibration bins of the top-1 probability; for multi-label ones the true/false
positives and false negatives per label and, per label, how many positive and negative rows
got each written score (rounded to 1e-6, so the table is bounded). The driver adds them up
(`merge`) and derives the figures (`summarize`): they equal scikit-learn's metrics on the same
predictions, computed from the same counts rather than from the rows. Alongside, every part
counts its top-1 labels and probabilities (`scores`), which the report and drift use.

Rows whose ground-truth label is not one of the checkpoint's labels are counted by label
(`unknown`) and left out of the figures (the model cannot predict them, so counting them
wrong would measure the label set, not the model); rows without ground truth (`unlabelled`)
and error rows (`error_rows`) are counted too. Nothing is dropped without a count.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.exceptions import ConfigError
from batchscore.inference.postprocess import sigmoid_head
from batchscore.inputs import fs as fsutil

ECE_BINS = 15  # equal-width bins of the top-1 probability (Guo et al. 2017)
CONFIDENCE_BINS = 20  # histogram of the top-1 probability in the report
AP_DECIMALS = 6  # score resolution of the average-precision tables
UNKNOWN_NAMES = 100  # distinct unknown labels named per part (the rest counted together)
OTHER = "(other unknown labels)"


@dataclass(frozen=True)
class EvalSpec:
    """What the write stage needs to evaluate its rows: where the truth is and the head's kind."""

    source: str  # folder | column | file
    multi_label: bool
    labels: frozenset[str] = frozenset()  # the checkpoint's labels: others are counted as unknown
    column: str | None = None  # source column: the output column holding the truth
    mapping: dict[str, str] = field(default_factory=dict, hash=False)  # source file: id or file name → label
    labels_file: str | None = None


def spec_for(source: str | None, column: str | None, labels: tuple[str, ...], multi_label: bool) -> EvalSpec | None:
    """The run's `EvalSpec` from its `label_source` and `label_column` (as in `ScoreConfig`),
    or None without a source.

    Raises:
        ConfigError: the labels file cannot be read or has no such columns.
    """
    if not source:
        return None
    sigmoid = sigmoid_head(tuple(labels), multi_label)
    if source in ("folder", "column"):
        return EvalSpec(source, sigmoid, frozenset(labels), column=column if source == "column" else None)
    mapping = load_labels_file(source, column or "label")
    return EvalSpec("file", sigmoid, frozenset(labels), mapping=mapping, labels_file=source)


def load_labels_file(path: str, column: str) -> dict[str, str]:
    """{id or file name: label text} from a CSV, JSONL or JSON labels file.

    Raises:
        ConfigError: unreadable, or without a `file`/`id` column and `column`.
    """
    try:
        fs, p = fsutil.resolve(path)
        text = fs.cat_file(p).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"label_source: cannot read labels file {path}: {e}") from e
    lower = path.lower()
    try:
        if lower.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif lower.endswith(".json"):
            data = json.loads(text)
            rows = [{"id": k, column: v} for k, v in data.items()] if isinstance(data, dict) else data
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
    except (json.JSONDecodeError, csv.Error) as e:
        raise ConfigError(f"label_source: labels file {path} is not valid: {e}") from e
    if not rows:
        raise ConfigError(f"label_source: labels file {path} holds no rows")
    key = "id" if "id" in rows[0] else "file" if "file" in rows[0] else None
    if key is None or column not in rows[0]:
        raise ConfigError(f"label_source: labels file {path} needs an 'id' or 'file' column and a {column!r} "
                          f"column (label_column); found {sorted(rows[0])}")
    return {str(r[key]): _text(r[column]) for r in rows if r.get(key) is not None}


def _text(value) -> str | None:
    if value is None:
        return None
    return json.dumps(value) if isinstance(value, list) else str(value)


# -- in the write stage ------------------------------------------------------------------------


def part_statistics(table: pa.Table, spec: EvalSpec | None) -> dict:
    """Statistics of one part's rows (output schema): `scores` always, `evaluation` with a spec
    (nothing for rows without labels: an embedding-only run)."""
    if "labels" not in table.column_names:
        return {}
    out = {"scores": scores(table)}
    if spec is not None:
        out["evaluation"] = evaluate(table, spec)
    return out


def scores(table: pa.Table) -> dict:
    """Top-1 labels and probabilities of the scored rows: the report's histograms and drift."""
    ok = table.filter(pc.is_null(table.column("error")))
    labels, probs = ok.column("labels").to_pylist(), ok.column("probs").to_pylist()
    top1 = collections.Counter(lb[0] for lb in labels if lb)
    conf = np.array([p[0] for p in probs if p], dtype=np.float64)
    bins = np.bincount(np.minimum((conf * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1),
                       minlength=CONFIDENCE_BINS)
    return {"top1": dict(top1), "empty": sum(1 for lb in labels if not lb),
            "confidence_sum": float(conf.sum()), "confidence_rows": int(len(conf)),
            "confidence_bins": bins.tolist(), "time": time.time()}


def truth(table: pa.Table, spec: EvalSpec) -> list[str | None]:
    """The ground-truth text of each row, or None."""
    ids = table.column("id").to_pylist()
    if spec.source == "column":
        return [None if v is None else str(v) for v in table.column(spec.column).to_pylist()]
    if spec.source == "folder":
        return [_parent(i) for i in ids]
    return [spec.mapping.get(i, spec.mapping.get(_name(i))) for i in ids]


def _name(id_: str) -> str:
    return id_.rsplit("#", 1)[-1].rstrip("/").rsplit("/", 1)[-1]


def _parent(id_: str) -> str | None:
    """The class of an ImageFolder image: its parent folder (inside a shard: the member's)."""
    inner = id_.rsplit("#", 1)[-1] if "#" in id_ and "/" in id_.rsplit("#", 1)[-1] else id_.split("#", 1)[0]
    parts = inner.rstrip("/").rsplit("/", 2)
    return parts[-2] if len(parts) >= 2 and parts[-2] else None


def parse(text: str | None, multi_label: bool):
    """Label text → a label (single-label) or a list of labels; None/[] when there is none."""
    if text is None:
        return [] if multi_label else None
    text = text.strip()
    if not multi_label:
        return text or None
    if text.startswith("["):
        try:
            return [str(v).strip() for v in json.loads(text) if str(v).strip()]
        except json.JSONDecodeError:
            pass
    return [t.strip() for t in text.split(",") if t.strip()]


def evaluate(table: pa.Table, spec: EvalSpec) -> dict:
    """The sufficient statistics of one part against its ground truth (see the module doc).

    A true label the checkpoint does not have is counted in `unknown` (by label); a
    single-label row with one, or a multi-label row with nothing else, is left out of the
    figures.
    """
    texts = truth(table, spec)
    errors = table.column("error").to_pylist()
    labels, probs = table.column("labels").to_pylist(), table.column("probs").to_pylist()
    stats = {"multi_label": spec.multi_label, "rows": 0, "unlabelled": 0, "error_rows": 0, "unknown_rows": 0}
    unknown = collections.Counter()

    def count_unknown(names) -> None:
        for name in names:
            unknown[name if name in unknown or len(unknown) < UNKNOWN_NAMES else OTHER] += 1

    if spec.multi_label:
        per_label, ap, positives = {}, {}, collections.Counter()
        for text, err, lb, pr in zip(texts, errors, labels, probs):
            if text is None:  # no ground truth; "" (or "[]") is a row with no labels
                stats["unlabelled"] += 1
                continue
            if err is not None:
                stats["error_rows"] += 1
                continue
            given = set(parse(text, True))
            count_unknown(sorted(given - spec.labels))
            true = given & spec.labels
            if given and not true:
                stats["unknown_rows"] += 1
                continue
            stats["rows"] += 1
            positives.update(true)
            written = dict(zip(lb, pr))
            for label in true | set(written):
                c = per_label.setdefault(label, [0, 0, 0])  # tp, fp, fn
                c[0 if label in true and label in written else 1 if label in written else 2] += 1
            for label, p in written.items():
                cell = ap.setdefault(label, {}).setdefault(f"{p:.{AP_DECIMALS}f}", [0, 0])
                cell[0 if label in true else 1] += 1
        stats.update(per_label=per_label, positives=dict(positives), ap=ap, unknown=dict(unknown))
        return stats
    confusion: dict[str, dict[str, int]] = {}
    top5 = 0
    ece = np.zeros((ECE_BINS, 3))  # rows, sum of top-1 probability, correct
    for text, err, lb, pr in zip(texts, errors, labels, probs):
        true = parse(text, False)
        if true is None:
            stats["unlabelled"] += 1
            continue
        if err is not None:
            stats["error_rows"] += 1
            continue
        if true not in spec.labels:
            count_unknown([true])
            stats["unknown_rows"] += 1
            continue
        stats["rows"] += 1
        pred = lb[0]
        row = confusion.setdefault(true, {})
        row[pred] = row.get(pred, 0) + 1
        top5 += true in lb[:5]
        b = min(max(math.ceil(pr[0] * ECE_BINS) - 1, 0), ECE_BINS - 1)  # bins (i/M, (i+1)/M]
        ece[b] += (1, pr[0], pred == true)
    stats.update(confusion=confusion, top5=top5, ece=ece.tolist(), unknown=dict(unknown))
    return stats


# -- on the driver ------------------------------------------------------------------------------


def merge(parts) -> dict:
    """Adds up the `scores` and `evaluation` statistics of parts (dicts holding them)."""
    scores_: dict = {"top1": collections.Counter(), "empty": 0, "confidence_sum": 0.0, "confidence_rows": 0,
                     "confidence_bins": np.zeros(CONFIDENCE_BINS, np.int64), "timeline": []}
    ev: dict | None = None
    for part in parts:
        s = part.get("scores")
        if s is not None:
            scores_["top1"].update(s["top1"])
            scores_["empty"] += s["empty"]
            scores_["confidence_sum"] += s["confidence_sum"]
            scores_["confidence_rows"] += s["confidence_rows"]
            scores_["confidence_bins"] += np.asarray(s["confidence_bins"], np.int64)
            scores_["timeline"].append([s["time"], part.get("rows", 0)])
        e = part.get("evaluation")
        if e is None:
            continue
        if ev is None:
            ev = {"multi_label": e["multi_label"], "rows": 0, "unlabelled": 0, "error_rows": 0, "unknown_rows": 0,
                  "unknown": collections.Counter(), "parts": 0}
            if e["multi_label"]:
                ev.update(per_label={}, positives=collections.Counter(), ap={})
            else:
                ev.update(confusion={}, top5=0, ece=np.zeros((ECE_BINS, 3)))
        ev["parts"] += 1
        for k in ("rows", "unlabelled", "error_rows", "unknown_rows"):
            ev[k] += e[k]
        ev["unknown"].update(e["unknown"])
        if e["multi_label"]:
            ev["positives"].update(e["positives"])
            for label, c in e["per_label"].items():
                t = ev["per_label"].setdefault(label, [0, 0, 0])
                for i in range(3):
                    t[i] += c[i]
            for label, cells in e["ap"].items():
                table = ev["ap"].setdefault(label, {})
                for key, (pos, neg) in cells.items():
                    cell = table.setdefault(key, [0, 0])
                    cell[0] += pos
                    cell[1] += neg
        else:
            ev["top5"] += e["top5"]
            ev["ece"] += np.asarray(e["ece"])
            for true, row in e["confusion"].items():
                target = ev["confusion"].setdefault(true, {})
                for pred, n in row.items():
                    target[pred] = target.get(pred, 0) + n
    return {"scores": scores_, "evaluation": ev, "parts": len(parts) if hasattr(parts, "__len__") else None}


def score_summary(merged: dict) -> dict:
    """The manifest's `scores`: top-1 label histogram, mean top-1 probability, its histogram,
    and rows written over time (one point per part)."""
    s = merged["scores"]
    start = min((t for t, _ in s["timeline"]), default=0.0)
    timeline = sorted(s["timeline"])
    return {"top1": dict(s["top1"].most_common()), "empty": s["empty"],
            "rows": s["confidence_rows"] + s["empty"],
            "mean_top1_probability": s["confidence_sum"] / s["confidence_rows"] if s["confidence_rows"] else None,
            "confidence_bins": s["confidence_bins"].tolist(),
            "timeline": [[round(t - start, 3), n] for t, n in timeline]}


def summarize(merged: dict, labels: tuple[str, ...], top_k: int | None) -> dict | None:
    """The manifest's `evaluation`: figures from merged statistics (None without ground truth).

    `labels` is the checkpoint's label set, `top_k` the labels per row the run wrote (0 or
    None: all)."""
    ev = merged["evaluation"]
    if ev is None:
        return None
    out = {"multi_label": ev["multi_label"], "labelled": ev["rows"] + ev["error_rows"] + ev["unknown_rows"],
           "unlabelled": ev["unlabelled"], "error_rows": ev["error_rows"],
           "unknown": {"rows": ev["unknown_rows"], "labels": dict(ev["unknown"].most_common())}}
    if ev["multi_label"]:
        return {**out, **_multi(ev, labels)}
    return {**out, **_single(ev, labels, top_k)}


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _single(ev: dict, labels: tuple[str, ...], top_k: int | None) -> dict:
    rows = ev["confusion"]
    n = ev["rows"]
    ece = np.asarray(ev["ece"])
    correct = sum(row.get(t, 0) for t, row in rows.items())
    predicted = collections.Counter()
    for row in rows.values():
        predicted.update(row)
    support = {t: sum(row.values()) for t, row in rows.items()}
    present = [lb for lb in labels if support.get(lb) or predicted.get(lb)]  # sklearn's labels=None
    per_class = {}
    for lb in labels:
        tp = rows.get(lb, {}).get(lb, 0)
        p, r, f = _prf(tp, predicted.get(lb, 0) - tp, support.get(lb, 0) - tp)
        if lb in present:
            per_class[lb] = {"precision": p, "recall": r, "f1": f, "support": support.get(lb, 0)}
    macro = {m: float(np.mean([per_class[c][m] for c in present])) if present else 0.0
             for m in ("precision", "recall", "f1")}
    weighted = {m: sum(per_class[c][m] * per_class[c]["support"] for c in present) / n if n else 0.0
                for m in ("precision", "recall", "f1")}
    k = len(labels) if not top_k else min(top_k, len(labels))
    top5_ok = k >= min(5, len(labels))
    total = ece[:, 0].sum()
    ece_value = float(sum(abs(c / m - s / m) * m / total for m, s, c in ece if m)) if total else None
    return {
        "rows": n,
        "accuracy": correct / n if n else None,
        "correct": correct,
        "top5_accuracy": ev["top5"] / n if n and top5_ok else None,
        "top5_note": None if top5_ok else f"the run wrote {k} label(s) per row; top-5 accuracy needs 5",
        "ece": ece_value,
        "ece_bins": [[int(m), s / m if m else None, c / m if m else None] for m, s, c in ece],
        "macro": macro,
        "weighted": weighted,
        "per_class": per_class,
        "confusion": {"labels": present, "counts": [[t, p, c] for t, row in sorted(rows.items())
                                                    for p, c in sorted(row.items())]},
    }


def _multi(ev: dict, labels: tuple[str, ...]) -> dict:
    n = ev["rows"]
    per_label, aps = {}, {}
    tps = fps = fns = 0
    for lb in labels:
        tp, fp, fn = ev["per_label"].get(lb, [0, 0, 0])
        tps, fps, fns = tps + tp, fps + fp, fns + fn
        p, r, f = _prf(tp, fp, fn)
        positives = ev["positives"].get(lb, 0)
        ap = average_precision(ev["ap"].get(lb, {}), positives, n)
        if ap is not None:
            aps[lb] = ap
        per_label[lb] = {"precision": p, "recall": r, "f1": f, "support": positives, "average_precision": ap}
    micro = dict(zip(("precision", "recall", "f1"), _prf(tps, fps, fns)))
    with_support = [lb for lb in labels if per_label[lb]["support"]]
    macro = {m: float(np.mean([per_label[lb][m] for lb in with_support])) if with_support else 0.0
             for m in ("precision", "recall", "f1")}
    return {
        "rows": n,
        "mean_average_precision": float(np.mean(list(aps.values()))) if aps else None,
        "micro": micro,
        "macro": macro,
        "per_label": per_label,
    }


def average_precision(cells: dict[str, list[int]], positives: int, rows: int) -> float | None:
    """Average precision of one label from its score table, as `sklearn.metrics.
    average_precision_score` computes it: a step at each distinct score, highest first.

    `cells` maps each written score to [positive rows, negative rows]; rows where the label
    was not written (below its threshold or beyond top_k) score 0. None without positives.
    """
    if not positives:
        return None
    pos0, neg0 = positives, rows - positives
    points = []
    for key, (pos, neg) in cells.items():
        points.append((float(key), pos, neg))
        pos0, neg0 = pos0 - pos, neg0 - neg
    merged: dict[float, list[int]] = {}
    for s, pos, neg in points + [(0.0, pos0, neg0)]:
        cell = merged.setdefault(s, [0, 0])
        cell[0] += pos
        cell[1] += neg
    tp = fp = 0
    ap = recall_before = 0.0
    for s in sorted(merged, reverse=True):
        pos, neg = merged[s]
        if not pos and not neg:
            continue
        tp, fp = tp + pos, fp + neg
        recall = tp / positives
        ap += (recall - recall_before) * (tp / (tp + fp))
        recall_before = recall
    return ap


def manifest_sections(parts: list[dict], labels: tuple[str, ...], top_k: int | None, thresholds=None,
                      spec: EvalSpec | None = None) -> dict:
    """What a run adds to its manifest: `scores`, `evaluation` (with ground truth) and
    `thresholds` (sigmoid heads), from its parts' statistics."""
    merged = merge(parts)
    out = {"scores": score_summary(merged)}
    if spec is not None:
        evaluation = summarize(merged, labels, top_k)
        if evaluation is not None:
            evaluation["source"] = spec.labels_file or spec.source + (f":{spec.column}" if spec.column else "")
            evaluation["parts_evaluated"] = merged["evaluation"]["parts"]
            evaluation["parts"] = len(parts)
        out["evaluation"] = evaluation
    if thresholds is not None:
        out["thresholds"] = thresholds.to_dict()
    return out
