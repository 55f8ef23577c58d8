"""Feedback for the people who run it: `batchscore.score` from Python shows its
progress (a tqdm bar in Jupyter or on a terminal, log lines otherwise) and its log lines
without the CLI's logging setup, never twice; messages in the caller's terms; Ray's noise
left out of the log and no ANSI codes in a non-TTY one; an ETA from the recent rate; one
final progress line; a summary whose rate is its rows over its seconds.

Only `test_python_api_shows_progress_and_logs_once` starts Ray (in a subprocess, as a
notebook's kernel would: its own process, stderr not a terminal).
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from batchscore.driver import progress, runtime
from batchscore.driver.progress import Progress
from batchscore.outputs.result import RunResult

ROOT = Path(__file__).parent.parent
SAMPLES = ROOT / "batchscore" / "demo" / "samples"
ANSI = re.compile(r"\x1b\[")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]


# -- Progress: ETA, final line -----------------------------------------------------------------

def test_eta_uses_the_recent_rate_not_the_start_up():
    clock = FakeClock()
    p = Progress(total=100, every_seconds=10, clock=clock)
    clock.now = 100.0  # Ray and the model took 100 s; the first part brings 10 rows
    p.update(10, 0)
    assert p.line() == "progress: 10/100 images (10.0%), 0 errors, eta ?"  # no rate from one part
    clock.now = 102.0
    p.update(20, 1)
    # 20 rows in the 2 s since the first part: 10 images/s, 70 rows left. From the start it
    # would have been 30 / 102 s = 0.3 images/s and an ETA of 238 s.
    assert p.line() == "progress: 30/100 images (30.0%), 1 errors, 10.0 images/s, eta 7s"


def test_parts_that_come_together_give_no_rate():
    clock = FakeClock()
    p = Progress(total=360, every_seconds=10, clock=clock)
    clock.now = 9.0
    p.update(100, 0)
    clock.now = 9.004  # the next part 4 ms later: 25,000 images/s is noise, not a rate
    p.update(28, 0)
    assert p.recent_rate is None and p.line() == "progress: 128/360 images (35.6%), 0 errors, eta ?"
    clock.now = 11.0
    p.update(100, 0)
    assert p.line() == "progress: 228/360 images (63.3%), 0 errors, 64.0 images/s, eta 2s"
    assert p.steady_rate == 0.0  # three parts within 2 s of an 11 s run: too little of it for a steady rate
    clock.now = 20.0
    p.update(132, 0)
    assert p.steady_rate == pytest.approx((360 - 100) / (20 - 9))


def test_eta_follows_the_pace_of_the_last_minute():
    clock = FakeClock()
    p = Progress(total=5000, every_seconds=10, clock=clock)
    for t in range(10, 110, 10):  # 10 rows/s for 100 s
        clock.now = float(t)
        p.update(100, 0)
    for t in range(120, 240, 20):  # then 2.5 rows/s, up to t=220
        clock.now = float(t)
        p.update(50, 0)
    # From the last part at or before 60 s ago (t=160, 1,150 rows) to now (1,300 rows).
    assert p.recent_rate == pytest.approx(150 / 60)
    assert p.line() == f"progress: 1300/5000 images (26.0%), 0 errors, 2.5 images/s, eta {3700 / 2.5:.0f}s"
    assert p.steady_rate == pytest.approx((1300 - 100) / (220 - 10))  # the run-long steady rate, unchanged


def test_the_final_progress_line_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="batchscore")
    clock = FakeClock()
    p = Progress(total=30, every_seconds=0, clock=clock)
    for t in (5.0, 6.0, 7.0):
        clock.now = t
        p.update(10, 0)
    clock.now = 8.0
    p.finish()
    p.finish()
    lines = progress_lines(caplog)
    finals = [line for line in lines if line.startswith("progress: 30/30")]
    assert finals == ["progress: 30/30 images (100.0%), 0 errors in 8.0s, 3.8 images/s"], lines
    assert lines == ["progress: 10/30 images (33.3%), 0 errors, eta ?",
                     "progress: 20/30 images (66.7%), 0 errors, 10.0 images/s, eta 1s", finals[0]]


def test_a_line_comes_while_a_part_is_awaited(caplog):
    """Rows are counted as parts come, minutes apart on a CPU: `tick` (a thread calls it every
    progress_seconds) repeats the line with how long the run has waited, and stays quiet when
    a line was logged lately or all rows are in."""
    caplog.set_level(logging.INFO, logger="batchscore")
    clock = FakeClock()
    p = Progress(total=100, every_seconds=10, clock=clock)
    clock.now = 9.0
    p.tick()
    assert progress_lines(caplog) == []  # not yet every_seconds
    clock.now = 10.0
    p.tick()
    clock.now = 12.0
    p.update(50, 0)  # 2 s after the last line: counted, not logged
    clock.now = 19.0
    p.tick()
    clock.now = 47.0
    p.tick()
    clock.now = 60.0
    p.update(50, 0)
    clock.now = 90.0
    p.tick()
    assert progress_lines(caplog) == ["progress: 0/100 images (0.0%), 0 errors, eta ? (first part: 10s so far)",
                                      "progress: 50/100 images (50.0%), 0 errors, eta ? (next part: 35s so far)"]


def test_ticking_logs_from_a_thread_until_the_block_ends(caplog):
    caplog.set_level(logging.INFO, logger="batchscore")
    p = Progress(total=10, every_seconds=0.05)
    deadline = time.monotonic() + 30
    with p.ticking():
        while not progress_lines(caplog):
            assert time.monotonic() < deadline, "no line from the progress thread"
            time.sleep(0.01)
    assert progress_lines(caplog)[0].startswith("progress: 0/10 images (0.0%), 0 errors, eta ? (first part: ")
    assert not any(t.name == "batchscore-progress" for t in threading.enumerate())


def test_unknown_total_has_no_eta(caplog):
    clock = FakeClock()
    p = Progress(total=None, every_seconds=10, clock=clock)
    clock.now = 1.0
    p.update(4, 0)
    clock.now = 3.0
    p.update(4, 0)
    assert p.line() == "progress: 8 images, 0 errors, 2.0 images/s"
    p.finish()
    assert p.line() == "progress: 8 images, 0 errors in 3.0s, 2.7 images/s"


def test_a_bar_shows_progress_and_the_log_keeps_only_the_final_line(caplog):
    caplog.set_level(logging.INFO, logger="batchscore")
    out = io.StringIO()
    clock = FakeClock()
    p = Progress(total=20, every_seconds=0, clock=clock, bar=tqdm(total=20, file=out, unit="images"))
    clock.now = 1.0
    p.update(10, 1)
    clock.now = 2.0
    p.update(10, 0)
    p.total = 20  # assignable, as resume does
    p.finish()
    assert "20/20" in out.getvalue() and "errors=1" in out.getvalue()
    assert progress_lines(caplog) == ["progress: 20/20 images (100.0%), 1 errors in 2.0s, 10.0 images/s"]


def test_python_on_a_terminal_gets_a_tqdm_bar(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_isatty", lambda stream: True)
    with progress.python_caller():
        p = Progress(total=3, every_seconds=10)
        p.update(3, 0)
        p.finish()
    assert "3/3" in capsys.readouterr().err
    with progress.cli_terms(), progress.python_caller():  # the CLI keeps its log lines
        assert Progress(total=3, every_seconds=10).bar is None


# -- messages in the caller's terms; the summary ---------------------------------------------

def test_already_committed_says_overwrite_in_the_callers_terms():
    result = RunResult(status="already_committed", run_id="r1", output="runs/x", manifest_uri="runs/x/m", rows=3,
                       errors=0)
    assert "pass overwrite=True to score again" in result.summary()
    with progress.cli_terms():
        assert "pass --overwrite to score again" in result.summary()
    assert progress.overwrite_hint() == "overwrite=True"


def test_summary_rate_is_rows_over_the_seconds_on_the_line():
    result = RunResult(status="committed", run_id="r1", output="o", manifest_uri="o/m", rows=360, errors=0,
                       seconds=16.2, images_per_second=46.4)  # the scoring part's rate
    line = result.summary().splitlines()[0]
    m = re.search(r"(\d+) rows.* in ([\d.]+)s, ([\d.]+) images/s$", line)
    assert m, line
    rows, seconds, rate = int(m.group(1)), float(m.group(2)), float(m.group(3))
    assert rate == pytest.approx(rows / seconds, abs=0.05)
    assert "46.4" not in line


# -- Ray's log noise -----------------------------------------------------------------------

def test_worker_lines_have_no_ansi_codes_when_stderr_is_not_a_terminal(monkeypatch):
    from ray._private import worker

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    runtime.quiet_ray_logs()
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    printed = io.StringIO()
    # Ray's own printer of workers' lines in the driver, as its log monitor calls it.
    worker.print_worker_logs({"pid": 42, "ip": "127.0.0.1", "localhost": "127.0.0.1", "actor_name": "MapWorker",
                              "lines": ["INFO batchscore.inference.predict: predictor ready"]}, printed)
    assert printed.getvalue() == "(MapWorker pid=42) INFO batchscore.inference.predict: predictor ready\n"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # what Ray prints without the setting
    printed = io.StringIO()
    worker.print_worker_logs({"pid": 42, "lines": ["x"]}, printed)
    assert ANSI.search(printed.getvalue())


def test_rays_known_noise_is_dropped(caplog):
    runtime.quiet_ray_logs()
    runtime.quiet_ray_logs()  # idempotent: one filter per logger
    caplog.set_level(logging.INFO)
    for name, start in runtime.RAY_NOISE:
        logger = logging.getLogger(name)
        assert sum(isinstance(f, runtime._Drop) for f in logger.filters) == 1
        logger.warning("%s. To enable, set ...", start)
        logger.warning("another message")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["another message"] * len(runtime.RAY_NOISE)


# -- end to end: the Python API as a notebook calls it --------------------------------------

SCRIPT = textwrap.dedent("""
    import logging, sys
    import batchscore
    from batchscore.driver import progress

    progress._in_notebook = lambda: True  # as in Jupyter: tqdm.auto draws the bar (here as text)
    inputs, out = sys.argv[1:-1], sys.argv[-1]
    result = batchscore.score(input=inputs, output=out, batch_size=8, progress_seconds=0.01)
    print("SUMMARY", result.summary().splitlines()[0], flush=True)
    # The caller now sets up logging: batchscore's lines go there, once.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="CALLER %(name)s: %(message)s")
    again = batchscore.score(input=inputs, output=out, top_k=3)
    print("AGAIN", again.summary(), flush=True)
