#!/usr/bin/env bash
# Install step for `toolkit export`: unpack llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py,
# conversion/, gguf-py/) from the pinned llama-cpp-python sdist on PyPI, sha256-checked, into
# ~/.cache/toolkit/llama.cpp-<version> (or DEST). Pin and details: toolkit/llamacpp.py.
#   scripts/fetch_llama_cpp.sh [DEST]
set -euo pipefail
exec python -m toolkit.llamacpp fetch "$@"
