#!/usr/bin/env bash
# Issues 19 and 24 on the lent GPU machine: Gemma 3 270M adapters trained side by side, then scored there with
# transformers on the GPU (batched, greedy, float32; base + adapter merged at load), so that a grid of evals
# fits one device session. The GGUF route (llama.cpp, CPU) of the same adapters: bench/glossary_measure.sh.
#
#   bash bench/gemma_gpu.sh train     prep + train each of $VARIANTS in the background (setsid: they outlive
#                                     the call while the machine stays warm); returns at once
#   bash bench/gemma_gpu.sh measure   waits for the trainings, then the eval grid below; results in
#                                     $OUT/gemma-gpu.tgz (every eval folder, the train manifests and metrics)
#
# Variants (prep options; every one trained with --config gemma3-270m-gpu, its 1,200 steps of 32, and
# train.max_length=320 for room for the analysis and hints): chosen (the preset as it is, now without the
# reasoning line: prep.chat_format=template), analysis / hints / both (bench/glossary_measure.sh's glossary
# variants, issue 19).
# Eval grid, both directions: copy_bias 0 1 2 3 on the news tuning slice (lines 1001-1200) and on the MOE dev
# split (400); greedy and the slice-tuned bias on the news eval set (first 500); the base model greedy on news
# and MOE dev; issue 24's "before": the chosen adapter with the old decoding (a fixed cap of 96 tokens, no
# per-sentence limit, no repetition stop) on the slice and MOE dev. Never trains on the news file.
#
# Calls (python bench/gpu_pack.py calls real-model): 4 x `python3 bench/gpu_pack.py stash real-model` with
# carry [".gpu/real-model/pN"], then `bash bench/gemma_gpu.sh train` with carry [".gpu/real-model/p5"],
# then `bash bench/gemma_gpu.sh measure` (carry [".gpu/real-model/p5", ".gpu/evaldata"]; a call may run 10 minutes: re-run it, finished evals are
# kept).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: gemma_gpu.sh slices | train | measure}
if [ "$mode" = slices ]; then  # here: the news tuning slice (lines 1001-1200) and the first 500, with the header
  news=../shared/eval/zh-nan.heldout.tsv
  mkdir -p .gpu/evaldata && sed -n "1p;1002,1201p" $news > .gpu/evaldata/tune.tsv && head -501 $news > .gpu/evaldata/news500.tsv
  wc -l .gpu/evaldata/*.tsv; exit 0
fi
VARIANTS=${VARIANTS:-chosen analysis hints both}
WORK=${WORK:-/tmp/gm}
JOBS=${JOBS:-8}
BIASES=${BIASES:-0 1 2 3}
. bench/gpu_site.sh real-model
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$WORK" /tmp/bin
export TOOLKIT_CACHE=/tmp/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
printf '#!/bin/sh\nexec python3 -m toolkit "$@"\n' > /tmp/bin/toolkit && chmod +x /tmp/bin/toolkit
export PATH=/tmp/bin:$PATH
base=$(toolkit fetch gemma3-270m --find-links "$PACK/model" | head -1)
lex=("$SHARED/lexicons/itaigi/"*.csv "$SHARED/lexicons/moe-dialect-words/"*.csv)
glossary=(); for f in "${lex[@]}"; do glossary+=(--glossary "$f"); done
# the news eval file is not in the pack (evaluation only, never trained on): its two slices travel in
# .gpu/evaldata (`bash bench/gemma_gpu.sh slices` here), carried with the measure call
EVALDATA=${EVALDATA:-.gpu/evaldata}

. bench/glossary_variants.sh

if [ "$mode" = train ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  for v in $VARIANTS; do
    [ -f "$WORK/$v.done" ] && continue
    # shellcheck disable=SC2046
    setsid nohup bash -c "toolkit prep '$SHARED/corpora/zh-nan-moe/train.tsv' --config gemma3-270m-gpu \
        $(variant_prep "$v") --out '$WORK/$v/prep' --force && toolkit train '$WORK/$v/prep' --config gemma3-270m-gpu \
        --set 'train.base_model=\"$base\"' --set train.max_length=320 --set train.save_steps=0 --out '$WORK/$v/train' \
        --force && touch '$WORK/$v.done' || touch '$WORK/$v.failed'" > "$WORK/$v.log" 2>&1 < /dev/null &
  done
  sleep 60; tail -n 2 "$WORK"/*.log
  exit 0
fi

[ "$mode" = measure ] || { echo "usage: gemma_gpu.sh train | measure" >&2; exit 2; }
for v in $VARIANTS; do
  until [ -f "$WORK/$v.done" ] || [ -f "$WORK/$v.failed" ]; do sleep 5; done
  [ -f "$WORK/$v.failed" ] && { tail -5 "$WORK/$v.log"; exit 1; }
done
grep -h "train: .* steps in" "$WORK"/*.log || true
mkdir -p "$WORK/data" "$WORK/evals"
cp "$EVALDATA/tune.tsv" "$EVALDATA/news500.tsv" "$WORK/data/"
cp "$SHARED/corpora/zh-nan-moe/dev.tsv" "$WORK/data/moe.tsv"

gpu_eval() {  # NAME MODEL TEST DIRECTION BIAS [eval options]: one eval folder, skipped when done
  local name=$1 model=$2 test=$3 d=$4 b=$5; shift 5
  [ -f "$WORK/evals/$name/scores.json" ] && return 0
  toolkit eval "$WORK/data/$test.tsv" --model "$model" --backend transformers --config gemma3-270m-gpu \
    --set eval.device=cuda --set eval.dtype=float32 --set eval.batch_size=200 --set eval.copy_bias="$b" \
    --set eval.n_bootstrap=1000 --direction "$d" --out "$WORK/evals/$name" --force "$@" \
    > "$WORK/evals/$name.log" 2>&1 || echo "FAILED $name"
}
run_jobs() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done; }

for d in forward reverse; do  # the base model, greedy
  for t in news500 moe; do run_jobs; gpu_eval "base-$t-$d" "$base" "$t" "$d" 0 & done
done
for v in $VARIANTS; do
  hint=("${glossary[@]}"); case $v in hints|both) ;; *) hint+=(--set eval.glossary_hints=false) ;; esac
  for d in forward reverse; do for t in tune moe; do for b in $BIASES; do
    run_jobs; gpu_eval "$v-$t-$d-b$b" "$WORK/$v/train" "$t" "$d" "$b" "${hint[@]}" &
  done; done; done
done
for d in forward reverse; do for t in tune moe; do  # issue 24's before: the old decoding
  run_jobs; gpu_eval "chosen-olddecoding-$t-$d-b0" "$WORK/chosen/train" "$t" "$d" 0 --max-new-tokens 96 \
    --set eval.tokens_per_source_token=0 --set eval.repeat_max_ngram=0 &
done; done
wait
best_bias() {  # VARIANT DIRECTION: the bias with the best chrF on the tuning slice
  python3 - "$WORK/evals" "$1" "$2" $BIASES <<'EOF'
import json, sys
from pathlib import Path
root, v, d, *biases = sys.argv[1:]
def chrf(b):
    s = json.loads((Path(root) / f"{v}-tune-{d}-b{b}" / "scores.json").read_text())
    name = next(n for n in s["systems"] if n != "copy source")
    return s["systems"][name]["chrf"]["score"]
print(max(biases, key=chrf))
EOF
}
for v in $VARIANTS; do
  hint=("${glossary[@]}"); case $v in hints|both) ;; *) hint+=(--set eval.glossary_hints=false) ;; esac
  for d in forward reverse; do
    b=$(best_bias "$v" "$d" 2>/dev/null || echo 0)
    for bb in 0 "$b"; do run_jobs; gpu_eval "$v-news500-$d-b$bb" "$WORK/$v/train" news500 "$d" "$bb" "${hint[@]}" & done
  done
done
wait
grep -l FAILED "$WORK"/evals/*.log 2>/dev/null | head || true
(cd "$WORK" && tar czf "$OUT/gemma-gpu.tgz" --exclude='*.png' evals data/tune.tsv \
  $(ls -d */train/manifest.json */train/metrics.jsonl */train/train_config.json */prep/stats.json */prep/manifest.json 2>/dev/null) \
  ./*.log)
ls -la "$OUT"
