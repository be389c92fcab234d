#!/usr/bin/env bash
# Issue 17: gpt-oss-20b at full size, stage by stage, on a random checkpoint in the released MXFP4 layout
# (`toolkit tiny --size 20b --init $INIT`, ~13.7 GB, deterministic: the same bytes on every machine; INIT=scaled,
# the default, is not chaotic, so the merge and export logit checks judge the conversion). From the repository root.
#
# What the GPU machine lacks travels in two git-ignored packs built here by bench/gpu_pack.py (pinned; parts
# under the 64 MiB a device call carries; every part's sha256 checked there before a stage starts):
#   python bench/gpu_pack.py build full-size        .gpu/full-size: transformers 5.24, peft, trl, datasets, dill,
#                                                   multiprocess, bitsandbytes 0.50.2, liger-kernel 0.8.5; the
#                                                   o200k_harmony tokenizer (built offline, tok/); the shipped
#                                                   sample prepared with gpt-oss-20b-qlora (prep/)
#   python bench/gpu_pack.py build full-size-serve  .gpu/full-size-serve: the trimmed llama-cpp-python 0.3.36 sdist
#                                                   (built there by stage llama-bg), its HF -> GGUF converter
#                                                   (conv/), fastapi, uvicorn, starlette, pydantic, gguf, ollama,
#                                                   diskcache: for merge/export/eval/serve on that machine
# On the lent GPU machine, all calls on one warm machine (`python bench/gpu_pack.py calls USE` prints them for
# the packs built; full-size is 2 parts, 62 MiB in all, full-size-serve 1). Training (~9 minutes):
#   carry: [".gpu/full-size/p1"]   command: python3 bench/gpu_pack.py stash full-size
#   carry: [".gpu/full-size/p2"]   command: STAGES="model qlora qlora2048 lora pack" bash bench/full_size.sh
# then merge/export/eval/serve there too (a stage among llama-bg export eval serve also needs full-size-serve):
#   carry: [".gpu/full-size-serve/p1"]
#                                  command: STAGES="llama-bg merge-mxfp4 drop-base llama-wait" bash bench/full_size.sh
#   no carry (the packs stay):     command: STAGES="export eval serve" bash bench/full_size.sh
# On a machine without a GPU (merge, export, eval, serve: no accelerator needed), with the adapter that came back
# unpacked into $RUNS/qlora and the venv's Python (no pack: the tokenizer is built into $RUNS/pack/tok):
#   PY=.venv/bin/python STAGES="model merge-mxfp4 export eval serve merge-bf16" bash bench/full_size.sh
# With no trained adapter at all, stage `adapter` writes a random one of the qlora preset's shapes into
# $RUNS/qlora-random (bench/full_size_adapter.py; its manifest says synthetic) for the merges to fold:
#   PY=.venv/bin/python STAGES="model adapter merge-bf16" ADAPTER=/tmp/full/qlora-random bash bench/full_size.sh
#
# Every stage runs under bench/measure.py: one JSON line each in $OUT/stages.jsonl (wall time, peak host RSS,
# disk written and its high-water mark, GPU memory in use); everything printed goes to $OUT/log.
set -o pipefail
OUT=${OUT:-bench/out}
MODEL=${MODEL:-/tmp/g20b}
RUNS=${RUNS:-/tmp/full}
STEPS=${STEPS:-20}
CAP=${CAP:-24}   # GiB: the consumer-GPU budget the qlora runs are held to
PY=${PY:-python3}
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/log") 2>&1
if [ "$PY" = python3 ]; then  # the GPU machine: the packs (a machine with its own venv: PY=.venv/bin/python)
  . bench/gpu_site.sh full-size
  TRAIN_PACK=$PACK
  case " ${STAGES:-} " in *" llama-bg "*|*" export "*|*" eval "*|*" serve "*)
    . bench/gpu_site.sh full-size-serve
    SERVE_PACK=$PACK
    export PYTHONPATH=/tmp/site-llama:$PYTHONPATH ;;
  esac
else
  export PYTHONPATH=$PWD
  TRAIN_PACK=$RUNS/pack
  if [ ! -f "$TRAIN_PACK/tok/tokenizer.json" ]; then
    $PY -c "import sys; from toolkit.tokenizer import build_hf_tokenizer; build_hf_tokenizer(sys.argv[1])" \
      "$TRAIN_PACK/tok" || exit 1
  fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONFAULTHANDLER=1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
$PY -c "import importlib.metadata as md; print({n: md.version(n) for n in ['torch', 'transformers', 'peft', 'trl', \
'accelerate']})"
measure() { $PY bench/measure.py --log "$OUT/stages.jsonl" "$@"; }
train_args=("$TRAIN_PACK/prep" --max-steps "$STEPS" --force --json --set "train.base_model=\"$MODEL\""
  --set train.packing=true --set train.grad_accum=4 --set train.logging_steps=1 --set train.eval_steps=0
  --set train.save_steps=0)

