#!/usr/bin/env bash
# Set up batchscore on a fresh machine: create .venv/, install the project (with its test
# extras), then run the main job on the embedded default (`batchscore demo`).
#   bash scripts/setup.sh             # install + demo
#   bash scripts/setup.sh --no-demo   # install only (used by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: expected Python 3.11 as $PYTHON (the pinned torch wheels are for 3.11), got $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=".venv/.batchscore-installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  # torch first, pinned: pip takes these builds from this machine's disk (uv/poetry would not).
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  # Every other dependency at the version it was tested with (constraints.txt).
  .venv/bin/pip install -q -c constraints.txt -e ".[test]"
  rm -f .venv/.batchscore-installed-* && touch "$stamp"
fi

# The report test opens _report.html in a real headless Chromium: the distribution's package.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (Debian package) for the report test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium is missing; the report test needs it (as root: apt-get install -y chromium)" >&2
  fi
fi

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/batchscore demo
fi
