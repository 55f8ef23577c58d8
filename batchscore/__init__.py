"""batchscore: batch image-classification scoring of Vision Transformer checkpoints on Ray Data.

    import batchscore
    result = batchscore.score(input=["gs://bucket/images/"], output="gs://bucket/scores/", top_k=5)
    df = result.to_pandas()
"""

from __future__ import annotations

from typing import Any

from batchscore.config import ScoreConfig
from batchscore.driver.progress import python_caller
from batchscore.exceptions import ConfigError
from batchscore.outputs.result import RunResult

__all__ = ["ConfigError", "RunResult", "ScoreConfig", "backfill", "nightly", "score"]


def score(config: ScoreConfig | str | None = None, **overrides: Any) -> RunResult:
    """Scores images and commits the output; see `ScoreConfig` for every setting.

    Shows its progress while it runs: a bar in Jupyter or on a terminal (`tqdm.auto`),
    otherwise a `progress:` log line every `progress_seconds`; and batchscore's log lines on
    stderr unless the caller configured logging (then they go where it says, once).

    Args:
        config: A `ScoreConfig`, a path to a YAML job file, or None for defaults.
        **overrides: Settings that replace the config's (e.g. `input=[...]`, `top_k=3`).
    """
    # lazy: Ray and the stages; `import batchscore` stays light
    from batchscore import pipeline

    if config is None:
        config = ScoreConfig()
    elif not isinstance(config, ScoreConfig):
        config = ScoreConfig.from_yaml(config)
    with python_caller():
        return pipeline.score(config.with_overrides(**overrides))


def nightly(config: ScoreConfig | str, date=None, **overrides: Any) -> RunResult:
    """Scores one date partition of a job whose input and output hold `{date}` (default:
    yesterday, UTC); a committed partition is a no-op, a failed one resumes."""
    # lazy: it imports the pipeline (Ray); `import batchscore` stays light
    from batchscore import schedule

    with python_caller():
        return schedule.nightly(_config(config).with_overrides(**overrides), date)


def backfill(config: ScoreConfig | str, dates, parallel: int = 1, **overrides: Any):
    """Scores each date as its own committed partition (see `batchscore.schedule.backfill`);
    returns a pandas DataFrame of partition, status, rows, errors, seconds, output, error."""
    from batchscore import schedule  # lazy: as in `nightly`

    with python_caller():
        return schedule.backfill(_config(config).with_overrides(**overrides), dates, parallel=parallel)


def _config(config: ScoreConfig | str) -> ScoreConfig:
    return config if isinstance(config, ScoreConfig) else ScoreConfig.from_yaml(config)
