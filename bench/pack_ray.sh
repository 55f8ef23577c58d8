#!/usr/bin/env bash
# Packs Ray (and the few packages it needs that a torch + transformers host lacks) for Python
# 3.12 on x86-64 Linux into bench/vendor/ray-py312.tar.xz, for `bench/gpu.sh` on a GPU host
# that has no Ray and no package registry (at most 64 MiB may be shipped there; this is ~30).
#
#   bash bench/pack_ray.sh            # here, with a registry; then ship bench/vendor/ along
#
# The wheels are unpacked, not installed: gpu.sh puts the tree on PYTHONPATH. Left out: the
# parts batchscore never imports (Ray's Java jars, RLlib, Tune's and Serve's examples and the
# dashboard's web build), which make up most of the 75.6 MiB wheel.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/vendor"
PY="${PYTHON:-$HERE/../.venv/bin/python}"
RAY_VERSION="${RAY_VERSION:-$("$PY" -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Pure-Python or abi3 packages, and the cp312 builds of the rest (rpds-py, msgpack).
"$PY" -m pip download -q --dest "$WORK/wheels" --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any \
    "ray==$RAY_VERSION" click jsonschema jsonschema-specifications referencing rpds-py attrs msgpack protobuf \
    requests urllib3 idna certifi charset-normalizer
mkdir -p "$WORK/site"
for w in "$WORK"/wheels/*.whl; do
    "$PY" -m zipfile -e "$w" "$WORK/site"
done
rm -rf "$WORK/site/ray/jars" "$WORK/site/ray/rllib" "$WORK/site/ray/dashboard/client/build" \
       "$WORK/site/ray/serve" "$WORK/site/ray/tune/examples" "$WORK/site/ray/core/src/ray/raylet/raylet.debug" \
       "$WORK/site"/*.dist-info/RECORD
find "$WORK/site" -name '__pycache__' -prune -exec rm -rf {} +
chmod +x "$WORK"/site/ray/core/src/ray/*/* 2>/dev/null || true  # zipfile drops the executable bits
find "$WORK/site/ray" -type f \( -name 'gcs_server' -o -name 'raylet' -o -name '*.so' \) -exec chmod +x {} +
mkdir -p "$OUT"
tar -C "$WORK/site" -cJf "$OUT/ray-py312.tar.xz" .
ls -l "$OUT/ray-py312.tar.xz"
echo "packed Ray $RAY_VERSION for Python 3.12: $(du -sm "$WORK/site" | cut -f1) MiB unpacked"
