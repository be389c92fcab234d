#!/usr/bin/env bash
# Issue 21 on the lent GPU machine, from the repository root. `python bench/gpu_pack.py build speed` here makes one
# part (38 MiB since bitsandbytes' wheel keeps only CUDA 13's libraries), so every call below carries all it needs
# and none relies on a machine staying warm (2026-12-03: one was lost between calls):
#   bash bench/gemma_gpu.sh slices; bash bench/speed_gpu.sh gemma-tok    (here: .gpu/evaldata, .gpu/gemma-tok)
#   carry [".gpu/speed/p1", ".gpu/evaldata", ".gpu/gemma-tok"], then one call each (~9 min):
#     ROWS=qlora14 MEMORY=qlora-preset-mb6-1024 BUDGET=300 bash bench/speed_gpu.sh train; bash bench/speed_gpu.sh export
#     bash bench/speed_gpu.sh translate
# (pack speed-one, `python bench/gpu_pack.py build speed-one --limit-mib 61.5`, carry [".gpu/speed-one/p1",
# ".gpu/evaldata"]: `PACK_USE=speed-one bash bench/speed_gpu.sh one`, the translate rows then the train rows.)
# train:     starts llama-cpp-python's CUDA build (sm_90) in the background (niced, 6 jobs: the training rows
#            keep their cores), then bench/train_speed.py --rows issue21-fused (ROWS=, BUDGET= override): the
#            fused MoE element-wise work (train.fused_experts) against the presets and the recipe, same run.
#            ROWS=presets: the presets as shipped; qlora with train.redequantize_recomputed, to bring it
#            under 14 GiB. MEMORY=ROW,...: what is allocated at the peak of one extra step of those rows, by the
#            code that allocated it (OUT/memory-ROW.txt).
# translate: bench/translate_speed.py with random weights (--no-loop-stop: every row decodes to its limit) on
#            gpt-oss-20b's shapes (after: 500 news sentences in one batch of 500, then batches of 256, then 128;
#            before: the first 32; TROWS=NAME,... picks rows of the table below) and, with
#            .gpu/gemma-tok carried (the config and tokenizer of `toolkit fetch gemma3-270m`'s hf folder, tokenizer.json
#            gzipped), Gemma 3 270M's (after: batches of 200; before: the first 48). Each after row profiles one batch
#            of PROFILE_TOKENS=16 new tokens first (OUT/NAME-profile-after.txt); each row has a time budget.
# export:    the export check with the CUDA build (started here with every core unless a train call started it):
#            `toolkit export` of a tiny gpt-oss (trained 2 steps, merged) with llama.cpp in its worker process (the
#            default) and every layer on the GPU; then the files without the check, and bench/llama_gpu_smoke.py's
#            cases on its f16 GGUF (OUT/llama-smoke.txt): which setting the check's crash needs.
# Everything printed goes to $OUT/log; JSON results to $OUT.
set -o pipefail
mode=${1:?usage: speed_gpu.sh gemma-tok | train | translate | export}
if [ "$mode" = gemma-tok ]; then  # here: .gpu/gemma-tok for the translate call, from the fetched Gemma 3 270M
  hf=$(toolkit fetch gemma3-270m | head -1) || exit 1  # the hf folder, then the GGUF
  [ -f "$hf/config.json" ] || { echo "no config.json in $hf"; exit 1; }
  mkdir -p .gpu/gemma-tok && cp "$hf"/{config.json,generation_config.json,tokenizer_config.json,chat_template.jinja} \
    .gpu/gemma-tok/ && gzip -c "$hf/tokenizer.json" > .gpu/gemma-tok/tokenizer.json.gz && ls -l .gpu/gemma-tok
  exit
fi
if [ "$mode" = one ]; then  # pack speed-one, one call: the translate rows, then the train rows (OUT keeps what
  bash bench/speed_gpu.sh translate; BUDGET=${BUDGET:-150} exec bash bench/speed_gpu.sh train  # a timeout left)
