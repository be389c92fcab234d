#!/usr/bin/env bash
# Create .venv and install the toolkit with the extras named in $1 (default: all,test).
# Used by scripts/demo.sh and scripts/test.sh; safe to re-run (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all,test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# On a machine without a GPU take the CPU build of torch (a plain `torch` pulls several GB of CUDA
# wheels); set TORCH_SPEC to choose another.
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
fi
python -m pip install -q "$TORCH_SPEC"
# llama-cpp-python builds from source (5-16 minutes on 2 cores the first time; pip caches the wheel).
# GGML_NATIVE=OFF keeps the build portable across CPUs.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
python -m pip install -q -e ".[${extras}]"
# llama.cpp's own GGUF converter, from the pinned llama-cpp-python sdist (sha256-checked), into the cache.
case ",${extras}," in
  *,all,*|*,export,*) python -m toolkit.llamacpp fetch >/dev/null ;;
esac