""")


def test_python_api_shows_progress_and_logs_once(tmp_path):
    inputs = [str(SAMPLES / f) for f in ("digit-0000.png", "digit-0001.png", "digit-0002.png")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *inputs, str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    err = proc.stderr
    assert proc.returncode == 0, err[-4000:]
    # the bar, and one final progress line in the log
    assert re.search(r"batchscore: +100%.*3/3", err), err
    assert err.count("progress: 3/3 images (100.0%)") == 1, err
    # the library's own lines without any logging setup, each once
    assert err.count("INFO batchscore: listed 3 inputs") == 1, err
    # Ray's noise: none of it, and no colour codes in this non-TTY log
    assert not ANSI.search(err), err
    for noise in ("Progress bars disabled", "Token authentication is enabled"):
        assert noise not in err, err
    assert err.count("expected: Ray's 'E ... core_worker.cc") <= 1
    # the summary's rate is its rows over its seconds
    m = re.search(r"SUMMARY committed run \S+: 3 rows.* in ([\d.]+)s, ([\d.]+) images/s", proc.stdout)
    assert m and float(m.group(2)) == pytest.approx(3 / float(m.group(1)), abs=0.06), proc.stdout
    # the caller's logging: the no-op's lines once, through its handler; Python's terms
    changed = [line for line in err.splitlines() if "committed run was made with other settings" in line]
    assert len(changed) == 1 and changed[0].startswith("CALLER batchscore:"), err
    assert "pass overwrite=True to score again" in changed[0]
    assert "AGAIN already committed" in proc.stdout and "pass overwrite=True" in proc.stdout
    assert "--overwrite" not in err + proc.stdout
