"""What a run returns to Python callers and prints as its summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchscore.driver.progress import overwrite_hint


@dataclass(frozen=True)
class RunResult:
    """The outcome of `batchscore.score`.

    `status` is "committed" for a run that wrote output, "already_committed" when the output
    held a committed run and `overwrite` was off (nothing was scored).

    `seconds` is the whole call (listing, Ray start, scoring, commit); `images_per_second`
    the scoring part's rate (the manifest's `timings.images_per_second`). The summary prints
    rows over `seconds`, so its rate and seconds agree.
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
    evaluation: dict | None = None  # the manifest's `evaluation`, when the run had ground truth
    drift: dict | None = None  # nightly and backfill: figures against the previous partition (batchscore.reporting.drift)

    @property
    def scored(self) -> int:
        return self.rows - self.errors

    def to_arrow(self):
        # lazy: pyarrow and fsspec; `import batchscore` stays light
        from batchscore.outputs.output import read_committed

        return read_committed(self.output)

    def to_pandas(self):
        """The committed rows, as a pandas DataFrame (read from the files the manifest lists)."""
        return self.to_arrow().to_pandas()

    def summary(self) -> str:
        """What the run did, in the caller's terms: `--overwrite` on the command line,
        `overwrite=True` from Python. The images/s is rows over the seconds on the same line."""
        if self.status == "already_committed":
            text = (f"already committed: {self.output} holds run {self.run_id} ({self.rows} rows); "
                    f"nothing to do (pass {overwrite_hint()} to score again)")
            return "\n".join(filter(None, [text, _drift_line(self.drift)]))
        codes = ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_code.items())) or "none"
        seconds = round(self.seconds, 1)  # the rate is over the seconds as printed
        rate = self.rows / seconds if seconds > 0 else 0.0
        text = (f"committed run {self.run_id}: {self.rows} rows, {self.scored} scored, {self.errors} errors "
                f"({codes}) in {seconds:.1f}s, {rate:.1f} images/s\n"
                f"output: {self.output}\nmanifest: {self.manifest_uri}")
        return "\n".join(filter(None, [text, _evaluation_line(self.evaluation), _drift_line(self.drift)]))


def _evaluation_line(ev: dict | None) -> str | None:
    if not ev:
        return None
    if ev.get("multi_label"):
        m = ev.get("mean_average_precision")
        line = (f"evaluation: mAP {'n/a' if m is None else f'{m:.3f}'}, micro F1 {ev['micro']['f1']:.3f} "
                f"({ev['rows']} labelled rows{_unlabelled(ev)})")
    else:
        acc = ev.get("accuracy")
        line = (f"evaluation: top-1 accuracy {'n/a' if acc is None else f'{100 * acc:.1f}%'} "
                f"({ev['correct']}/{ev['rows']} labelled{_unlabelled(ev)})")
        if ev.get("top5_accuracy") is not None:
            line += f", top-5 {100 * ev['top5_accuracy']:.1f}%"
        if ev.get("ece") is not None:
            line += f", ECE {ev['ece']:.3f}"
    unknown = ev.get("unknown", {})
    if unknown.get("rows"):
        names = ", ".join(list(unknown["labels"])[:5])
        line += f"; {unknown['rows']} row(s) with labels the checkpoint lacks ({names})"
    return line


def _unlabelled(ev: dict) -> str:
    """", 20 unlabelled": the rows without ground truth, left out of the figures."""
    return f", {ev['unlabelled']} unlabelled" if ev.get("unlabelled") is not None else ""


def _drift_line(drift: dict | None) -> str | None:
    if not drift:
        return None
    flagged = [k for k, v in drift["figures"].items() if v.get("flagged")]
    line = (f"drift vs {drift['baseline']}: PSI {drift['figures']['psi']['value']:.3f}, "
            f"JS {drift['figures']['js']['value']:.3f}; "
            + (f"FLAGGED: {', '.join(flagged)}" if flagged else "nothing flagged"))
    if drift.get("model_changed"):
        models = drift.get("models") or {}
        line += (f"; MODEL CHANGED: baseline scored with {models.get('baseline')}, this run with "
                 f"{models.get('current')} (the figures compare models, not only data)")
    return line
