#!/usr/bin/env bash
# The main job on the shipped sample corpus, on a fresh machine: installs what it needs (.venv), then
#   prep -> train -> merge -> export (GGUF, Modelfile) -> eval
# into export/sample/. Without a GPU (or with PRESET=tiny-cpu) it trains a tiny random gpt-oss of the
# real architecture on the CPU in a few minutes: the adapter learns nothing useful, every stage runs
# for real. On a 24 GB GPU: PRESET=gpt-oss-20b-qlora; on 80 GB: PRESET=gpt-oss-20b-lora.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh all
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
preset="${PRESET:-tiny-cpu}"
if [ "$preset" = "tiny-cpu" ] && [ ! -f export/tiny/config.json ]; then
  toolkit tiny export/tiny          # the tiny-cpu preset's base model
fi
toolkit run corpora/zh-nan-moe-sample/sample.tsv --config "$preset" "$@"
