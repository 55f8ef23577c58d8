"""Postprocess: logits → labels and probabilities, as plain Arrow lists.

Single-label checkpoints: softmax, then the k most probable classes, most probable first
(`top_k=0` keeps every class). Multi-label checkpoints (`problem_type:
multi_label_classification`) and single-logit heads, as transformers' image-classification
pipeline does: a sigmoid per class, then the classes whose score is at or above their
threshold (`Thresholds`: a default, and per label from a JSON or YAML file), most probable
first, at most k of them; a row may hold none, which is not an error. Runs inside the
inference actor so full logits never cross the object store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchscore.config import default
from batchscore.errors import code_of
from batchscore.exceptions import ConfigError
from batchscore.inputs import fs as fsutil


def sigmoid_head(labels: tuple[str, ...], multi_label: bool) -> bool:
    """True when the checkpoint's scores are per-class sigmoids (multi-label, or one logit)."""
    return multi_label or len(labels) == 1


@dataclass(frozen=True)
class Thresholds:
    """Score thresholds of a sigmoid head: `default` for every label, `per_label` overrides
    (from the file `file`, whose sha256 is `sha256`)."""

    default: float = default("threshold")
    per_label: dict[str, float] = field(default_factory=dict)
    file: str | None = None
    sha256: str | None = None

    def vector(self, labels: tuple[str, ...]) -> np.ndarray:
        return np.array([self.per_label.get(lb, self.default) for lb in labels], dtype=np.float32)

    def to_dict(self) -> dict:
        return {"default": self.default, "per_label": dict(sorted(self.per_label.items())), "file": self.file,
                "sha256": self.sha256}


def file_sha256(path: str | None) -> str | None:
    """sha256 of a thresholds file (local path or URI), None when there is none."""
    if not path:
        return None
    try:
        return hashlib.sha256(_read_bytes(path)).hexdigest()
    except OSError as e:
        raise ConfigError(f"thresholds: cannot read {path}: {e}") from e


def load_thresholds(default: float, path: str | None, labels: tuple[str, ...], multi_label: bool) -> Thresholds:
    """The thresholds of a run: `default` (the config's `threshold`), and per label from
    `path` (a JSON or YAML mapping of label → threshold in [0, 1]).

    Raises:
        ConfigError: the file is missing, unreadable or not such a mapping, names labels the
            checkpoint does not have (all of them are named), or the checkpoint is not a
            sigmoid head (single-label models are scored with a softmax and top_k).
    """
    if not path:
        return Thresholds(default)
    if not sigmoid_head(labels, multi_label):
        raise ConfigError(f"thresholds: {path} sets per-label thresholds, but the checkpoint is single-label "
                          "(softmax, top_k labels per row); thresholds apply to multi-label checkpoints "
                          "(problem_type: multi_label_classification) and single-logit heads")
    try:
        raw = _read_bytes(path)
    except OSError as e:
        raise ConfigError(f"thresholds: cannot read {path}: {e}") from e
    import yaml  # lazy: only a thresholds file is YAML (a superset of JSON: one parser for both)

    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"thresholds: {path} is not valid JSON or YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"thresholds: {path}: expected a mapping of label to threshold, got {type(data).__name__}")
    per_label: dict[str, float] = {}
    bad = []
    for label, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            bad.append(f"{label}: {value!r}")
        else:
            per_label[str(label)] = float(value)
    if bad:
        raise ConfigError(f"thresholds: {path}: expected thresholds from 0 to 1, got {', '.join(bad)}")
    unknown = sorted(set(per_label) - set(labels))
    if unknown:
        shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        raise ConfigError(f"thresholds: {path} names {len(unknown)} label(s) the checkpoint does not have: "
                          f"{', '.join(map(repr, unknown))}; its labels are: {shown}")
    return Thresholds(default, per_label, str(path), hashlib.sha256(raw).hexdigest())


