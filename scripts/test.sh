#!/usr/bin/env bash
# Run the whole test suite, setting up .venv/ first if it is missing or out of date.
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -k decode    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-demo
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
