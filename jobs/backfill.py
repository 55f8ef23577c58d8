"""Backfill: score every date from --start to --end, each its own committed partition.

    ray job submit --working-dir . -- python jobs/backfill.py --config jobs/configs/nightly.yaml \
        --start 2026-11-01 --end 2026-11-23 [--parallel 2]

Re-running skips committed dates and resumes the rest. Prints one line per partition and a
table at the end, with each partition's drift against the previous committed one (PSI, JS
divergence, changes in error rate and mean top-1 probability, the figures flagged); exits 0
when every date is committed, else 4 (the failed dates are listed).
From a notebook: `batchscore.backfill(config, dates)` (examples/backfill.ipynb).
"""

from __future__ import annotations

import argparse
import sys

from batchscore.cli import EXIT_FAILED, EXIT_OK, run_command


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    parser.add_argument("--end", required=True, help="last date, YYYY-MM-DD (included)")
    parser.add_argument("--parallel", type=int, default=1, help="partitions scored at once")
    args, rest = parser.parse_known_args(argv)
    failed: list[str] = []

    def backfill(config):
        from batchscore import schedule

        frame = schedule.backfill(config, schedule.date_range(args.start, args.end), parallel=args.parallel)
        print(frame.drop(columns=["output", "drift"]).to_string(index=False))  # drift: each against the date before
        failed.extend(frame.loc[frame["status"] == "failed", "partition"])
        return None

    code = run_command(["score", *rest], backfill)
    if code == EXIT_OK and failed:
        print(f"failed partitions: {', '.join(failed)} (re-run the same command to resume them)", file=sys.stderr)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
