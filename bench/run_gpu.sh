#!/usr/bin/env bash
# One device call (issue 8 / issue 4's GPU check), from the repository root on the GPU machine:
#   carry: [".gpu/train-speed/p1"]     command: bash bench/run_gpu.sh
# What the image lacks travels in the git-ignored pack .gpu/train-speed, built here by
# `python bench/gpu_pack.py build train-speed` (~58 MiB, one part: transformers 5.24, the version the toolkit is
# tested with, peft, trl, datasets with dill and multiprocess, bitsandbytes 0.50.2, liger-kernel 0.8.5, all
# pinned); `python bench/gpu_pack.py calls train-speed` prints the calls should it grow past one part. The run
# starts only once every part is there (sha256 against the pack's manifest). Then: versions, `toolkit train` on
# the tiny model on CUDA (lora, and qlora with flex attention + grouped_mm), then bench/train_speed.py. Env: ROWS
# (comma list), BUDGET (seconds after which rows are skipped), STEPS (timed steps per row), PACKING= (empty: skip
# the packing check), SMOKE=0 to skip the tiny runs. Everything is logged to $OUT/log.
# Issue 21 (one call, ~8 min on an H200): ROWS=issue21 (named row lists, model reused across rows), PROBE_FP8=1
# (bf16 vs FP8 grouped GEMMs at the expert shapes first), PROFILE=row,row (torch.profiler tables of one extra step
# of each, to $OUT/profile-ROW.txt):
#   SMOKE=0 PACKING= PROBE_FP8=1 PROFILE=qlora-1024,lora-2048 ROWS=issue21 BUDGET=400 bash bench/run_gpu.sh
set -o pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
. bench/gpu_site.sh train-speed
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 - <<'EOF'
import importlib.metadata as md
names = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "pyarrow", "bitsandbytes", "liger-kernel",
         "triton", "tokenizers", "huggingface-hub"]
print({n: md.version(n) for n in names})
import bitsandbytes, datasets, liger_kernel, peft, trl  # noqa: F401  (fail here, not in the middle of a row)
EOF
if [ "${SMOKE:-1}" = 1 ]; then
  T=/tmp/smoke
  python3 -m toolkit tiny $T/tiny && python3 -m toolkit prep corpora/zh-nan-moe-sample/sample.tsv --out $T/prep \
    && for mode in "lora" "qlora --set train.attn_implementation=flex_attention --set train.experts_implementation=grouped_mm"; do
      # shellcheck disable=SC2086
      python3 -m toolkit train $T/prep --config tiny-cpu --out $T/train-${mode%% *} --max-steps 6 --json \
        --set train.base_model=$T/tiny --set train.device=cuda --set train.dtype=bfloat16 --set train.save_steps=3 \
        --set train.eval_steps=3 --set train.gradient_checkpointing=true --mode $mode \
        | python3 -c "import json,sys; d=json.load(sys.stdin); print('smoke', d.get('metrics', d))" \
        || echo "SMOKE FAILED: $mode"
    done
fi
python3 bench/train_speed.py ${PACKING-"--check-packing"} ${PROBE_FP8:+--probe-fp8} ${PROFILE:+--profile "$PROFILE"} \
  --budget-s "${BUDGET:-400}" \
  --steps "${STEPS:-3}" --out "$OUT" ${ROWS:+--rows "$ROWS"}
