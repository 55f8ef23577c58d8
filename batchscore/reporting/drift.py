"""Drift: how a committed run's outputs differ from a reference run's.

Compared, from the two runs' manifests (`scores`, written by every run; for a run committed
before they existed, counted from its part files one at a time):

    psi                      population stability index of the top-1 label distribution:
                             sum over labels of (p - q) ln(p / q), shares floored at 1e-4
    js                       Jensen-Shannon divergence of the same distributions, base 2
                             (0 identical, 1 disjoint)
    error_rate               share of error rows: the change, in absolute terms
    mean_top1_probability    mean probability of the top-1 label: the change

Each is flagged when past its threshold (`drift_psi`, `drift_js`, `drift_error_rate`,
`drift_confidence` in the job; defaults 0.2, 0.1, 0.02, 0.05). Multi-label rows with no
label above threshold count under `(none)`.

The two runs' models are compared too (the manifests' `model.weights_sha256`, else
`model.tag`): `model_changed` is true when they differ, with both tags under `models`, so an
alert can tell a new model from drifting data (a new model shifts every figure by itself).
`model_changed` is not one of `flagged`, which holds the figures past their thresholds only.

The drift of a run is None without a baseline; otherwise always a dict of `baseline`,
`baseline_run_id`, `run_id`, `flagged` (a list, empty when nothing is past its threshold),
`model_changed`, `models`, `figures` and `labels`. A baseline named explicitly (`--baseline`,
the job's `baseline`) that holds no committed run is an error (`check_baseline`, and
`against(..., required=True)`), never "no drift".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from batchscore.config import default
from batchscore.exceptions import ConfigError, NotCommitted, SinkError
from batchscore.outputs.committed import with_scores
from batchscore.outputs.output import read_manifest

PSI_FLOOR = 1e-4
NONE_LABEL = "(none)"

log = logging.getLogger("batchscore")


@dataclass(frozen=True)
class Thresholds:
    psi: float = default("drift_psi")
    js: float = default("drift_js")
    error_rate: float = default("drift_error_rate")
    confidence: float = default("drift_confidence")

    @classmethod
    def from_settings(cls, settings: dict) -> Thresholds:
        """From a manifest's recorded config (older ones lack them: then the defaults)."""
        get = settings.get
        return cls(get("drift_psi", cls.psi), get("drift_js", cls.js), get("drift_error_rate", cls.error_rate),
                   get("drift_confidence", cls.confidence))


def distribution(scores: dict) -> dict[str, int]:
    """Top-1 label counts of a manifest's `scores`, with empty multi-label rows as `(none)`."""
    out = dict(scores.get("top1", {}))
    if scores.get("empty"):
        out[NONE_LABEL] = out.get(NONE_LABEL, 0) + scores["empty"]
    return out


def psi(current: dict[str, int], baseline: dict[str, int]) -> float:
    p, q = _shares(current, baseline)
    return float(sum((a - b) * math.log(a / b) for a, b in zip(_floor(p), _floor(q))))


def js_divergence(current: dict[str, int], baseline: dict[str, int]) -> float:
    p, q = _shares(current, baseline)

    def kl(x, m):
        return sum(a * math.log2(a / b) for a, b in zip(x, m) if a > 0)

    m = [(a + b) / 2 for a, b in zip(p, q)]
    return float(max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m)))


def _shares(current: dict[str, int], baseline: dict[str, int]) -> tuple[list[float], list[float]]:
    keys = sorted(set(current) | set(baseline))
    a, b = sum(current.values()) or 1, sum(baseline.values()) or 1
    return [current.get(k, 0) / a for k in keys], [baseline.get(k, 0) / b for k in keys]


def _floor(shares: list[float]) -> list[float]:
    floored = [max(s, PSI_FLOOR) for s in shares]
    total = sum(floored)
    return [s / total for s in floored]


