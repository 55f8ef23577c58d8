"""Whole-command seconds of `batchscore score` on 1, 10 and 360 demo images.

    .venv/bin/python bench/startup.py                      # 1, 10, 360 images, once each
    .venv/bin/python bench/startup.py --counts 10 --repeat 3
    .venv/bin/python bench/startup.py --tree /tmp/before     # another checkout (`git archive`)

Each run is a fresh `batchscore score` process (its own local Ray) on the first N demo
samples (batchscore/demo/samples) into a new output folder, with the shipped demo model. The
clock starts just before the process is started; lines are timed as they arrive on its
stdout and stderr. Per run it prints:

- whole: seconds from start to the process's exit;
- first row: to the `first rows after` log line (the first part's statistics reached the driver);
- summary: to the `committed run` line on stdout;
- exit after summary: from that line to the process's exit (Ray's shutdown, interpreter exit).

Goal on the 2-core machine: 10 images in <= 10 s whole, first row <= 5 s,
exit <= 2 s after the summary. docs/benchmarks.md holds the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "batchscore" / "demo" / "samples"


def images(n: int, folder: Path) -> Path:
    """The first n demo images, copied into `folder`."""
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
    if len(files) < n:
        raise SystemExit(f"--counts: expected at most {len(files)} demo images, got {n}")
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def run_once(inputs: Path, out: Path, tree: Path) -> dict:
    """One `batchscore score` process, importing batchscore from `tree`; the times at which its
    marks arrived."""
    command = [sys.executable, "-m", "batchscore.cli", "score", "--input", str(inputs), "--output", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(tree)  # the driver and Ray's workers import this tree's batchscore
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def watch(stream, names):
        for line in stream:
            lines.append(line)
            for name, text in names:
                if text in line and name not in marks:
                    marks[name] = time.monotonic() - started

    readers = [threading.Thread(target=watch, args=(proc.stdout, [("summary", "committed run")])),
               threading.Thread(target=watch, args=(proc.stderr, [("first_row", "first rows after")]))]
    for t in readers:
        t.start()
    code = proc.wait()
    whole = time.monotonic() - started
    for t in readers:
        t.join()
    if code != 0:
        raise SystemExit(f"batchscore exited {code}:\n{''.join(lines[-30:])}")
    return {"whole": whole, "first_row": marks.get("first_row"), "summary": marks.get("summary"),
            "exit_after_summary": whole - marks["summary"] if "summary" in marks else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 360])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose batchscore runs (default: this one)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"tree: {args.tree}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    print("| images | whole command (s) | first row (s) | summary (s) | exit after summary (s) |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bs-startup-") as tmp:
        for n in args.counts:
            inputs = images(n, Path(tmp) / f"in-{n}")
            for i in range(args.repeat):
                r = run_once(inputs, Path(tmp) / f"out-{n}-{i}", args.tree.resolve())
                fmt = lambda v: "?" if v is None else f"{v:.1f}"  # noqa: E731
                print(f"| {n} | {fmt(r['whole'])} | {fmt(r['first_row'])} | {fmt(r['summary'])} | "
                      f"{fmt(r['exit_after_summary'])} |", flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end")


if __name__ == "__main__":
    main()
