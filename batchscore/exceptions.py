"""The exceptions batchscore raises to its callers, each with the exit code of the `batchscore`
command it ends in (`exit_code`; `batchscore.cli` maps by it).

These are errors of a job or a run: the whole command fails. The error *codes* of single
rows (`decode.corrupt`, `read.missing`, ...) that a run writes into its output instead of
failing are another thing: they are in `batchscore.errors`.

This module imports nothing, so that every other module may import it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_JOB = 2  # bad config, inputs or checkpoint: fix the job, do not retry as is
EXIT_BUDGET = 3  # more error rows than max_error_fraction allows; nothing was committed
EXIT_FAILED = 4  # the run failed (infrastructure, output); nothing was committed
EXIT_BUSY = 5  # another run holds the output's lease; nothing was written, retry later
EXIT_NOT_COMMITTED = 6  # inspect: the output holds no committed run (nothing to report yet)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it; nothing committed, staged parts kept


class BatchscoreError(Exception):
    """A failure batchscore reports to its caller; `exit_code` is the `batchscore` command's."""

    exit_code = EXIT_FAILED


class ConfigError(BatchscoreError, ValueError):
    """A configuration value or key is invalid; the message says which and what was expected."""

    exit_code = EXIT_BAD_JOB


class ListingError(BatchscoreError, ValueError):
    """An input could not be listed, is not of the expected format, or listed nothing."""

    exit_code = EXIT_BAD_JOB


class ModelError(BatchscoreError, ValueError):
    """A checkpoint is missing, unsafe, or not one batchscore can score with."""

    exit_code = EXIT_BAD_JOB


class ResumeError(BatchscoreError, RuntimeError):
    """The staged run cannot be continued with these settings."""

    exit_code = EXIT_BAD_JOB


class ErrorBudgetExceeded(BatchscoreError, RuntimeError):
    """The run had more error rows than its budget allows; nothing was committed."""

    exit_code = EXIT_BUDGET


class CacheError(BatchscoreError, ValueError):
    """A remote checkpoint is missing, incomplete, or changed while a run was using it."""

    exit_code = EXIT_FAILED


class SinkError(BatchscoreError, RuntimeError):
    """Output could not be written, does not match the schema, or its rows do not match the inputs."""

    exit_code = EXIT_FAILED


class OutputBusy(BatchscoreError, RuntimeError):
    """Another run holds the output's lease."""

    exit_code = EXIT_BUSY


class NotCommitted(SinkError):
    """The output holds no committed run, so there is nothing to report (`batchscore inspect`
    exits 6: not a failure of the output, just nothing there yet)."""

    exit_code = EXIT_NOT_COMMITTED
