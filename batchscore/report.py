"""`batchscore inspect`: what a committed run holds, from its manifest and its Parquet files.

Reads exactly what a reader would (the files the manifest of the run named in `_SUCCESS`
lists), local or in a bucket, and reports: the run and model, rows, scored and error counts,
error rows by code, the histogram of top-1 labels, throughput and timings. Counts are taken
from the Parquet rows and checked against the manifest's; a mismatch is reported, not hidden.
"""

from __future__ import annotations

import collections

import pyarrow.compute as pc

from batchscore import fs as fsutil
from batchscore.output import STAGING, SUCCESS, SinkError, read_committed, read_manifest

TOP_LABELS = 20


class NotCommitted(SinkError):
    """The output holds no committed run, so there is nothing to report (`batchscore inspect`
    exits 6: not a failure of the output, just nothing there yet)."""


def inspect_output(output: str) -> dict:
    """The report of the committed run in `output`.

    Raises:
        NotCommitted: `output` holds no committed run (no `_SUCCESS`), or does not exist.
        SinkError: the committed run's manifest or files cannot be read.
    """
    manifest = read_manifest(output)
    if manifest is None:
        fs, root = fsutil.resolve(output)
        if fsutil.is_local(fs) and not fs.exists(root):
            raise NotCommitted(f"{output}: no committed run ({SUCCESS} is missing): there is no such folder "
                               f"({fsutil.full_uri(fs, root)})")
        raise NotCommitted(f"{output}: no committed run ({SUCCESS} is missing); "
                           f"a run in progress or one that failed keeps its files under {STAGING}/")
    table = read_committed(output)
    errors = table.column("error_code")
    error_rows = table.num_rows - errors.null_count
    by_code = collections.Counter(c for c in errors.to_pylist() if c is not None)
    top1 = pc.list_element(table.filter(pc.is_null(table.column("error"))).column("labels"), 0).to_pylist()
    histogram = collections.Counter(top1)
    counts = manifest["counts"]
    found = {"rows": table.num_rows, "scored": table.num_rows - error_rows, "errors": error_rows,
             "errors_by_code": dict(sorted(by_code.items()))}
    mismatches = {k: {"manifest": counts.get(k), "files": v} for k, v in found.items() if counts.get(k) != v}
    return {
        "output": output,
        "run_id": manifest["run_id"],
        "model": manifest["model"]["tag"],
        "model_type": manifest["model"]["model_type"],
        **found,
        "top1_labels": dict(histogram.most_common(TOP_LABELS)),
        "distinct_top1_labels": len(histogram),
        "images_per_second": manifest["timings"]["images_per_second"],
        "total_seconds": manifest["timings"]["total_seconds"],
        "files": len(manifest["files"]),
        "started_at": manifest.get("started_at"),
        "finished_at": manifest.get("finished_at"),
        "resumed": manifest.get("attempt", {}).get("resumed", False),
        "mismatches": mismatches,
    }


def format_report(report: dict) -> str:
    codes = ", ".join(f"{k}={v}" for k, v in report["errors_by_code"].items()) or "none"
    lines = [
        f"run {report['run_id']} in {report['output']}",
        f"model: {report['model']} ({report['model_type']})",
        f"rows: {report['rows']}  scored: {report['scored']}  errors: {report['errors']} ({codes})",
        f"throughput: {report['images_per_second']:.1f} images/s; total {report['total_seconds']:.1f}s; "
        f"{report['files']} part file(s); {report['started_at']} → {report['finished_at']}"
        + ("; resumed" if report["resumed"] else ""),
        f"top-1 labels ({report['distinct_top1_labels']} distinct):",
    ]
    width = max((len(k) for k in report["top1_labels"]), default=0)
    most = max(report["top1_labels"].values(), default=1)
    for label, n in report["top1_labels"].items():
        lines.append(f"  {label:<{width}}  {n:>7}  {'#' * max(1, round(30 * n / most))}")
    for key, m in report["mismatches"].items():
        lines.append(f"MISMATCH {key}: manifest says {m['manifest']}, the files hold {m['files']}")
    return "\n".join(lines)
