"""Entry point for `ray job submit`: one scoring run, configured by a job file plus flags.

    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/<job>.yaml [overrides]

Any `batchscore score` flag is an override (e.g. `--input gs://... --output gs://... --top-k 3`).
Ray sets RAY_ADDRESS for the job, so the run joins the cluster instead of starting one.

Exit status, for schedulers: 0 committed or already committed; 2 bad job (config, inputs,
checkpoint); 3 error budget exceeded; 4 the run failed (infrastructure, output); 5 another run
holds the output. Nothing but 0 commits anything.
"""

from __future__ import annotations

import sys

from batchscore.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
