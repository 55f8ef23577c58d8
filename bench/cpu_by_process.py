"""CPU seconds (and, with --pss, peak PSS) per process of a command's whole process tree.

    .venv/bin/python bench/cpu_by_process.py -- .venv/bin/batchscore score --input /tmp/bsbench/images-3000 \
        --output /tmp/out --model /tmp/bsbench/ckpt-vit-ti16 --overwrite

Samples /proc/<pid>/stat (user + system time) of every descendant every 0.25 s, which costs
far less than the PSS sampler of throughput.py, and prints, when the command exits, the wall
time, the CPU seconds of the tree against what the cores could give, and each process that
used more than 0.3 s. Ray renames its workers (`ray::MapWorker(...)` is the inference actor,
`ray::IDLE` a worker between tasks, here the read/decode worker), so the name shown is the
last one seen. A process that exits between two samples loses at most 0.25 s of its CPU time.
With --pss each process's PSS is also read once a second (smaps_rollup; about 50 ms of CPU
for batchscore's tree) and its peak printed, to see which process a run's memory grows in.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from throughput import (  # bench/ is on sys.path when run as a script
    descendants,
    pss_bytes,
)

HZ = os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], period: float = 0.25, pss: bool = False):
    """Runs `cmd`; returns (wall seconds, {pid: (name, CPU seconds)}, {pid: peak PSS MiB})."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    seen: dict[int, tuple[str, float]] = {}
    peaks: dict[int, float] = {}
    tick = 0
    while proc.poll() is None:
        tick += 1
        for pid in descendants(proc.pid):
            if pss and tick % round(1 / period) == 0:
                peaks[pid] = max(peaks.get(pid, 0.0), pss_bytes(pid) / 2**20)
            try:
                stat = open(f"/proc/{pid}/stat").read()
                cmdline = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            comm = stat[stat.find("(") + 1:stat.rfind(")")]
            name = comm if comm.startswith("ray::") else cmdline[:100] or seen.get(pid, (comm,))[0]
            seen[pid] = (name, (int(fields[11]) + int(fields[12])) / HZ)
        time.sleep(period)
    return time.monotonic() - start, seen, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pss", action="store_true", help="also print each process's peak PSS")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command to measure after --")
    wall, seen, peaks = measure(cmd, pss=args.pss)
    total = sum(cpu for _, cpu in seen.values())
    cores = os.cpu_count() or 1
    print(f"wall {wall:.1f} s; CPU {total:.1f} s of the {wall * cores:.0f} s that {cores} cores could give "
          f"({100 * total / (wall * cores):.0f}%)", file=sys.stderr)
    for pid, (name, cpu) in sorted(seen.items(), key=lambda kv: -kv[1][1]):
        if cpu > 0.3 or peaks.get(pid, 0) > 50:
            memory = f"  peak PSS {peaks[pid]:6.0f} MiB" if pid in peaks else ""
            print(f"{cpu:8.1f} s  {100 * cpu / total:4.0f}%{memory}  {pid:7d}  {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
