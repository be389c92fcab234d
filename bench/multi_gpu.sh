#!/usr/bin/env bash
# Issue 9 on a lent 2-GPU machine (device kind nvidia-h100-x2 / nvidia-h200-x2), from the repository root:
#
#   carry: [".gpu/multi-gpu/p1"]   command: RUNS="fsdp zero3" STEPS=12 RUN_TIMEOUT=300 bash bench/multi_gpu.sh
#   then, while the machine is still warm (it keeps the checkpoint and the adapters):
#                                  command: RUNS="merge-fsdp single merge-zero3" STEPS=12 bash bench/multi_gpu.sh
# (a device call lasts 10 minutes at most: a cold machine spends ~2 min building the checkpoint, FSDP2 ~5 min
# including its one-time start, ZeRO-3 ~2 min, one GPU ~1.5 min, a merge ~1.5 min).
#
# `toolkit train --config gpt-oss-20b-lora` on a random full-size gpt-oss-20b checkpoint (built on the GPU
# by bench/multi_gpu.py, ~42 GB, skipped when the machine still has it): on one GPU ("single"), then on
# two through `accelerate launch` with the shipped configs toolkit/configs/accelerate/fsdp.yaml ("fsdp")
# and deepspeed-zero3.yaml ("zero3"); "merge-RUN" runs `toolkit merge` on RUN's adapter (on the GPU; the
# merged 42 GB are deleted once its parity check has passed and its manifest is written).
#
# Every run: the MOE corpus prepared here, packed into 2048-token rows, micro-batch 4 per GPU, no
# accumulation, STEPS optimizer steps, a loss log every step (the table's tokens/s leaves out the first
# quarter of the steps: kernel compilation). What the machine lacks travels in the git-ignored pack
# .gpu/multi-gpu, built here by `python bench/gpu_pack.py build multi-gpu`: transformers 5.24, peft, trl, datasets
# with dill and multiprocess, liger-kernel, a DeepSpeed 0.19.8 wheel built here (DS_BUILD_OPS=0: PyPI has no
# wheel) with hjson and pydantic, all pinned; the o200k_harmony tokenizer (tok/); the MOE corpus prepared with
# gpt-oss-20b-lora (prep/). If it grows past one part, `python bench/gpu_pack.py calls multi-gpu` prints the
# calls; the runs start only once every part is there (sha256 against the pack's manifest).
# What comes back ($OUT): log (everything printed) and results.tgz (re-packed after every run, so a call cut
# short keeps what finished): per run its manifest.json, metrics.jsonl, adapter_config.json; per merge its
# manifest; table.md and table.json (bench/multi_gpu.py table).
set -o pipefail
OUT=${OUT:-bench/out}
STEPS=${STEPS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}  # seconds per training run; a run still going 5 s before prints its
                                 # Python stacks (faulthandler on SIGABRT) into the log, then ends
MERGE_TIMEOUT=${MERGE_TIMEOUT:-240}
MODEL=${MODEL:-/tmp/gpt-oss-20b-random}
RUNS_DIR=${RUNS_DIR:-/tmp/multi_gpu}
KEEP=$RUNS_DIR/results
mkdir -p "$OUT" "$RUNS_DIR" "$KEEP"
exec > >(tee -a "$OUT/log") 2>&1
# Multicast off, as the device README asks (the image sets these; a launcher must not lose them).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
. bench/gpu_site.sh multi-gpu
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONFAULTHANDLER=1
date -u
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
python3 -c "import importlib.metadata as md; print({n: md.version(n) for n in ['torch', 'transformers', 'peft', \
'trl', 'accelerate', 'deepspeed', 'liger-kernel']})"
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  [ -f "$PACK/tok/tokenizer.json" ] || gunzip -k "$PACK/tok/tokenizer.json.gz"
  python3 bench/multi_gpu.py make-model "$MODEL" --tokenizer "$PACK/tok" || exit 1
fi

train_args=("$PACK/prep" --config gpt-oss-20b-lora --max-steps "$STEPS" --force
  --set "train.base_model=\"$MODEL\"" --set train.packing=true --set train.grad_accum=1
  --set train.logging_steps=1 --set train.eval_steps=0 --set train.save_steps=0 --set train.max_eval_examples=64)
launch=(python3 -m accelerate.commands.launch --num_processes 2 --num_machines 1)

for run in ${RUNS:-single fsdp zero3}; do
  echo "=== $run $(date -u +%T)"
  (sleep $((RUN_TIMEOUT - 5)); pkill -ABRT -f "toolkit (train|merge)") & watchdog=$!
  case $run in
    single) CUDA_VISIBLE_DEVICES=0 timeout "$RUN_TIMEOUT" python3 -m toolkit train "${train_args[@]}" \
              --out "$RUNS_DIR/single" ;;
    fsdp)   timeout "$RUN_TIMEOUT" "${launch[@]}" --config_file toolkit/configs/accelerate/fsdp.yaml \
              -m toolkit train "${train_args[@]}" --out "$RUNS_DIR/fsdp" ;;
    zero3)  timeout "$RUN_TIMEOUT" "${launch[@]}" --config_file toolkit/configs/accelerate/deepspeed-zero3.yaml \
              -m toolkit train "${train_args[@]}" --out "$RUNS_DIR/zero3" ;;
    merge-*) name=${run#merge-}
            timeout "$MERGE_TIMEOUT" python3 -m toolkit merge "$RUNS_DIR/$name" --force \
              --out "$RUNS_DIR/merged-$name" \
              && cp "$RUNS_DIR/merged-$name/manifest.json" "$KEEP/merge-$name.manifest.json" \
              && rm -f "$RUNS_DIR/merged-$name"/*.safetensors ;;
    *) echo "unknown run $run"; continue ;;
  esac
  echo "=== $run exit $? $(date -u +%T)"
  kill $watchdog 2>/dev/null
  if [ -f "$RUNS_DIR/$run/manifest.json" ]; then
    mkdir -p "$KEEP/$run"
    cp "$RUNS_DIR/$run"/{manifest.json,metrics.jsonl,adapter_config.json} "$KEEP/$run/"
  fi
  python3 bench/multi_gpu.py table "$RUNS_DIR"/single "$RUNS_DIR"/fsdp "$RUNS_DIR"/zero3 --json "$KEEP/table.json" \
    > "$KEEP/table.md"
  tar czf "$OUT/results.tgz" -C "$KEEP" .
done
cat "$KEEP/table.md"
