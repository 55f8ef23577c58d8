"""batchscore: batch image-classification scoring of Vision Transformer checkpoints on Ray Data.

    import batchscore
    result = batchscore.score(input=["gs://bucket/images/"], output="gs://bucket/scores/", top_k=5)
    df = result.to_pandas()
"""

from __future__ import annotations

from typing import Any

from batchscore.config import ConfigError, ScoreConfig
from batchscore.result import RunResult

__all__ = ["ConfigError", "RunResult", "ScoreConfig", "score"]


def score(config: ScoreConfig | str | None = None, **overrides: Any) -> RunResult:
    """Scores images and commits the output; see `ScoreConfig` for every setting.

    Args:
        config: A `ScoreConfig`, a path to a YAML job file, or None for defaults.
        **overrides: Settings that replace the config's (e.g. `input=[...]`, `top_k=3`).
    """
    from batchscore import pipeline

    if config is None:
        config = ScoreConfig()
    elif not isinstance(config, ScoreConfig):
        config = ScoreConfig.from_yaml(config)
    return pipeline.score(config.with_overrides(**overrides))