fi
OUT=${OUT:-bench/out}
WORK=${WORK:-/tmp/speed}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log") 2>&1
. bench/gpu_site.sh "${PACK_USE:-speed}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONFAULTHANDLER=1
export PYTHONPATH=/tmp/site-llama:$PYTHONPATH TOOLKIT_LLAMA_CPP=$PACK/conv
date -u
[ -f .gpu/evaldata/news500.tsv ] && mkdir -p "$WORK/data" && cp .gpu/evaldata/news500.tsv "$WORK/data/"
[ -d "$WORK/tok" ] || cp -r "$PACK/tok" "$WORK/tok"
start_llama_build() {  # NICE JOBS: llama-cpp-python's CUDA build (sm_90) in the background, once per machine
  if [ -d "$PACK/llama" ] && [ ! -f /tmp/site-llama/llama_cpp/__init__.py ] && [ ! -d /tmp/llama-src ]; then
    mkdir -p /tmp/llama-src && tar xJf "$PACK"/llama/llama_cpp_python-*-trimmed.tar.xz -C /tmp/llama-src
    # the stamp is written inside the setsid'd shell: a `... && touch` outside it dies with the call (2026-12-03)
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$2 setsid nohup bash -c "nice -n $1 python3 -m pip install --no-index --no-deps \
      --no-build-isolation --target /tmp/site-llama /tmp/llama-src/llama_cpp_python-* && touch '$WORK/llama.built'" \
      > "$WORK/llama-build.log" 2>&1 < /dev/null &
  fi
}
case $mode in
  train)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    start_llama_build 19 6  # niced, 6 jobs: the training rows keep their cores
    python3 bench/train_speed.py --rows "${ROWS:-issue21-fused}" --budget-s "${BUDGET:-400}" --steps "${STEPS:-3}" \
      --memory "${MEMORY:-}" --out "$OUT" ;;
  translate)
    [ -f "$WORK/data/news500.tsv" ] || { echo "no $WORK/data/news500.tsv: carry .gpu/evaldata"; exit 1; }
    oss="--random gpt-oss-20b --tokenizer $WORK/tok"
    gemma="--random gemma3-270m --tokenizer .gpu/gemma-tok"  # shapes from the fetched folder's config.json
    [ -d .gpu/gemma-tok ] || gemma=""
    # name | model | row options: the after rows first (each profiles one batch), every row within a time budget
    while IFS='|' read -r name model options; do
      case ",${TROWS:-$name}," in *",$name,"*) ;; *) continue ;; esac  # TROWS=a,b: those rows only
      [ -n "$model" ] || { echo "$name: skipped (no .gpu/gemma-tok carried)"; continue; }
      # shellcheck disable=SC2086
      python3 bench/translate_speed.py $model --test "$WORK/data/news500.tsv" --device cuda --out "$WORK/$name" $options
      for f in "$WORK/$name"/profile-*.txt; do [ -f "$f" ] && cp "$f" "$OUT/$name-$(basename "$f")"; done
      cp "$WORK/$name/translate_speed.json" "$OUT/translate_speed-$name.json" 2>/dev/null
    done <<ROWS
oss-after-500|$oss|--modes after --batch-size 500 --pool 500 --no-loop-stop --profile-tokens ${PROFILE_TOKENS:-16}
oss-after-256|$oss|--modes after --batch-size 256 --pool 256 --no-loop-stop --budget-s 60
gemma-after|$gemma|--modes after --batch-size 200 --no-loop-stop --profile-tokens ${PROFILE_TOKENS:-16} --budget-s 90
gemma-before|$gemma|--modes before --limit 48 --budget-s 45
oss-before|$oss|--modes before --limit 32 --budget-s 45
oss-after|$oss|--modes after --batch-size 128 --pool 128 --no-loop-stop --profile-tokens ${PROFILE_TOKENS:-16} --budget-s 150
ROWS
    tail -n 3 "$WORK/llama-build.log" 2>/dev/null ;;
  export)
    start_llama_build 0 16  # a call of its own: every core (none when a train call already started it)
    for _ in $(seq "${BUILD_WAIT:-300}"); do
      [ -f "$WORK/llama.built" ] || [ -f /tmp/site-llama/llama_cpp/__init__.py ] && break; sleep 1
    done
    tail -n 2 "$WORK/llama-build.log"
    python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'GPU offload:', \
llama_cpp.llama_supports_gpu_offload())" || exit 1
    T=$WORK/chain  # a merge folder to export: tiny gpt-oss, 2 steps of tiny-cpu on the GPU, merged
    { python3 -m toolkit tiny $T/tiny && python3 -m toolkit prep corpora/zh-nan-moe-sample/sample.tsv --out $T/prep \
      && python3 -m toolkit train $T/prep --config tiny-cpu --out $T/train --max-steps 2 --force \
        --set train.base_model="\"$T/tiny\"" --set train.device=cuda \
      && python3 -m toolkit merge $T/train --out $T/merge --force; } > "$WORK/chain.log" 2>&1 \
      || { tail -n 5 "$WORK/chain.log"; exit 1; }
    # the worker process (the default); on 2026-12-03 its check crashed there too (SIGSEGV, n_gpu_layers -1 and 0)
    python3 -m toolkit export $T/merge --out "$WORK/export-child" --force --quant Q8_0 --pre-tokenizer gpt-4o \
      --set export.n_gpu_layers=-1 > "$WORK/export-child.log" 2>&1
    echo "export: exit status $?"; tail -n 2 "$WORK/export-child.log"
    cp "$WORK/export-child/manifest.json" "$OUT/export-child-manifest.json" 2>/dev/null
    # what the crash needs: the same files without the check, then bench/llama_gpu_smoke.py's cases on the f16 file
    python3 -m toolkit export $T/merge --out "$WORK/export-files" --force --quant Q8_0 --pre-tokenizer gpt-4o \
      --set export.verify=false > "$WORK/export-files.log" 2>&1 || { tail -n 3 "$WORK/export-files.log"; exit 1; }
    python3 bench/llama_gpu_smoke.py "$(ls "$WORK"/export-files/*[Ff]16*.gguf | head -1)" --layers -1 \
      --cases eval,verify,verify-f16kv,verify-nooffload,verify-cpu,torch-verify,toolkit-verify \
      | tee "$OUT/llama-smoke.txt" ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
