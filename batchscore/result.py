"""What a run returns to Python callers and prints as its summary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunResult:
    """The outcome of `batchscore.score`.

    `status` is "committed" for a run that wrote output, "already_committed" when the output
    held a committed run and `overwrite` was off (nothing was scored).
    """

    status: str
    run_id: str
    output: str
    manifest_uri: str
    rows: int
    errors: int
    errors_by_code: dict[str, int] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    seconds: float = 0.0
    images_per_second: float = 0.0

    @property
    def scored(self) -> int:
        return self.rows - self.errors

    def to_arrow(self):
        from batchscore.output import read_committed

        return read_committed(self.output)

    def to_pandas(self):
        """The committed rows, as a pandas DataFrame (read from the files the manifest lists)."""
        return self.to_arrow().to_pandas()

    def summary(self) -> str:
        if self.status == "already_committed":
            return (f"already committed: {self.output} holds run {self.run_id} ({self.rows} rows); "
                    "nothing to do (pass --overwrite to score again)")
        codes = ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_code.items())) or "none"
        return (f"committed run {self.run_id}: {self.rows} rows, {self.scored} scored, {self.errors} errors "
                f"({codes}), {self.images_per_second:.1f} images/s in {self.seconds:.1f}s\n"
                f"output: {self.output}\nmanifest: {self.manifest_uri}")
