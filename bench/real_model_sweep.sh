#!/usr/bin/env bash
# Issue 10's sweep: several Gemma 3 270M LoRA variants trained side by side on the lent GPU (one small model
# leaves the H100 mostly idle), then each scored on a TUNING slice of the news test set, so that one variant
# and one decoding setting can be chosen without looking at the slice the README reports (its first 500
# sentences). Never trains on the test set: prep reads only the MOE dictionary corpus.
#
#   here:     bash bench/real_model_sweep.sh tune-slice                      writes .gpu/sweep/tune.tsv
#   device:   (the pack real-model of bench/gpu_pack.py: the four stash calls of bench/real_model_gpu.sh first)
#             bash bench/real_model_sweep.sh train       carry [".gpu/real-model/p5"]  trains the variants
#                                                      (TRAIN="a b": some of them; a call may run 10 minutes,
#                                                      so two calls of 2-3 variants on the same warm machine)
#             bash bench/real_model_sweep.sh eval        carry [".gpu/sweep"]  right after, on the same warm
#                                                      machine: scores, predictions and the best adapters
#   here:     bash bench/real_model_sweep.sh local DIR                       unpacks into export/gemma3-sweep
#
# Variants (all: both directions, LoRA on every linear layer, batch 32, lr 4e-4 cosine to 10%):
#   short-1200       the first run's settings: pairs as they are (<= 64 chars), r 32, 1,200 steps
#   short-600        the same, half the steps
#   short-1200-lr1e4 learning rate 1e-4
#   short-1200-r8    rank 8 (alpha 16)
#   joined-1200      also 2-6 consecutive pairs joined into one example (prep.join_pairs = 6, <= 160 chars)
# Second round (issue 10's remaining tries, Mandarin -> Taigi):
#   fwd-600          forward only (prep.direction = forward): 600 steps, as many forward examples as short-1200
#   prompt-1200      short-1200 with an instruction asking for a faithful, complete translation (PROMPT below)
#   fwd-prompt-600   both changes
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: real_model_sweep.sh tune-slice | train | eval | local DIR}
TEST=${TEST:-../shared/eval/zh-nan.heldout.tsv}
TUNE_FROM=${TUNE_FROM:-1001}  # data lines 1001-1200 (1-based, after the header): disjoint from the first 500
TUNE_N=${TUNE_N:-200}
SWEEP=/tmp/sweep
VARIANTS="short-1200 short-600 short-1200-lr1e4 short-1200-r8 joined-1200 fwd-600 prompt-1200 fwd-prompt-600"
PROMPT="Translate the user's text from {src} into {tgt}, sentence for sentence: keep every name, number and \
clause, and change only the words that {tgt} says differently. Reply with the translation only."
BIASES=${BIASES:-0 3}

setup_device() {  # the pack real-model, every part checked (bench/gpu_site.sh)
    . bench/gpu_site.sh real-model
    export TOOLKIT_CACHE=/tmp/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
    mkdir -p /tmp/bin
    printf '#!/bin/sh\nexec python3 -m toolkit "$@"\n' > /tmp/bin/toolkit && chmod +x /tmp/bin/toolkit
    export PATH=/tmp/bin:$PATH
}

case "$mode" in
tune-slice)
    mkdir -p .gpu/sweep
    { head -1 "$TEST"; tail -n +$((TUNE_FROM + 1)) "$TEST" | head -"$TUNE_N"; } > .gpu/sweep/tune.tsv
    wc -l .gpu/sweep/tune.tsv
    ;;