def compare(current: dict, baseline: dict, thresholds: Thresholds, baseline_uri: str) -> dict:
    """Drift of `current` against `baseline`: both manifests holding `scores` and `counts`."""
    cur, base = distribution(current["scores"]), distribution(baseline["scores"])
    labels = sorted(set(cur) | set(base), key=lambda k: (-(cur.get(k, 0) + base.get(k, 0)), k))
    n_cur, n_base = sum(cur.values()) or 1, sum(base.values()) or 1

    def rate(m):
        rows = m["counts"]["rows"]
        return m["counts"]["errors"] / rows if rows else 0.0

    def conf(m):
        return m["scores"].get("mean_top1_probability")

    figures = {
        "psi": {"value": psi(cur, base), "threshold": thresholds.psi},
        "js": {"value": js_divergence(cur, base), "threshold": thresholds.js},
        "error_rate": {"current": rate(current), "baseline": rate(baseline), "threshold": thresholds.error_rate},
        "mean_top1_probability": {"current": conf(current), "baseline": conf(baseline),
                                  "threshold": thresholds.confidence},
    }
    for f in figures.values():
        if "value" not in f:
            f["value"] = None if f["current"] is None or f["baseline"] is None else f["current"] - f["baseline"]
        f["flagged"] = f["value"] is not None and abs(f["value"]) > f["threshold"]
    models = {"current": _model(current).get("tag"), "baseline": _model(baseline).get("tag")}
    return {
        "baseline": baseline_uri,
        "baseline_run_id": baseline["run_id"],
        "run_id": current["run_id"],
        "flagged": [k for k, f in figures.items() if f["flagged"]],
        "model_changed": model_changed(current, baseline),
        "models": models,
        "figures": figures,
        "labels": [{"label": k, "current": cur.get(k, 0), "baseline": base.get(k, 0),
                    "current_share": cur.get(k, 0) / n_cur, "baseline_share": base.get(k, 0) / n_base}
                   for k in labels],
    }


def _model(manifest: dict) -> dict:
    return manifest.get("model") or {}


def model_changed(current: dict, baseline: dict) -> bool:
    """Whether two manifests name different models: their weights' sha256 when both record
    one, else their tags."""
    a, b = _model(current), _model(baseline)
    if a.get("weights_sha256") and b.get("weights_sha256"):
        return a["weights_sha256"] != b["weights_sha256"]
    return a.get("tag") != b.get("tag")


def no_baseline_message(baseline: str) -> str:
    return (f"baseline {baseline}: no committed run there (no _SUCCESS, or no such folder); "
            "name the output of a committed run, or leave the baseline out")


def check_baseline(baseline: str | None) -> str | None:
    """The run id committed in `baseline` (None without a baseline, or a templated one).

    Raises:
        ConfigError: the baseline names an output without a committed run.
    """
    if not baseline or "{date}" in baseline:
        return None
    try:
        manifest = read_manifest(baseline)
    except (SinkError, OSError) as e:
        raise ConfigError(f"baseline {baseline}: cannot read its committed run: {e}") from e
    if manifest is None:
        raise ConfigError(no_baseline_message(baseline))
    return manifest["run_id"]


def against(output: str, baseline: str | None, thresholds: Thresholds | None = None, required: bool = True
            ) -> dict | None:
    """Drift of the committed run in `output` against the one in `baseline`; None without a
    baseline.

    `required`: the baseline was named explicitly (`--baseline`, the job's `baseline`), so a
    baseline without a committed run is an error; otherwise (a baseline recorded in the
    run's manifest, e.g. the previous nightly partition, since removed) it is logged and the
    drift is None.

    Raises:
        NotCommitted: `output` holds no committed run, or `baseline` holds none and `required`.
    """
    if not baseline:
        return None
    current = read_manifest(output)
    if current is None:
        raise NotCommitted(f"{output}: no committed run to compare")
    if thresholds is None:
        thresholds = Thresholds.from_settings(current.get("config", {}))
    reference = read_manifest(baseline)
    if reference is None:
        if required:
            raise NotCommitted(no_baseline_message(baseline))
        log.warning("drift of %s: %s; no drift figures", output, no_baseline_message(baseline))
        return None
    return compare(with_scores(current, output), with_scores(reference, baseline), thresholds, baseline)
