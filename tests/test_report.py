"""The run report and drift: three nightly partitions of the demo digits, scored by one
backfill (each compared with the one before), the second with only three digits (drift
flagged), the third identical to the second (PSI ~ 0); `nightly`, `inspect --json` and the
`_report.html` every run writes, opened in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import batchscore
from batchscore import schedule
from batchscore.demo import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
DAYS = ["2026-11-20", "2026-11-21", "2026-11-22"]


@pytest.fixture(scope="module")
def partitions(ray_session, tmp_path_factory):
    """dt=2026-11-20: 30 digits of every class; 11-21: 24 digits of 0, 1 and 2 only, and a
    corrupt file; 11-22: the same files as 11-21."""
    tmp = tmp_path_factory.mktemp("nightly")
    with open(SAMPLES / "labels.csv", newline="") as f:
        truth = {r["file"]: r["label"] for r in csv.DictReader(f)}
    mixed = list(truth)[:30]
    three = [n for n in truth if truth[n] in ("0", "1", "2")][:24]
    for day, names in zip(DAYS, (mixed, three, three)):
        folder = tmp / "images" / f"dt={day}"
        folder.mkdir(parents=True)
        for name in names:
            shutil.copy(SAMPLES / name, folder / name)
        if day != DAYS[0]:
            (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    config = batchscore.ScoreConfig(input=(str(tmp / "images" / "dt={date}"),), output=str(tmp / "scores" / "dt={date}"),
                                     label_source=str(SAMPLES / "labels.csv"), top_k=3)
    frame = batchscore.backfill(config, DAYS)
    return config, frame


def test_backfill_returns_drift_against_the_previous_partition(partitions):
    _, frame = partitions
    rows = {r["partition"]: r for r in frame.to_dict("records")}
    print(frame.drop(columns=["output", "drift"]).to_string(index=False))
    assert list(frame["status"]) == ["committed"] * 3
    first, shifted, same = (rows[d] for d in DAYS)
    assert pd.isna(first["baseline"]) and first["drift_flagged"] == []
    assert shifted["baseline"].endswith(f"dt={DAYS[0]}")
    assert {"psi", "js"} <= set(shifted["drift_flagged"])
    assert shifted["psi"] > 1.0 and shifted["js"] > 0.3
    assert "error_rate" in shifted["drift_flagged"]  # 1 of 25 rows against none
    print(f"FIGURE drift, three digits against all ten: PSI {shifted['psi']:.3f}, JS {shifted['js']:.3f}, "
          f"error rate {shifted['error_rate_change']:+.3f}, mean top-1 {shifted['confidence_change']:+.3f}")
    assert same["baseline"].endswith(f"dt={DAYS[1]}")
    assert abs(same["psi"]) < 1e-9 and abs(same["js"]) < 1e-9 and same["drift_flagged"] == []
    print(f"FIGURE drift, identical partitions: PSI {same['psi']:.2e}, JS {same['js']:.2e}")


def test_nightly_result_carries_drift(partitions):
    config, _ = partitions
    result = schedule.nightly(config, DAYS[1])  # committed already: a no-op, still compared
    assert result.status == "already_committed"
    assert result.drift["baseline"].endswith(f"dt={DAYS[0]}")
    assert {"psi", "js"} <= set(result.drift["flagged"])
    assert "drift vs" in result.summary() and "FLAGGED" in result.summary()


def test_inspect_json_carries_drift_and_evaluation(partitions):
    config, _ = partitions
    out = config.output.format(date=DAYS[1])
    proc = subprocess.run([sys.executable, "-m", "batchscore.cli", "inspect", out, "--json"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["drift"]["baseline"].endswith(f"dt={DAYS[0]}")  # the run's baseline, from its manifest
    assert found["drift"]["figures"]["psi"]["flagged"] and found["drift"]["figures"]["js"]["flagged"]
    assert found["evaluation"]["rows"] == 24 and found["evaluation"]["error_rows"] == 0
    # --baseline picks another reference: against itself, nothing drifts
    proc = subprocess.run([sys.executable, "-m", "batchscore.cli", "inspect", out, "--json", "--baseline", out],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert json.loads(proc.stdout)["drift"]["flagged"] == []


def test_report_in_headless_chromium(partitions, tmp_path):
    from chromium import executable, open_page

    if executable() is None:
        pytest.fail("chromium is not installed: run `bash scripts/setup.sh` (apt-get install chromium)")
    config, _ = partitions
    out = Path(config.output.format(date=DAYS[1]))
    page = out / "_report.html"  # written by the run itself, after its commit
    assert page.exists()
    body = page.read_text()
    for needle in ("<script", "<link", "src='http", 'src="http', "url(http"):
        assert needle not in body, needle
    manifest = json.loads((out / "_manifest.json").read_text())
    shot = tmp_path / "report.png"
    seen = open_page(page.as_uri(), shot)
    print(f"SCREENSHOT {shot}")
    assert seen["console_errors"] == [], seen["console_errors"]
    assert all(u.startswith(("file:", "data:", "about:")) for u in seen["requests"]), seen["requests"]
    text = seen["text"]
    assert manifest["run_id"] in text
    assert "Counts" in text and "rows\t25" in text and "scored\t24" in text and "errors\t1" in text
    assert "Drift against the baseline" in text and "FLAGGED" in text and "psi" in text
    assert "Evaluation against known labels" in text and "decode." in text  # the error row's cell
    assert shot.stat().st_size > 20_000
    os.environ.get("CI") or print(f"open {shot} to look at it")


# -- without Ray: committed runs written with the library's own functions -------------------------


def commit_run(out: Path, rows: list[tuple], *, labels=("can", "carton", "jar"), tag="ckpt-a@sha256:aaaa",
               weights="a" * 64, multi_label=True, label_source=None, baseline=None) -> dict:
    """Commits a run of `rows` (id, labels or None for an error row, probs) into `out` as
    `score` would: parts through `write.conform`/`put_part` in two files, the manifest's
    sections from `evaluation.manifest_sections`, then `commit`. Returns the manifest."""
    import pyarrow as pa

    from batchscore.config import ScoreConfig
    from batchscore.inference import postprocess
    from batchscore.outputs import write
    from batchscore.outputs.commit import commit
    from batchscore.outputs.staging import Staging
    from batchscore.reporting import evaluation

    run_id = f"run-{tag[:6]}-{len(rows)}"
    config = ScoreConfig(input=("x",), output=str(out), label_source=label_source, baseline=baseline)
    spec = evaluation.spec_for(config.label_source, config.label_column, labels, multi_label)
    staging = Staging(str(out), run_id, info={"run_id": run_id})
    parts = []
    for start in range(0, len(rows), max(1, len(rows) // 2 + 1)):
        chunk = rows[start:start + len(rows) // 2 + 1]
        batch = pa.table({
            "id": [r[0] for r in chunk],
            "labels": pa.array([r[1] for r in chunk], pa.list_(pa.string())),
            "probs": pa.array([r[2] for r in chunk], pa.list_(pa.float32())),
            "error": [None if r[1] is not None else "decode.truncated: broken" for r in chunk],
            "error_code": [None if r[1] is not None else "decode.truncated" for r in chunk],
            "meta": [json.dumps({"source": r[0], "index": start + i, "passthrough": {}}) for i, r in enumerate(chunk)],
        })
        table, stats = write.conform(batch, write.PartSpec(output=str(out), run_id=run_id, model=tag, evaluate=spec))
        parts.append(write.put_part(staging.fs, staging.dir, run_id, table, stats))
    errors = sum(p["errors"] for p in parts)
    by_code: dict = {}
    for p in parts:
        for k, v in p["by_code"].items():
            by_code[k] = by_code.get(k, 0) + v
    thresholds = postprocess.run_thresholds(config.threshold, config.thresholds, labels, multi_label)
    manifest = {
        "run_id": run_id, "config": config.to_dict(),
        "model": {"tag": tag, "model_type": "vit", "weights_sha256": weights, "num_labels": len(labels)},
        "counts": {"inputs": len(rows), "rows": len(rows), "scored": len(rows) - errors, "errors": errors,
                   "errors_by_code": by_code},
        "files": [{"name": p["name"], "rows": p["rows"], "bytes": p["bytes"]} for p in parts],
        "timings": {"images_per_second": 10.0, "total_seconds": 1.0, "steady_images_per_second": 0.0},
        "attempt": {"resumed": False}, "started_at": "2026-11-20T00:00:00+00:00",
        "finished_at": "2026-11-20T00:00:01+00:00",
        **evaluation.manifest_sections(parts, labels, 0, thresholds, spec),
    }
    commit(staging, [p["name"] for p in parts], manifest)
    return manifest


class _Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli_run(capsys, caplog):
    """`batchscore ...` in this process (no interpreter start-up): exit code, stdout, and the
    log lines (the CLI's stderr)."""
    from batchscore import cli

    def run(*argv):
        caplog.clear()
        capsys.readouterr()
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return _Ran(code, out, err + caplog.text)

    return run


MULTI = [("a.jpg", ["can", "jar"], [0.9, 0.6]), ("b.jpg", [], []), ("c.jpg", ["carton"], [0.7]),
         ("d.jpg", [], []), ("e.jpg", None, None), ("f.jpg", ["can"], [0.8])]


def test_inspect_multi_label_run_with_empty_label_rows(tmp_path, cli_run):
    """Rows with `labels=[]` (none above its threshold) are allowed: `inspect` counts them as
    "(none)" (text and --json), and the report renders."""
    from batchscore.reporting import report

    out = tmp_path / "out"
    commit_run(out, MULTI)
    found = report.inspect_output(str(out))
    assert found["top1_labels"] == {"can": 2, "(none)": 2, "carton": 1}
    assert found["scored"] == 5 and found["errors"] == 1 and found["mismatches"] == {}
    assert "(none)" in report.format_report(found)
    proc = cli_run("inspect", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["top1_labels"]["(none)"] == 2 and json.loads(proc.stdout)["drift"] is None
    proc = cli_run("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "(none)" in proc.stdout
    assert "Samples" in report.render(str(out))


def test_drift_flags_a_model_change(tmp_path, cli_run):
    """A baseline scored by another model: `model_changed` with both tags, in `--json`, the
    text and the report; the same model: false."""
    from batchscore.reporting import drift, report

    commit_run(tmp_path / "old", MULTI, tag="ckpt-a@sha256:aaaa", weights="a" * 64)
    commit_run(tmp_path / "new", MULTI, tag="ckpt-b@sha256:bbbb", weights="b" * 64)
    commit_run(tmp_path / "same", MULTI[::-1], tag="ckpt-a@sha256:aaaa", weights="a" * 64)
    found = drift.against(str(tmp_path / "new"), str(tmp_path / "old"))
    assert found["model_changed"] is True and found["flagged"] == []  # same rows: no data drift, a new model
    assert found["models"] == {"current": "ckpt-b@sha256:bbbb", "baseline": "ckpt-a@sha256:aaaa"}
    same = drift.against(str(tmp_path / "same"), str(tmp_path / "old"))
    assert same["model_changed"] is False and same["flagged"] == []
    text = report.format_report(report.inspect_output(str(tmp_path / "new"), baseline=str(tmp_path / "old")))
    assert "MODEL CHANGED" in text and "ckpt-a@sha256:aaaa" in text and "ckpt-b@sha256:bbbb" in text
    page = report.render(str(tmp_path / "new"), str(tmp_path / "old"))
    assert "id='model-changed'" in page and "ckpt-a@sha256:aaaa" in page
    proc = cli_run("inspect", str(tmp_path / "new"), "--json", "--baseline", str(tmp_path / "old"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["drift"]["model_changed"] is True


def test_explicit_baseline_without_a_committed_run_is_an_error(tmp_path, cli_run):
    """`--baseline` naming an output with no committed run: exit 6 naming it (inspect and
    report), never `drift` without `flagged`; a recorded baseline since removed: drift null."""
    from batchscore.reporting import drift

    missing = tmp_path / "nothing-here"
    commit_run(tmp_path / "out", MULTI, baseline=str(missing))  # as if its baseline was removed since
    for argv in (["inspect", str(tmp_path / "out"), "--json"], ["report", str(tmp_path / "out"), "--out",
                                                                 str(tmp_path / "r.html")]):
        proc = cli_run(*argv, "--baseline", str(missing))
        assert proc.returncode == 6, (argv, proc.returncode, proc.stderr)
        assert f"baseline {missing}: no committed run" in proc.stderr and proc.stdout == ""
    proc = cli_run("inspect", str(tmp_path / "out"), "--json")  # the run's own (recorded) baseline, gone
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["drift"] is None
    with pytest.raises(batchscore.ConfigError, match="no committed run"):
        drift.check_baseline(str(missing))
    assert drift.against(str(tmp_path / "out"), str(missing), required=False) is None


def test_inspect_says_how_many_rows_were_unlabelled(tmp_path):
    """The evaluation line (inspect's text and the run summary) names the unlabelled rows."""
    from batchscore.outputs.result import RunResult
    from batchscore.reporting import report

    truth = tmp_path / "labels.csv"
    truth.write_text("file,label\na.jpg,can\nb.jpg,jar\nc.jpg,carton\n")
    rows = [("a.jpg", ["can", "jar"], [0.7, 0.2]), ("b.jpg", ["can", "jar"], [0.6, 0.3]),
            ("c.jpg", ["carton", "can"], [0.9, 0.1]), ("d.jpg", ["jar", "can"], [0.5, 0.4]),
            ("e.jpg", ["jar", "can"], [0.8, 0.1])]
    manifest = commit_run(tmp_path / "out", rows, multi_label=False, label_source=str(truth))
    assert manifest["evaluation"]["unlabelled"] == 2
    text = report.format_report(report.inspect_output(str(tmp_path / "out")))
    assert "66.7% (2/3 labelled, 2 unlabelled)" in text, text
    summary = RunResult("committed", "r", "o", "m", 5, 0, evaluation=manifest["evaluation"]).summary()
    assert "(2/3 labelled, 2 unlabelled)" in summary