train)
    setup_device
    base=$(toolkit fetch gemma3-270m --find-links "$PACK/model" | head -1)
    echo "$base" > /tmp/base_model
    data=$SHARED/corpora/zh-nan-moe/train.tsv
    toolkit prep "$data" --config gemma3-270m-gpu --set prep.join_pairs=1 --set prep.max_length=64 --out $SWEEP/prep-short
    short=(--set prep.join_pairs=1 --set prep.max_length=64)
    need() { [[ " ${TRAIN:-$VARIANTS} " == *" $1"* ]]; }  # is a variant of this prep asked for
    need joined && toolkit prep "$data" --config gemma3-270m-gpu --out $SWEEP/prep-joined
    need fwd- && toolkit prep "$data" --config gemma3-270m-gpu "${short[@]}" --set prep.direction=forward \
        --out $SWEEP/prep-fwd
    need prompt- && toolkit prep "$data" --config gemma3-270m-gpu "${short[@]}" --set "prep.instruction=\"$PROMPT\"" \
        --out $SWEEP/prep-prompt
    need fwd-prompt- && toolkit prep "$data" --config gemma3-270m-gpu "${short[@]}" --set prep.direction=forward \
        --set "prep.instruction=\"$PROMPT\"" --out $SWEEP/prep-fwd-prompt
    common=(--config gemma3-270m-gpu --set "train.base_model=\"$base\"" --set train.batch_size=32
            --set train.save_steps=0 --set train.eval_steps=400)
    OUT=${OUT:-/tmp/out}
    mkdir -p "$OUT"
    run() {  # name prep extra --set ...: trains, then packs the adapter into $OUT at once (a call cut
        local name=$1 prep=$2; shift 2  # short by its time limit still returns what $OUT holds)
        toolkit train $SWEEP/prep-$prep "${common[@]}" "$@" --out $SWEEP/$name/train > $SWEEP/$name.log 2>&1 \
            || { echo "FAILED $name"; tail -5 $SWEEP/$name.log; return; }
        echo "trained $name"
        pack "$name"
    }
    pack() {  # the adapter in bfloat16 (15 MB: one file back) with its configs and metrics; no tokenizer
        python3 -c 'import sys; from safetensors.torch import load_file, save_file; p = sys.argv[1]; save_file({k: v.bfloat16() for k, v in load_file(p).items()}, p, metadata={"format": "pt"})' \
            "$SWEEP/$1/train/adapter_model.safetensors"
        tar czf "$OUT/$1.tgz" -C $SWEEP "$1/train/adapter_model.safetensors" "$1/train/adapter_config.json" \
            "$1/train/manifest.json" "$1/train/metrics.jsonl" "$1/train/train_config.json" \
            "$1/train/chat_template.jinja"
    }
    for name in ${TRAIN:-$VARIANTS}; do
        case $name in
        short-1200) run $name short --set train.max_steps=1200 & ;;
        short-600) run $name short --set train.max_steps=600 & ;;
        short-1200-lr1e4) run $name short --set train.max_steps=1200 --set train.learning_rate=1e-4 & ;;
        short-1200-r8) run $name short --set train.max_steps=1200 --set train.lora_r=8 --set train.lora_alpha=16 & ;;
        joined-1200) run $name joined --set train.max_steps=1200 & ;;
        fwd-600) run $name fwd --set train.max_steps=600 & ;;
        prompt-1200) run $name prompt --set train.max_steps=1200 & ;;
        fwd-prompt-600) run $name fwd-prompt --set train.max_steps=600 & ;;
        *) echo "unknown variant $name" ;;
        esac
    done
    wait
    grep -h "train:.*steps in" $SWEEP/*.log || true
    ;;
eval)
    setup_device
    OUT=${OUT:-/tmp/out}
    mkdir -p "$OUT"
    for name in ${TRAIN:-$VARIANTS}; do
        [ -f $SWEEP/$name/train/manifest.json ] || { echo "no finished train folder for $name"; continue; }
        directions="forward reverse"; [[ $name == fwd-* ]] && directions=forward  # trained one way only
        for d in $directions; do
            for b in $BIASES; do
                toolkit eval .gpu/sweep/tune.tsv --model $SWEEP/$name/train --backend transformers \
                    --config gemma3-270m-gpu --set eval.copy_bias=$b --direction $d \
                    --out $SWEEP/eval/$name-$d-bias$b > $SWEEP/eval-$name-$d-$b.log 2>&1 || echo "eval failed: $name $d $b"
            done
        done
    done
    for d in forward reverse; do
        toolkit eval .gpu/sweep/tune.tsv --baseline copy --direction $d --out $SWEEP/eval/copy-$d > /dev/null 2>&1
    done
    python3 - "$SWEEP" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for f in sorted((sweep / "eval").glob("*/scores.json")):
    scores = list(json.loads(f.read_text())["systems"].values())[-1]  # the model's (copy comes first)
    rows.append((f.parent.name, scores["bleu"]["score"], scores["chrf"]["score"]))
lines = ["| run | BLEU | chrF |", "|---|---|---|"] + [f"| {n} | {b:.1f} | {c:.1f} |" for n, b, c in rows]
(out / "sweep.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
best = {}
for n, _, c in rows:  # Mandarin -> Taigi decides (some variants are trained only that way)
    if n.startswith("copy-") or "-forward-" not in n:
        continue
    name = n.rsplit("-", 2)[0]
    best.setdefault(name, []).append(c)
ranked = sorted(best, key=lambda k: sum(best[k]) / len(best[k]), reverse=True)
print("ranked by mean Mandarin -> Taigi chrF over the biases:", ranked)
(out / "ranked.txt").write_text("\n".join(ranked) + "\n")
EOF
    tar czf /tmp/sweep-evals.tgz -C $SWEEP eval $(cd $SWEEP && ls -d */train | sed 's|$|/metrics.jsonl|') \
        $(cd $SWEEP && ls -d */train | sed 's|$|/manifest.json|')
    cp /tmp/sweep-evals.tgz "$OUT/"
    top=$(head -${TOP:-2} "$OUT/ranked.txt")
    tar czf /tmp/adapters.tgz -C $SWEEP --exclude checkpoints --exclude tensorboard $(for n in $top; do echo $n/train; done)
    split -b 16000000 /tmp/adapters.tgz "$OUT/adapters.tgz.part-"
    ls -la "$OUT"
    ;;
local)
    from=${2:?the folder where the device call files came back}
    dest=${DEST:-export/gemma3-sweep}
    mkdir -p "$dest"
    for f in "$from"/*.tgz; do [ "$(basename "$f")" = sweep-evals.tgz ] || tar xzf "$f" -C "$dest"; done
    [ -e "$from/sweep-evals.tgz" ] && tar xzf "$from/sweep-evals.tgz" -C "$dest"
    [ -e "$from/adapters.tgz.part-aa" ] && cat "$from"/adapters.tgz.part-* | tar xz -C "$dest"
    [ -f "$from/sweep.md" ] && cat "$from/sweep.md"
    # adapters packed by `train` come without the tokenizer (the base model's, 33 MB): take the base's
    mapfile -t fetched < <(toolkit fetch gemma3-270m)
    for t in "$dest"/*/train; do
        for f in tokenizer.json tokenizer_config.json; do [ -f "$t/$f" ] || cp "${fetched[0]}/$f" "$t/"; done
    done
    true
    ;;
*) echo "usage: real_model_sweep.sh tune-slice | train | eval | local DIR" >&2; exit 2 ;;
esac
