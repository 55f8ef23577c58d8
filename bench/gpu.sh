#!/usr/bin/env bash
# The GPU bench: one script for a host with one NVIDIA GPU and ~16 cores, where Python 3.12,
# torch, torchvision, transformers, pyarrow, pandas, pillow and fsspec are installed but Ray
# is not and no package registry can be reached. Runs in under 8 minutes, writes
# <out>/gpu-bench.json and <out>/gpu-bench.md (the table for docs/benchmarks.md).
#
#   bash bench/pack_ray.sh            # once, where a registry is: bench/vendor/ray-py312.tar.xz (~30 MiB)
#   bash bench/gpu.sh                 # on the GPU host, with bench/vendor/ shipped along
#   bash bench/gpu.sh --dry-run       # anywhere: CPU, a tiny ViT, 200 JPEGs; every step runs
#
# Ray: used as installed when `import ray` works; else unpacked from bench/vendor/ into
# <out>/site and put on PYTHONPATH; else the steps that need no Ray run (forward, decode,
# fidelity, fp16/fp32 agreement, transformers pipeline, nvidia-smi sampling) and batchscore's
# end-to-end step says why it was skipped. Other flags go to bench/gpu.py (--images, --out, ...).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="$ROOT/runs/gpu-bench"
DRY=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; ARGS+=("$1") ;;
        --out) OUT="$2"; ARGS+=("$1" "$2"); shift ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import ray" 2>/dev/null; then
    PACK="$HERE/vendor/ray-py$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")').tar.xz"
    if [ -f "$PACK" ]; then
        mkdir -p "$OUT/site"
        [ -f "$OUT/site/.unpacked" ] || { tar -C "$OUT/site" -xJf "$PACK" && touch "$OUT/site/.unpacked"; }
        # After the host's own packages' dirs? PYTHONPATH comes first; the pack holds only what
        # torch + transformers hosts lack (Ray, click, jsonschema, msgpack, protobuf, requests).
        export PYTHONPATH="$PYTHONPATH:$OUT/site"
        export PATH="$OUT/site/bin:$PATH"
        "$PY" -c "import ray; print('gpu.sh: Ray', ray.__version__, 'from', '$PACK')" || echo "gpu.sh: the packed Ray does not import here"
    else
        echo "gpu.sh: no Ray here and no $PACK: batchscore's end-to-end step will be skipped"
    fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# 470 s for the bench itself (then SIGINT: what was measured is written), under 8 minutes in all.
exec timeout -s INT -k 20 470 "$PY" "$HERE/gpu.py" "${ARGS[@]}"
