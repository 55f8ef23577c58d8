"""The embedded demo: a tiny ViT trained on scikit-learn's digits, and held-out sample images.

`batchscore demo` scores `samples/` with `checkpoint/` on a local Ray and reports top-1
accuracy against `samples/labels.csv`; `batchscore demo --task embed` embeds them instead and
reports the leave-one-out nearest-neighbour accuracy of the embeddings (cosine). Both were made by `python -m batchscore.demo.train`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchscore.config import ScoreConfig
from batchscore.outputs.result import RunResult

HERE = Path(__file__).parent
CHECKPOINT = HERE / "checkpoint"
SAMPLES = HERE / "samples"
DEFAULT_OUTPUT = "runs/demo"


@dataclass(frozen=True)
class DemoResult:
    run: RunResult
    correct: int
    labelled: int
    measure: str = "top-1"

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else 0.0

    def summary(self) -> str:
        return (f"{self.run.summary()}\naccuracy: {100 * self.accuracy:.1f}% {self.measure} "
                f"({self.correct}/{self.labelled} demo digits)")


def run(config: ScoreConfig) -> DemoResult:
    """Scores the demo samples (unless `config` names other inputs) and measures accuracy."""
    # lazy: Ray and the stages only when the demo runs; the CLI imports this module
    from batchscore import pipeline

    config = config.with_overrides(
        input=config.input or (str(SAMPLES),),
        output=config.output or DEFAULT_OUTPUT,
        # the top-1 accuracy comes from the run's own evaluation against labels.csv
        label_source=config.label_source or str(SAMPLES / "labels.csv"),
        overwrite=True,
    )
    result = pipeline.score(config)
    frame = result.to_pandas()
    if "embedding" in frame.columns:
        return DemoResult(result, *nearest_neighbour_accuracy(frame),
                          measure="1-nearest-neighbour of the embeddings (cosine, leave-one-out)")
    if result.evaluation and result.evaluation.get("correct") is not None:
        return DemoResult(result, result.evaluation["correct"], result.evaluation["rows"])
    return DemoResult(result, *accuracy(frame))


def _truth() -> dict[str, str]:
    with open(SAMPLES / "labels.csv", newline="") as f:
        return {row["file"]: row["label"] for row in csv.DictReader(f)}


def nearest_neighbour_accuracy(frame) -> tuple[int, int]:
    """(correct, labelled): each digit's nearest other digit by embedding cosine has its label."""
    truth = _truth()
    named = [(str(i).rsplit("/", 1)[-1], e) for i, e in zip(frame["id"], frame["embedding"])]
    named = [(n, e) for n, e in named if n in truth and e is not None]
    if len(named) < 2:
        return 0, len(named)
    x = np.stack([e for _, e in named]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    labels = [truth[n] for n, _ in named]
    nearest = similarity.argmax(axis=1)
    return sum(labels[i] == labels[j] for i, j in enumerate(nearest)), len(named)


def accuracy(frame) -> tuple[int, int]:
    """(correct, labelled): top-1 label against labels.csv, matched by file name."""
    truth = _truth()
    correct = labelled = 0
    for id_, labels in zip(frame["id"], frame["labels"]):
        name = str(id_).rsplit("/", 1)[-1]
        if name in truth:
            labelled += 1
            correct += labels is not None and len(labels) > 0 and labels[0] == truth[name]
    return correct, labelled
