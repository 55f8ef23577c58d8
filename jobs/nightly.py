"""Nightly scoring of one date partition; safe to re-run (a committed date is a no-op, a failed
one resumes from its staged part files).

    ray job submit --working-dir . -- python jobs/nightly.py --config jobs/configs/nightly.yaml [--date YYYY-MM-DD]
    python jobs/nightly.py --config jobs/configs/nightly.yaml --date 2026-11-23      # without a cluster

The job file's `input` and `output` are templates holding `{date}`
(`gs://bucket/images/dt={date}/` -> `gs://bucket/scores/dt={date}/`); `--date` defaults to
yesterday (UTC). Other `batchscore score` flags override the job file. Exit status as
`jobs/score.py`. The partition is compared with the previous committed one (its `_report.html`,
and a `drift vs ...` line in the summary; `--json` prints the figures under `drift`).
"""

from __future__ import annotations

import argparse
import sys

from batchscore.cli import run_command


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--date", help="the partition, YYYY-MM-DD (default: yesterday, UTC)")
    args, rest = parser.parse_known_args(argv)

    def nightly(config):
        from batchscore import schedule

        return schedule.nightly(config, args.date)

    return run_command(["score", *rest], nightly)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
