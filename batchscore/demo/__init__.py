"""The embedded demo: a tiny ViT trained on scikit-learn's digits, and held-out sample images.

`batchscore demo` scores `samples/` with `checkpoint/` on a local Ray and reports top-1
accuracy against `samples/labels.csv`. Both were made by `python -m batchscore.demo.train`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from batchscore.config import ScoreConfig
from batchscore.result import RunResult

HERE = Path(__file__).parent
CHECKPOINT = HERE / "checkpoint"
SAMPLES = HERE / "samples"
DEFAULT_OUTPUT = "runs/demo"


@dataclass(frozen=True)
class DemoResult:
    run: RunResult
    correct: int
    labelled: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else 0.0

    def summary(self) -> str:
        return (f"{self.run.summary()}\naccuracy: {100 * self.accuracy:.1f}% top-1 "
                f"({self.correct}/{self.labelled} demo digits)")


def run(config: ScoreConfig) -> DemoResult:
    """Scores the demo samples (unless `config` names other inputs) and measures accuracy."""
    from batchscore import pipeline

    config = config.with_overrides(
        input=config.input or (str(SAMPLES),),
        output=config.output or DEFAULT_OUTPUT,
        overwrite=True,
    )
    result = pipeline.score(config)
    return DemoResult(result, *accuracy(result.to_pandas()))


def accuracy(frame) -> tuple[int, int]:
    """(correct, labelled): top-1 label against labels.csv, matched by file name."""
    with open(SAMPLES / "labels.csv", newline="") as f:
        truth = {row["file"]: row["label"] for row in csv.DictReader(f)}
    correct = labelled = 0
    for id_, labels in zip(frame["id"], frame["labels"]):
        name = str(id_).rsplit("/", 1)[-1]
        if name in truth:
            labelled += 1
            correct += labels is not None and len(labels) > 0 and labels[0] == truth[name]
    return correct, labelled
