#!/usr/bin/env bash
# Issue 21 on the lent GPU machine, in three calls to one warm machine (2026-12-03), from the repository root:
#   python bench/gpu_pack.py build speed here, then `python bench/gpu_pack.py calls speed` for the stash calls
#   (carry [".gpu/speed/pN"], command `python3 bench/gpu_pack.py stash speed`), then:
#   carry [".gpu/speed/pLAST", ".gpu/evaldata"]   bash bench/speed_gpu.sh train       (~9 min)
#   no carry                                      bash bench/speed_gpu.sh translate   (~4 min)
#   no carry                                      bash bench/speed_gpu.sh export      (~1 min)
# train:     starts llama-cpp-python's CUDA build (sm_90) in the background (niced, 6 jobs: the training rows
#            keep their cores), then bench/train_speed.py --rows issue21-fused (ROWS=, BUDGET= override): the
#            fused MoE element-wise work (train.fused_experts) against the presets and the recipe, same run.
#            ROWS=presets: the presets as shipped; qlora with train.redequantize_recomputed, to bring it
#            under 14 GiB. MEMORY=ROW,...: what is allocated at the peak of one extra step of those rows, by the
#            code that allocated it (OUT/memory-ROW.txt).
# translate: bench/translate_speed.py on gpt-oss-20b shapes with random weights: after (500 news sentences,
#            batches of 128, one batch of PROFILE_TOKENS=16 new tokens profiled first: OUT/profile-after.txt),
#            before (the first 32; the old path's rate).
# export:    the export check with the CUDA build beside torch, which segfaulted in-process on 2026-12-02:
#            `toolkit export` of a tiny gpt-oss (trained 2 steps, merged) with llama.cpp in its worker process (the default,
#            export.llama_process=child) and every layer on the GPU, then the same in-process (=same), for contrast.
# Everything printed goes to $OUT/log; JSON results to $OUT.
set -o pipefail
mode=${1:?usage: speed_gpu.sh train | translate | export}
OUT=${OUT:-bench/out}
WORK=${WORK:-/tmp/speed}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log") 2>&1
. bench/gpu_site.sh speed
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONFAULTHANDLER=1
export PYTHONPATH=/tmp/site-llama:$PYTHONPATH TOOLKIT_LLAMA_CPP=$PACK/conv
date -u
case $mode in
  train)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    [ -f .gpu/evaldata/news500.tsv ] && mkdir -p "$WORK/data" && cp .gpu/evaldata/news500.tsv "$WORK/data/"
    [ -d "$WORK/tok" ] || cp -r "$PACK/tok" "$WORK/tok"
    if [ ! -f /tmp/site-llama/llama_cpp/__init__.py ]; then
      mkdir -p /tmp/llama-src && tar xJf "$PACK"/llama/llama_cpp_python-*-trimmed.tar.xz -C /tmp/llama-src
      # the stamp is written inside the setsid'd shell: a `... && touch` outside it dies with the call (2026-12-03)
      CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=6 setsid nohup bash -c "nice -n 19 python3 -m pip install --no-index --no-deps \
        --no-build-isolation --target /tmp/site-llama /tmp/llama-src/llama_cpp_python-* && touch '$WORK/llama.built'" \
        > "$WORK/llama-build.log" 2>&1 < /dev/null &
    fi
    python3 bench/train_speed.py --rows "${ROWS:-issue21-fused}" --budget-s "${BUDGET:-400}" --steps "${STEPS:-3}" \
      --memory "${MEMORY:-}" --out "$OUT" ;;
  translate)
    [ -f "$WORK/data/news500.tsv" ] || { echo "no $WORK/data/news500.tsv: run train with .gpu/evaldata first"; exit 1; }
    for row in "after --modes after --batch-size 128 --profile-tokens ${PROFILE_TOKENS:-16}" \
               "before --modes before --limit 32"; do
      # shellcheck disable=SC2086
      python3 bench/translate_speed.py --random gpt-oss-20b --tokenizer "$WORK/tok" --test "$WORK/data/news500.tsv" \
        --device cuda --out "$WORK/${row%% *}" ${row#* } \
        ; cp "$WORK/${row%% *}"/*.* "$OUT/" 2>/dev/null; mv "$OUT/translate_speed.json" \
          "$OUT/translate_speed-oss-${row%% *}.json" 2>/dev/null
    done
    tail -n 3 "$WORK/llama-build.log" ;;
  export)
    for _ in $(seq 300); do [ -f "$WORK/llama.built" ] || [ -f /tmp/site-llama/llama_cpp/__init__.py ] && break; sleep 1; done
    tail -n 2 "$WORK/llama-build.log"
    python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'GPU offload:', \
llama_cpp.llama_supports_gpu_offload())" || exit 1
    T=$WORK/chain  # a merge folder to export: tiny gpt-oss, 2 steps of tiny-cpu on the GPU, merged
    { python3 -m toolkit tiny $T/tiny && python3 -m toolkit prep corpora/zh-nan-moe-sample/sample.tsv --out $T/prep \
      && python3 -m toolkit train $T/prep --config tiny-cpu --out $T/train --max-steps 2 --force \
        --set train.base_model="\"$T/tiny\"" --set train.device=cuda \
      && python3 -m toolkit merge $T/train --out $T/merge --force; } > "$WORK/chain.log" 2>&1 \
      || { tail -n 5 "$WORK/chain.log"; exit 1; }
    for process in child same; do  # the worker process (default), then in-process: the 2026-12-02 crash
      python3 -m toolkit export $T/merge --out "$WORK/export-$process" --force --quant Q8_0 --pre-tokenizer gpt-4o \
        --set export.llama_process=$process --set export.n_gpu_layers=-1 > "$WORK/export-$process.log" 2>&1
      echo "export llama_process=$process: exit status $?"; tail -n 4 "$WORK/export-$process.log"
      cp "$WORK/export-$process/manifest.json" "$OUT/export-$process-manifest.json" 2>/dev/null
    done ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
