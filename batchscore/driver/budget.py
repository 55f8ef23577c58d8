"""Error budget: fail a run whose share of error rows is above `max_error_fraction`.

Like Azure ML's `error_threshold`, but a fraction. When the total number of rows is known in
advance (image files, manifests, Parquet), the run stops as soon as the budget is provably
blown (more errors than F x total, whatever the rest gives); otherwise it is judged at the
end. Either way nothing is committed, and the error summary is written next to the staged
files as `_errors.json`.
"""

from __future__ import annotations

import collections
import json

from batchscore.driver.progress import option
from batchscore.exceptions import ErrorBudgetExceeded
from batchscore.outputs.output import ERRORS

EXAMPLES = 20


class ErrorBudget:
    def __init__(self, max_fraction: float, expected_rows: int | None):
        self.max_fraction = max_fraction
        self.expected = expected_rows
        self.rows = self.errors = 0
        self.by_code: collections.Counter[str] = collections.Counter()
        self.examples: list[dict[str, str]] = []

    def add_counts(self, rows: int, errors: int, by_code: dict[str, int], examples: list[dict[str, str]]) -> None:
        """Counts a part's rows from its statistics (`batchscore.driver.run`), not its rows."""
        self.rows += rows
        self.errors += errors
        self.by_code.update(by_code)
        self.examples.extend(examples[:EXAMPLES - len(self.examples)])

    def blown_early(self) -> bool:
        """True once the errors alone exceed the budget of the whole run."""
        return self.expected is not None and self.errors > self.max_fraction * self.expected

    def blown(self) -> bool:
        return self.errors > self.max_fraction * max(self.rows, 1)

    def summary(self, run_id: str, aborted_early: bool) -> dict:
        return {"run_id": run_id, "max_error_fraction": self.max_fraction, "rows_seen": self.rows,
                "rows_expected": self.expected, "errors": self.errors, "errors_by_code": dict(self.by_code),
                "aborted_early": aborted_early, "examples": self.examples}

    def fail(self, run_id: str, aborted_early: bool, write) -> ErrorBudgetExceeded:
        """Writes the summary with `write(name, text)` and returns the exception to raise."""
        summary = self.summary(run_id, aborted_early)
        where = write(ERRORS, json.dumps(summary, indent=2))
        total = self.expected if aborted_early else self.rows
        codes = ", ".join(f"{k}={v}" for k, v in self.by_code.most_common())
        limit = option("max_error_fraction", f"{self.max_fraction:g}")  # --max-error-fraction 0.1 on the CLI
        return ErrorBudgetExceeded(
            f"{self.errors} error rows ({codes}) of {total} exceed {limit}"
            f"{' (stopped early: the budget could no longer be met)' if aborted_early else ''}; "
            f"nothing was committed; summary and examples in {where}")
