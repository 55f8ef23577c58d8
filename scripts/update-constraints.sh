#!/usr/bin/env bash
# Re-resolve every dependency to its newest allowed version, freeze them into
# constraints.txt, then run the whole suite against them. Commit constraints.txt only if the
# suite passes (and read the changelogs of what moved: a minor transformers release once
# changed its pipeline's top_k=None).
#   bash scripts/update-constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
fresh=$(mktemp -d)
"$PYTHON" -m venv "$fresh/venv"
"$fresh/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$fresh/venv/bin/pip" install -q -e ".[test]"
{
  sed -n '/^#/p' constraints.txt | sed "s/^# Frozen .*/# Frozen $(date -u +%Y-%m-%d) from the venv that passed the suite (Python 3.11, $(uname -m))./"
  "$fresh/venv/bin/pip" freeze --exclude-editable | grep -v '^batchscore'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$fresh"
git --no-pager diff --stat constraints.txt || true
rm -rf .venv && bash scripts/test.sh