def run_thresholds(threshold: float, path: str | None, labels: tuple[str, ...], multi_label: bool
                   ) -> Thresholds | None:
    """The run's thresholds (the default `threshold`, the file `path`) for a sigmoid head; None
    for a softmax head (a thresholds file there is an error: see `load_thresholds`)."""
    loaded = load_thresholds(threshold, path, tuple(labels), multi_label)
    return loaded if sigmoid_head(tuple(labels), multi_label) else None


def _read_bytes(path: str) -> bytes:
    if "://" not in str(path):
        return Path(path).expanduser().read_bytes()
    fs, p = fsutil.resolve(str(path))
    return fs.cat_file(p)


class Postprocessor:
    """Turns a [N, C] logits tensor into (class indices, probabilities), each [N, k].

    For a sigmoid head, classes below their threshold have index -1 and probability NaN
    (after the kept ones: rows are sorted most probable first).
    """

    def __init__(self, labels: tuple[str, ...], top_k: int, multi_label: bool, thresholds: Thresholds | None = None):
        self.labels = np.array(labels, dtype=object)
        self.k = len(labels) if top_k == 0 else min(top_k, len(labels))
        self.multi_label = sigmoid_head(tuple(labels), multi_label)
        self.thresholds = (thresholds or Thresholds()).vector(tuple(labels)) if self.multi_label else None

    def __call__(self, logits):
        import torch  # lazy: torch in the inference actor only; validate imports this module without it

        logits = logits.float()
        if logits.shape[-1] != len(self.labels):
            raise ValueError(
                f"model returned {logits.shape[-1]} logits per image but config.json id2label names "
                f"{len(self.labels)} classes"
            )
        if not self.multi_label:
            probs, idx = torch.topk(torch.softmax(logits, dim=-1), self.k, dim=-1, sorted=True)
            return idx.cpu().numpy(), probs.cpu().numpy().astype(np.float32)
        scores = torch.sigmoid(logits)
        limit = torch.as_tensor(self.thresholds, device=scores.device)
        # Below threshold → -1 (sigmoids are in [0, 1]), so they sort after every kept class.
        kept = torch.where(scores >= limit, scores, torch.full_like(scores, -1.0))
        probs, idx = torch.topk(kept, self.k, dim=-1, sorted=True)
        probs, idx = probs.cpu().numpy().astype(np.float32), idx.cpu().numpy()
        below = probs < 0
        idx[below], probs[below] = -1, np.nan
        return idx, probs

    def table(self, ids: np.ndarray, errors: list, idx: np.ndarray, probs: np.ndarray, meta: np.ndarray) -> pa.Table:
        """Rows of `id, labels, probs, error, error_code, meta`; rows with an error have null labels and probs.

        `errors` holds "" for rows without an error; `idx` and `probs` hold one row per such
        row, in input order (index -1: a class below its threshold, left out).
        """
        errors = [str(e) if e else None for e in errors]
        valid = np.array([e is None for e in errors], dtype=bool)
        idx = idx.reshape(len(idx), -1) if len(idx) else np.zeros((0, self.k), np.int64)
        probs = probs.reshape(len(probs), -1) if len(probs) else np.zeros((0, self.k), np.float32)
        kept = idx >= 0
        counts = np.zeros(len(errors), dtype=np.int64)
        counts[valid] = kept.sum(axis=1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        mask = pa.array(~valid)
        labels = pa.ListArray.from_arrays(offsets, pa.array(self.labels[idx[kept]].tolist(), pa.string()), mask=mask)
        scores = pa.ListArray.from_arrays(offsets, pa.array(probs[kept], pa.float32()), mask=mask)
        return pa.table({
            "id": pa.array([str(i) for i in ids], pa.string()),
            "labels": labels,
            "probs": scores,
            "error": pa.array(errors, pa.string()),
            "error_code": pa.array([code_of(e) for e in errors], pa.string()),
            "meta": pa.array([str(m) for m in meta], pa.string()),
        })