cp "$OUT/stages.jsonl" "$RUNS/" 2>/dev/null
for stage in ${STAGES:-model qlora qlora2048 lora pack}; do
  cp "$OUT/stages.jsonl" "$RUNS/" 2>/dev/null
  echo "=== $stage $(date -u +%T)"
  case $stage in
    model)
      if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
        [ -f "$TRAIN_PACK/tok/tokenizer.json" ] || gunzip -k "$TRAIN_PACK/tok/tokenizer.json.gz"
        measure --name model --out-dir "$MODEL" -- $PY -m toolkit tiny "$MODEL" --size 20b --tokenizer "$TRAIN_PACK/tok" \
          --init "${INIT:-scaled}"
      fi ;;
    qlora)
      measure --name "qlora-1024-cap$CAP" --out-dir "$RUNS/qlora" -- $PY -m toolkit train "${train_args[@]}" \
        --config gpt-oss-20b-qlora --out "$RUNS/qlora" --set "train.gpu_memory_gib=$CAP" ;;
    qlora2048)
      measure --name "qlora-2048-cap$CAP" --out-dir "$RUNS/qlora2048" -- $PY -m toolkit train "${train_args[@]}" \
        --config gpt-oss-20b-qlora --out "$RUNS/qlora2048" --set "train.gpu_memory_gib=$CAP" \
        --set train.max_length=2048 ;;
    lora)
      measure --name lora-2048 --out-dir "$RUNS/lora" -- $PY -m toolkit train "${train_args[@]}" \
        --config gpt-oss-20b-lora --out "$RUNS/lora" ;;
    llama-bg)  # llama-cpp-python (CPU) from the trimmed pinned sdist, built in the background (setsid: it outlives
               # this call while the machine stays warm); `llama-wait` waits for it
      if [ ! -f /tmp/site-llama/llama_cpp/__init__.py ]; then
        mkdir -p /tmp/llama-src && tar xJf "$SERVE_PACK"/llama/llama_cpp_python-*-trimmed.tar.xz -C /tmp/llama-src
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) setsid nohup \
          python3 -m pip install --no-index --no-deps --no-build-isolation --target /tmp/site-llama \
          /tmp/llama-src/llama_cpp_python-* > /tmp/llama-build.log 2>&1 && touch /tmp/llama-built &
      fi ;;
    llama-wait)
      for _ in $(seq 600); do [ -f /tmp/llama-built ] || [ -f /tmp/site-llama/llama_cpp/__init__.py ] && break; sleep 1; done
      tail -3 /tmp/llama-build.log; $PY -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)" ;;
    pack)  # the qlora adapter whole, the other runs' manifests and logs; in parts that can come back (16 MB a file)
      (cd "$RUNS" && tar czf pack.tgz --exclude='checkpoints' --exclude='tensorboard' \
        $(ls -d qlora 2>/dev/null) $(ls qlora2048/*.json* lora/*.json* 2>/dev/null) stages.jsonl 2>/dev/null)
      split -b 15m -d "$RUNS/pack.tgz" "$OUT/pack.tgz.part" ;;
    adapter)  # no GPU at hand to train one: a random adapter of the qlora preset's exact shapes, marked synthetic
      [ -f "$RUNS/prep/manifest.json" ] || $PY -m toolkit prep corpora/zh-nan-moe-sample/sample.tsv \
        --config gpt-oss-20b-qlora --set "train.base_model=\"$MODEL\"" --out "$RUNS/prep" || exit 1
      measure --name adapter-random --out-dir "$RUNS/qlora-random" -- $PY bench/full_size_adapter.py "$RUNS/prep" \
        "$RUNS/qlora-random" --model "$MODEL" ;;
    merge-mxfp4|merge-bf16)
      format=${stage#merge-}
      CUDA_VISIBLE_DEVICES= measure --name "$stage" --out-dir "$RUNS/$stage" --out-dir "$RUNS/.$stage.partial" -- \
        $PY -m toolkit merge \
        "${ADAPTER:-$RUNS/qlora}" --out "$RUNS/$stage" --format "$format" --force --json ;;
    export)
      [ -n "${SERVE_PACK:-}" ] && export TOOLKIT_LLAMA_CPP=$SERVE_PACK/conv
      measure --name export --out-dir "$RUNS/export" --out-dir "$RUNS/.export.partial" -- $PY -m toolkit export \
        "$RUNS/merge-mxfp4" --out "$RUNS/export" --config gpt-oss-20b-qlora --force --json \
        --set "export.quants=[\"MXFP4_MOE\", \"Q4_K_M\"]" ;;
    eval)
      test=../shared/eval/zh-nan.heldout.tsv; [ -f $test ] || test=corpora/zh-nan-moe-sample/sample.tsv
      measure --name eval-20 --out-dir "$RUNS/eval" -- $PY -m toolkit eval $test --model "$RUNS/export" \
        --backend llama-cpp --limit 20 --max-new-tokens "${NEW_TOKENS:-64}" --out "$RUNS/eval" --force --json ;;
    drop-base)  # export, eval and serve need only the merge: room on a 64 GB disk
      rm -rf "$MODEL" ;;
    serve)
      measure --name serve-1 -- $PY bench/serve_once.py "$RUNS/export" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
cp "$OUT/stages.jsonl" "$RUNS/" 2>/dev/null
date -u
