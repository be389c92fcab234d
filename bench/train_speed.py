"""Benchmark: `toolkit train` speed and memory on one GPU, full-size gpt-oss-20b shapes, random weights.

    python bench/train_speed.py [--rows recipe-2048,fast-2048,...] [--steps 3] [--warmup 2] [--out DIR]
    python bench/train_speed.py --rows issue21 --probe-fp8 --budget-s 420   # issue 21's levers (one H200 call)
    python bench/train_speed.py --tiny --device cpu      # the same code on a 2-layer toy model (CPU test)

Builds GptOssForCausalLM with gpt-oss-20b's shapes (24 layers, 32 experts top-4, hidden 2880, vocab
201,088, 64 query / 8 KV heads of 64, sliding window 128 on every other layer) on the meta device, then
`to_empty` on the GPU in bf16 and a seeded `normal_` init (no CPU copy of the 21B parameters); `qlora`
rows quantize it with `toolkit.lora.quantize_4bit_`. LoRA goes on through `toolkit.lora.attach_lora`
with the preset's targets (r 8, attention everywhere, experts of layers 7/15/23), and the steps run
through `toolkit.train.build_trainer` (TRL SFTTrainer, completion-only loss, the same collator as
`toolkit train`) on a fixed batch of random token ids: the first 75% of each row is prompt, the rest
completion. One optimizer step per micro-batch.

Each row prints: tokens/s over the timed steps (after `--warmup` steps; non-padding tokens), peak
GiB allocated / reserved (above what earlier rows left allocated: a qlora row leaves ~1.1 GiB), MFU on active parameters (6 x 3.6e9 x tokens/s over the bf16 matmul peak
measured at start), the loss of step 1 (same weights for every row: comparable across rows) and of
the last step. The `zh-nan-*` rows use the token lengths of the zh-nan corpus (bench/zh_nan_lengths.json)
instead of full rows. A row that fails prints an error row; the table goes to stdout, the full results
to OUT/train_speed.json (rewritten after every row, so a run cut short keeps what it measured).

Issue 21's rows (`--rows issue21`, the order that matters when `--budget-s` runs out) are the presets as
shipped plus one lever each: `+compile` (`train.compile_layers`, regional torch.compile; the JSON and
the last column give dynamo's graph and graph-break counts), `-mbN` (micro-batch N), `+accumN` (N
micro-batches per optimizer step, as the presets train: the bench otherwise steps the optimizer after
every micro-batch, which overstates qlora's per-step cost), `+cudagraphs` (compile mode reduce-overhead).
`--probe-fp8` first times bf16 against FP8 grouped GEMMs at the expert shapes (the FP8 lever's ceiling).
Consecutive rows that differ only in per-row settings reuse one model (`ModelCache`; a qlora build
quantizes for ~8 s). Peak GiB counts the row's model whether built or reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LENGTHS_FILE = Path(__file__).resolve().parent / "zh_nan_lengths.json"
ACTIVE_PARAMS = 3.6e9  # gpt-oss-20b parameters used per token (OpenAI's model card)
PROMPT_SHARE = 0.75  # share of each fixed row that is prompt (label -100)
RECIPE = {"attn_implementation": "eager", "experts_implementation": "eager", "liger_kernel": False,
          "checkpoint_every_n_layers": 1, "packing": False, "padding_free": False, "offload_embeddings": False,
          "lowrank_experts": False, "fused_experts": False, "activation_offloading": False}
FAST = {**RECIPE, "attn_implementation": "flex_attention", "experts_implementation": "grouped_mm"}
PRESET = {**FAST, "liger_kernel": True, "checkpoint_every_n_layers": 2}  # the lora preset until run 4 (bench/results/train_speed-2026-11-25-h100.md)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    preset: str  # toolkit/configs/<preset>.toml
    seq: int
    batch: int
    train: dict[str, Any]  # TrainConfig overrides on top of the preset
    data: str = "fixed"  # fixed (full random rows) or zh-nan (corpus lengths, padded / padding-free / packed)
    accum: int = 1  # micro-batches per optimizer step (the presets train with 4 / 16)


def _rows() -> list[Row]:
    lora, qlora = "gpt-oss-20b-lora", "gpt-oss-20b-qlora"
    rows = [Row(f"recipe-{s}", lora, s, 4, RECIPE) for s in (1024, 2048)]
    rows += [
        Row("flex-2048", lora, 2048, 4, {**RECIPE, "attn_implementation": "flex_attention"}),
        Row("grouped_mm-2048", lora, 2048, 4, {**RECIPE, "experts_implementation": "grouped_mm"}),
    ]
    rows += [Row(f"fast-{s}", lora, s, 4, FAST) for s in (1024, 2048)]
    rows += [
        Row("fast+liger-2048", lora, 2048, 4, {**FAST, "liger_kernel": True}),
        Row("fast+ckpt/2-2048", lora, 2048, 4, {**FAST, "checkpoint_every_n_layers": 2}),
        Row("qlora-recipe-2048", qlora, 2048, 1, RECIPE),
    ]
    rows += [Row(f"qlora-fast-{s}", qlora, s, 1, FAST) for s in (1024, 2048)]
    rows += [Row(f"fast+liger+ckpt/2-{s}", lora, s, 4, PRESET) for s in (1024, 2048)]
    rows += [Row(f"qlora-fast+liger-{s}", qlora, s, 1, {**FAST, "liger_kernel": True}) for s in (1024, 2048)]
    rows += [Row(f"qlora-fast+offload-{s}", qlora, s, 1, {**FAST, "offload_embeddings": True}) for s in (1024, 2048)]
    rows += [Row("fast+liger-mb8-2048", lora, 2048, 8, {**FAST, "liger_kernel": True})]
    rows += [
        Row("fast+liger+ckpt/3-2048", lora, 2048, 4, {**PRESET, "checkpoint_every_n_layers": 3}),
        Row("fast+liger+ckpt/2+lowrank-2048", lora, 2048, 4, {**PRESET, "lowrank_experts": True}),
        Row("fast+liger+ckpt/3+lowrank-2048", lora, 2048, 4,
            {**PRESET, "checkpoint_every_n_layers": 3, "lowrank_experts": True}),
        Row("fast+liger+ckpt/4+lowrank-2048", lora, 2048, 4,
            {**PRESET, "checkpoint_every_n_layers": 4, "lowrank_experts": True}),
        Row("fast+liger+ckpt/3+lowrank-1024", lora, 1024, 4,
            {**PRESET, "checkpoint_every_n_layers": 3, "lowrank_experts": True}),
        Row("qlora-fast+offload+lowrank-2048", qlora, 2048, 1,
            {**FAST, "offload_embeddings": True, "lowrank_experts": True}),
    ]
    rows += _issue21_rows(lora, qlora)
    rows += [
        Row("zh-nan-padded", lora, 2048, 4, PRESET, data="zh-nan"),
        Row("zh-nan-padding_free", lora, 2048, 4, {**PRESET, "padding_free": True}, data="zh-nan"),
        Row("zh-nan-packed-2048", lora, 2048, 4, {**PRESET, "packing": True}, data="zh-nan"),
    ]
    return rows


# The presets as they were until 2026-12-03, which issue 21's rows are measured against (their names say what is
# added on top: "lora-2048" is the lora preset of that time, "lora+fused-2048" it with train.fused_experts).
LORA_UNTIL_1203 = {"fused_experts": False, "checkpoint_every_n_layers": 4}
QLORA_UNTIL_1203 = {"fused_experts": False, "activation_offloading": False}


def _issue21_rows(lora: str, qlora: str) -> list[Row]:
    """Issue 21's levers on top of the presets as they were before 2026-12-03, then the presets as shipped."""
    rows = [dataclasses.replace(row, train={**(LORA_UNTIL_1203 if row.preset == lora else QLORA_UNTIL_1203),
                                            **row.train}) for row in _issue21_levers(lora, qlora)]
    redeq_all = {"redequantize_experts": True, "redequantize_recomputed": True}
    return rows + [Row("lora-preset-2048", lora, 2048, 4, {}), Row("qlora-preset-1024", qlora, 1024, 8, {}),
                   Row("qlora-preset-2048", qlora, 2048, 4, {}),
                   Row("qlora-preset+redeq-all-1024", qlora, 1024, 8, redeq_all),
                   Row("qlora-preset+redeq-all-2048", qlora, 2048, 4, redeq_all),
                   # 6,144 and 5,120 tokens per micro-batch instead of 8,192: the expert intermediates of the
                   # layer that runs (about 0.3 GiB per 1,000 tokens with offloading) against the 14 GiB goal
                   Row("qlora-preset-mb6-1024", qlora, 1024, 6, {}), Row("qlora-preset-mb3-2048", qlora, 2048, 3, {}),
                   Row("qlora-preset-mb5-1024", qlora, 1024, 5, {})]


def _issue21_levers(lora: str, qlora: str) -> list[Row]:
    compiled = {"compile_layers": "default"}
    rows = [Row("lora-2048", lora, 2048, 4, {}), Row("lora+compile-2048", lora, 2048, 4, compiled),
            Row("lora+compile-max-2048", lora, 2048, 4, {"compile_layers": "max-autotune-no-cudagraphs"}),
            Row("lora+accum4-2048", lora, 2048, 4, {}, accum=4),
            Row("lora-mb8-ckpt1-2048", lora, 2048, 8, {"checkpoint_every_n_layers": 1}),
            Row("lora-mb6-ckpt2-2048", lora, 2048, 6, {"checkpoint_every_n_layers": 2}),
            Row("lora+compile-mb8-ckpt1-2048", lora, 2048, 8, {**compiled, "checkpoint_every_n_layers": 1})]
    for seq in (2048, 1024):
        rows += [Row(f"qlora-{seq}", qlora, seq, 1, {}), Row(f"qlora+compile-{seq}", qlora, seq, 1, compiled),
                 Row(f"qlora-mb2-{seq}", qlora, seq, 2, {}), Row(f"qlora+compile-mb2-{seq}", qlora, seq, 2, compiled)]
    rows += [Row("qlora-mb4-1024", qlora, 1024, 4, {}), Row("qlora+compile-mb4-1024", qlora, 1024, 4, compiled),
             Row("qlora+accum4-1024", qlora, 1024, 1, {}, accum=4),
             Row("qlora+compile+accum4-1024", qlora, 1024, 1, compiled, accum=4),
             Row("qlora+cudagraphs-1024", qlora, 1024, 1, {"compile_layers": "reduce-overhead"}),
             Row("qlora-embeddings-on-gpu-2048", qlora, 2048, 1, {"offload_embeddings": False}),
             Row("qlora+ckpt2-1024", qlora, 1024, 1, {"checkpoint_every_n_layers": 2})]
    fused = {"fused_experts": True}
    rows += [Row("lora+fused-2048", lora, 2048, 4, fused),
             Row("lora+fused-ckpt6-2048", lora, 2048, 4, {**fused, "checkpoint_every_n_layers": 6}),
             Row("lora+fused-ckpt12-2048", lora, 2048, 4, {**fused, "checkpoint_every_n_layers": 12}),
             Row("lora+fused-mb6-ckpt3-2048", lora, 2048, 6, {**fused, "checkpoint_every_n_layers": 3}),
             Row("lora+fused+compile-2048", lora, 2048, 4, {**fused, **compiled}),
             Row("qlora+fused-mb4-1024", qlora, 1024, 4, fused),
             Row("qlora+fused-mb8-1024", qlora, 1024, 8, fused),
             Row("qlora+fused-mb2-2048", qlora, 2048, 2, fused),
             Row("qlora+fused-mb4-2048", qlora, 2048, 4, fused),
             Row("qlora+fused-mb6-1024", qlora, 1024, 6, fused),
             Row("qlora+fused-mb3-2048", qlora, 2048, 3, fused),
             Row("qlora+fused+offload-mb8-1024", qlora, 1024, 8, {**fused, "activation_offloading": True}),
             Row("qlora+fused+offload-mb4-2048", qlora, 2048, 4, {**fused, "activation_offloading": True}),
             Row("lora+fused+offload-mb8-ckpt4-2048", lora, 2048, 8, {**fused, "activation_offloading": True}),
             Row("qlora+fused+compile-mb4-1024", qlora, 1024, 4, {**fused, **compiled}),
             Row("qlora+fused+compile-mb2-2048", qlora, 2048, 2, {**fused, **compiled})]
    redeq = {"redequantize_experts": True}
    rows += [Row(f"qlora+ckpt{n}+redeq-{seq}", qlora, seq, 1, {**redeq, "checkpoint_every_n_layers": n})
             for seq in (1024, 2048) for n in (2, 3)]
    return rows


ROWS = {row.name: row for row in _rows()}
# Named row lists for --rows / ROWS=: issue 21's table in the order that matters when time runs out (budget):
# the three baselines, then the qlora levers (one 4-bit model reused), then the lora levers.
ROW_SETS = {
    "issue21": [
        "recipe-2048", "lora-2048", "qlora-2048", "qlora-1024",  # the baselines (~2 min with their first compiles)
        "qlora-mb2-1024", "qlora-mb4-1024", "qlora+accum4-1024", "qlora-mb2-2048",  # the same 4-bit model reused
        "qlora+compile-1024", "lora+compile-2048",  # compilation: minutes each (unmeasured so far)
        "qlora+ckpt2-1024", "qlora+ckpt2+redeq-1024", "qlora+ckpt3+redeq-1024", "qlora+ckpt2+redeq-2048",
        "lora-mb8-ckpt1-2048", "lora+accum4-2048", "lora-mb6-ckpt2-2048",
        "qlora+compile-2048", "qlora+compile-mb4-1024", "lora+compile-mb8-ckpt1-2048", "qlora+compile-mb2-2048",
        "qlora+compile+accum4-1024", "qlora+cudagraphs-1024", "lora+compile-max-2048"],
    # the fused MoE element-wise work (train.fused_experts), 2026-12-03: baselines, lora, qlora, then compiled
    "issue21-fused": [
        "recipe-2048", "lora-2048", "lora+fused-2048", "lora+fused-ckpt6-2048", "lora+fused-ckpt12-2048",
        "lora+fused-mb6-ckpt3-2048", "qlora-mb4-1024", "qlora+fused-mb4-1024", "qlora+fused-mb8-1024",
        "qlora+fused-mb2-2048", "qlora+fused-mb4-2048", "qlora+fused+compile-mb4-1024",
        "qlora+fused+compile-mb2-2048", "lora+fused+compile-2048", "lora+compile-2048"],
    # the second call of 2026-12-03: qlora within 14 GiB (interpolated micro-batches, TRL's activation offloading)
    "issue21-fused2": [
        "qlora+fused-mb8-1024", "qlora+fused-mb6-1024", "qlora+fused-mb3-2048", "qlora+fused+offload-mb8-1024",
        "qlora+fused+offload-mb4-2048", "qlora-mb4-1024", "lora+fused-ckpt12-2048",
        "lora+fused+offload-mb8-ckpt4-2048"],
    # the presets as shipped; first the open question, the qlora preset within 14 GiB (re-dequantizing in
    # recomputed layers), then the lora preset and its baseline (measured twice on 2026-12-03 already)
    "presets": ["qlora-preset+redeq-all-1024", "qlora-preset-1024", "qlora-preset+redeq-all-2048",
                "qlora-preset-2048", "recipe-2048", "lora-preset-2048"],
    # 2026-12-03, session 13: the qlora preset within 14 GiB by a smaller micro-batch (the preset's own first, as
    # the baseline of the same call), then the lora preset and the recipe once more (Liger in the pack again)
    "qlora14": ["qlora-preset-mb6-1024", "qlora-preset-mb3-2048", "qlora-preset-1024", "qlora-preset-mb5-1024",
                "lora-preset-2048", "recipe-2048"],
    "issue21-quick": ["recipe-2048", "lora-2048", "qlora-2048", "qlora-1024", "qlora+compile-1024",
                      "lora+compile-2048"],
}
# The order rows run in when time is short: the goals first.
PRIORITY = ["recipe-2048", "fast-2048", "fast+liger+ckpt/2-2048", "qlora-fast-2048", "qlora-fast+liger-2048",
            "flex-2048", "grouped_mm-2048", "fast+liger-2048", "fast+ckpt/2-2048", "recipe-1024", "fast-1024",
            "fast+liger+ckpt/2-1024", "qlora-fast-1024", "qlora-fast+liger-1024", "qlora-recipe-2048",
            "zh-nan-padded", "zh-nan-padding_free", "zh-nan-packed-2048", "qlora-fast+offload-2048",
            "qlora-fast+offload-1024", "fast+liger-mb8-2048", "fast+liger+ckpt/3-2048",
            "fast+liger+ckpt/2+lowrank-2048", "fast+liger+ckpt/3+lowrank-2048", "qlora-fast+offload+lowrank-2048",
            "fast+liger+ckpt/4+lowrank-2048", "fast+liger+ckpt/3+lowrank-1024"]


def model_config(tiny: bool = False, layers: int | None = None):
    """gpt-oss-20b's GptOssConfig (GptOssConfig() defaults are the 120b's: 36 layers, 128 experts)."""
    from transformers import GptOssConfig

    n = layers or (2 if tiny else 24)
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]  # alternating, sliding first
    if tiny:
        return GptOssConfig(num_hidden_layers=n, num_local_experts=4, num_experts_per_tok=2, hidden_size=64,
                            intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=1024, sliding_window=8, layer_types=types)
    return GptOssConfig(num_hidden_layers=n, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
                        intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=201088, sliding_window=128, max_position_embeddings=131072, layer_types=types)


def build_model(cfg, config, device: str, seed: int = 0, std: float = 0.02):
    """Random GptOssForCausalLM in cfg.dtype straight on `device` (meta init, to_empty, seeded normal_)."""
    import torch
    from transformers import GptOssForCausalLM

    from toolkit import lora
    from toolkit.memory import offload_input_embeddings

    dtype = lora.torch_dtype(cfg)
    with torch.device("meta"):
        model = GptOssForCausalLM._from_config(config, dtype=dtype, **lora.kernel_kwargs(cfg))
    model.to_empty(device=device)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias") and ".router." not in name:  # attention and expert biases
                param.zero_()
            else:  # matrices, expert tensors, attention sinks, router bias (as GptOssPreTrainedModel inits them)
                param.normal_(0.0, std, generator=gen)
        for name, module in model.named_modules():
            if keep_fp32 and name.rsplit(".", 1)[-1] in keep_fp32:
                module.float()  # as from_pretrained keeps the RMSNorm weights in float32
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config)  # its non-persistent buffers were left empty by to_empty
    if cfg.mode == "qlora":
        lora.quantize_4bit_(model, device, compute_dtype=dtype)
    if cfg.offload_embeddings:  # as toolkit.lora.load_base
        offload_input_embeddings(model)
    return model


def fixed_dataset(rows: int, seq: int, vocab: int, seed: int = 0):
    """`rows` random rows of `seq` tokens; the last (1 - PROMPT_SHARE) of each is completion."""
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen).tolist()
    prompt = int(seq * PROMPT_SHARE)
    mask = [[0] * prompt + [1] * (seq - prompt)] * rows
    return Dataset.from_dict({"input_ids": ids, "completion_mask": mask})


def corpus_lengths() -> list[tuple[int, int]]:
    return [tuple(p) for p in json.loads(LENGTHS_FILE.read_text(encoding="utf-8"))["pairs"]]


def corpus_dataset(examples: int, vocab: int, seed: int = 0):
    """`examples` random-token rows with (prompt, completion) lengths drawn from the zh-nan corpus."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    pairs = corpus_lengths()
    ids, masks = [], []
    for _ in range(examples):
        prompt, completion = rng.choice(pairs)
        ids.append([rng.randrange(vocab) for _ in range(prompt + completion)])
        masks.append([0] * prompt + [1] * completion)
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def portable(path: Path) -> str:
    """`path` relative to the repository root (e.g. ../shared/...), so the committed file names no machine path."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def write_lengths(prep_dir: Path, out: Path = LENGTHS_FILE, sample: int = 2048, seed: int = 0) -> Path:
    """(prompt, completion) token counts of `sample` training examples of a prep folder (real tokenizer)."""
    import random

    from toolkit import artifacts, train
    from toolkit.tokenizer import tiktoken_encoding

    prep = artifacts.read_manifest(prep_dir, "prep")
    rows = train.read_examples(Path(prep_dir) / "train.jsonl")
    rows = random.Random(seed).sample(rows, min(sample, len(rows)))
    enc = tiktoken_encoding()
    pairs = [[len(enc.encode(p[k], allowed_special="all")) for k in ("prompt", "completion")]
             for p in train.to_pairs(rows, "harmony", prep["config"])]
    corpus = [Path(i["path"]) for i in prep.get("inputs") or []][:1] or [Path(prep_dir)]
    source = f"{portable(corpus[0])} -> toolkit prep -> {len(pairs)} sampled train examples, o200k_harmony token counts"
    artifacts.atomic_write_json(out, {"source": source, "examples": len(pairs), "pairs": pairs})
    return out


def step_timer(sync):
    """A TrainerCallback: synchronized wall clock and input tokens at each step end, losses as logged."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[int, float, int]] = []
            self.losses: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.marks.append((0, time.perf_counter(), state.num_input_tokens_seen))

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return StepTimer()


def matmul_peak(device: str, n: int = 8192, reps: int = 10) -> float | None:
    """Measured bf16 matmul rate (FLOP/s) on random data: median of `reps` n^3 products after warm-up."""
    import torch

    if device != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times)


def check_packing(device: str) -> dict[str, float]:
    """Max |logit| difference between packed (one row, per-example positions) and separate examples on a tiny
    random gpt-oss with flex attention, without and with toolkit.packing's masks."""
    import torch

    from toolkit import config, packing

    cfg = dataclasses.replace(config.build("train", "tiny-cpu"), attn_implementation="flex_attention",
                              experts_implementation="eager", dtype="float32", device=device)
    model_cfg = model_config(tiny=True)
    model = build_model(cfg, model_cfg, device, seed=1).eval()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model_cfg.vocab_size, (n,), generator=gen).to(device) for n in (11, 17, 5)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(x), device=device) for x in seqs])[None]
    out = {}
    with torch.no_grad():
        separate = torch.cat([model(input_ids=x[None]).logits[0] for x in seqs])
        out["unmasked"] = (model(input_ids=ids, position_ids=pos).logits[0] - separate).abs().max().item()
        packing.mask_packed_examples(model)
        out["masked"] = (model(input_ids=ids, position_ids=pos).logits[0] - separate).abs().max().item()
    return out


FP8_MAX = 448.0  # largest float8_e4m3fn


def fp8_rowwise(x, dim: int = -1):
    """(float8_e4m3fn tensor, float32 scale) with x ~= q * scale, one scale per slice along `dim` (amax scaling)."""
    import torch

    amax = x.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(dim)


def probe_fp8(device: str, reps: int = 20) -> list[dict[str, Any]]:
    """bf16 vs FP8 (rowwise-scaled e4m3) grouped GEMMs at gpt-oss-20b's expert shapes, uniform routing.

    For each (routed rows S, K, N): ms of `grouped_mm` in bf16, of `torch._scaled_grouped_mm` on
    pre-quantized operands (the frozen weight quantized once), and of the same with the activations
    quantized each call (what a training step would pay), and the FP8 result's relative error. Gives the
    ceiling of the FP8 lever before anyone builds it into the expert path.
    """
    import torch

    if device != "cuda":
        return [{"error": "FP8 grouped GEMMs need a CUDA GPU (Hopper or later)"}]
    experts, out = 32, []

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    # routed rows: lora micro-batch 4 x 2048 tokens and qlora 1 x 2048, x top-4; K x N: gate_up forward,
    # down forward, gate_up backward (grad of the input), down backward
    for rows in (4 * 2048 * 4, 2048 * 4):
        for k, n in ((2880, 5760), (2880, 2880), (5760, 2880)):
            entry: dict[str, Any] = {"rows": rows, "k": k, "n": n}
            try:
                entry.update(_probe_shape(rows, k, n, experts, device, timed))
            except Exception as exc:  # noqa: BLE001  (a probe; the table rows still run)
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            out.append(entry)
            torch.cuda.empty_cache()
    return out


def _probe_shape(rows: int, k: int, n: int, experts: int, device: str, timed) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(experts, n, k, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    offs = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * (rows // experts)
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    ref = grouped(x, w.transpose(-2, -1), offs=offs)
    wq, ws = fp8_rowwise(w)  # [E, N, K] e4m3, scale [E, N]: the frozen weight, quantized once

    def fp8(xq, xs):
        return torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offs=offs, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

    xq, xs = fp8_rowwise(x)
    got = fp8(xq, xs)
    entry: dict[str, Any] = {"rel_err": round(((got.float() - ref.float()).norm() / ref.float().norm()).item(), 4)}
    entry["bf16_ms"] = round(timed(lambda: grouped(x, w.transpose(-2, -1), offs=offs)), 3)
    entry["fp8_ms"] = round(timed(lambda: fp8(xq, xs)), 3)
    entry["fp8_with_quant_ms"] = round(timed(lambda: fp8(*fp8_rowwise(x))), 3)  # activations quantized each call
    entry["bf16_tflops"] = round(2 * rows * k * n / entry["bf16_ms"] / 1e9, 1)
    entry["speedup_with_quant"] = round(entry["bf16_ms"] / entry["fp8_with_quant_ms"], 2)
    return entry


def extra_steps(row: Row, args: argparse.Namespace) -> list[str]:
    """The untimed steps a row runs after its timed ones, in order: "profile" (--profile), "memory" (--memory)."""
    return [kind for kind in ("profile", "memory") if row.name in getattr(args, kind, ())]


def row_config(row: Row, args: argparse.Namespace):
    from toolkit import config

    cfg = config.build("train", row.preset)
    fields = {
        **row.train, "max_length": row.seq, "batch_size": row.batch, "grad_accum": row.accum,
        "max_steps": args.warmup + args.steps + len(extra_steps(row, args)),
        "eval_steps": 0, "save_steps": 0, "logging_steps": 1,
        "report_to": "none", "device": args.device, "seed": args.seed,
    }
    if args.tiny:
        fields.update(dtype="float32" if args.device == "cpu" else "bfloat16", expert_layers=[1],
                      optimizer="adamw_torch")
    cfg = dataclasses.replace(cfg, **fields)
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


class _LigerPatches:
    """Liger patches gpt-oss module globals (RoPE, RMSNorm class): undo them so later rows run without."""

    def __enter__(self):
        from transformers.models.gpt_oss import modeling_gpt_oss as m

        self.saved = {k: getattr(m, k) for k in ("apply_rotary_pos_emb", "GptOssRMSNorm")}
        self.forward = m.GptOssForCausalLM.forward
        return self

    def __exit__(self, *exc):
        from transformers.models.gpt_oss import modeling_gpt_oss as m

        for k, v in self.saved.items():
            setattr(m, k, v)
        m.GptOssForCausalLM.forward = self.forward
        return False


class ModelCache:
    """The last row's LoRA model, reused by the next row when only per-row settings differ.

    Per-row settings: sequence length, micro-batch, accumulation, checkpointing interval (the Trainer sets it
    on every layer), `compile_layers` and `fused_experts` (applied or removed here). Everything else (mode, kernels, LoRA
    placement, offload) is the cache key. On reuse the LoRA weights go back to their initial values, so
    step 1 sees the same weights as a fresh build (a qlora build costs ~8 s of quantization; a bf16 one <1 s).
    """

    FIELDS: ClassVar[dict[str, Any]] = {"max_length": 0, "batch_size": 1, "grad_accum": 1, "max_steps": 0,
                                         "checkpoint_every_n_layers": 1, "compile_layers": "off",
                                         "fused_experts": False, "activation_offloading": False}

    def __init__(self):
        self.key: str | None = None
        self.model = None
        self.initial: dict[str, Any] = {}
        self.base_gib = 0.0  # allocated before the model was built

    @classmethod
    def key_of(cls, cfg) -> str:
        from toolkit.config import as_dict

        return json.dumps(as_dict(dataclasses.replace(cfg, **cls.FIELDS)), sort_keys=True, default=str)

    def clear(self, device: str) -> None:
        self.key, self.model, self.initial = None, None, {}
        free_memory(device)

    def get(self, cfg, config, device: str, seed: int) -> tuple[Any, bool]:
        """(the LoRA model for `cfg`, whether it was reused), compiled or not as `cfg.compile_layers` says."""
        import torch

        from toolkit import fused_experts, lora, regional_compile

        key = self.key_of(cfg)
        reused = key == self.key
        if reused:
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if name in self.initial:
                        param.copy_(self.initial[name])
                        param.grad = None
        else:
            self.clear(device)
            self.base_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
            plain = dataclasses.replace(cfg, compile_layers="off")
            self.model = lora.attach_lora(build_model(plain, config, device, seed=seed), plain)
            self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            self.key = key
        fused_experts.disable(self.model)
        if cfg.fused_experts:
            fused_experts.enable(self.model)
        for layer in regional_compile.decoder_layers(self.model):
            layer._compiled_call_impl = None  # what nn.Module.compile sets; None runs the plain forward
        regional_compile.compile_layers(self.model, cfg.compile_layers)
        return self.model, reused


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def profiler():
    """torch.profiler over the CPU and, where there is one, the GPU (enter it, then `profiler_tables`)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def profiler_tables(prof: Any, top: int) -> str:
    """A finished `profiler()`'s operator tables: by self device time, then by self CPU time (where the GPU waits
    on Python)."""
    import torch

    events = prof.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return (f"## by self device time\n{events.table(sort_by=device_key, row_limit=top)}\n"
            f"## by self CPU time\n{events.table(sort_by='self_cpu_time_total', row_limit=top)}\n")


def step_profiler(step: int, out: Path, top: int = 30):
    """A TrainerCallback: torch.profiler over optimizer step `step` (1-based); the kernel and operator tables
    (by self device time, then by self CPU time: where the GPU waits on Python) go to `out`."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:
                self.prof = profiler()
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            out.write_text(f"# step {step}\n" + profiler_tables(self.prof, top), encoding="utf-8")
            print(f"# profile of step {step} -> {out}", file=sys.stderr, flush=True)
            self.prof = None

    return StepProfiler()


def step_memory(step: int, out: Path, top: int = 20):
    """A TrainerCallback: CUDA allocator history over optimizer step `step` (1-based); what is allocated at that
    step's peak, grouped by the innermost frame of toolkit / transformers / peft / trl / bitsandbytes code
    (`peak_breakdown`), goes to `out`. That step runs `train.fused_experts`' functions eagerly (their compiled
    form failed under the recording), so its peak can differ from the timed steps' (`timed_peak`, the row's)."""
    import torch
    from transformers import TrainerCallback

    from toolkit import fused_experts

    class StepMemory(TrainerCallback):
        base = None
        timed_peak = None  # bytes (allocated, reserved) at the peak of the steps before this one: the row's

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step and torch.cuda.is_available():
                torch.cuda.synchronize()
                self.timed_peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
                self.base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fused_experts.eager(True)  # Python stacks cannot be recorded inside its compiled functions
                torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")  # C++ stacks: minutes

        def on_step_end(self, args, state, control, **kwargs):
            if self.base is None:
                return
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            fused_experts.eager(False)
            text = (f"# step {step}: allocated at its start {self.base / 2**30:.2f} GiB, its peak "
                    f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB\n"
                    + peak_breakdown(snapshot["device_traces"][torch.cuda.current_device()], self.base, top))
            out.write_text(text, encoding="utf-8")
            print(text, file=sys.stderr, flush=True)
            self.base = None

    return StepMemory()


OWN_CODE = ("/toolkit/", "/transformers/", "/peft/", "/trl/", "/bitsandbytes/", "/accelerate/")


def peak_breakdown(trace: list[dict[str, Any]], base: int = 0, top: int = 20) -> str:
    """The blocks live at the highest point of an allocator trace (torch.cuda.memory._snapshot()'s
    device_traces[i]: alloc / free_completed events with their stacks), summed by the innermost frame in
    OWN_CODE (else the innermost frame); `base`: bytes allocated before the trace began."""
    live: dict[int, dict[str, Any]] = {}
    current = peak = 0
    at_peak: list[dict[str, Any]] = []
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    groups: dict[str, list[int]] = {}
    for event in at_peak:
        frames = event.get("frames") or []
        frame = next((f for f in frames if any(part in f["filename"] for part in OWN_CODE)),
                     frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
        key = f"{frame['filename'].rsplit('/site-packages/', 1)[-1]}:{frame['line']} {frame['name']}"
        entry = groups.setdefault(key, [0, 0])
        entry[0] += event["size"]
        entry[1] += 1
    title = (f"## live at the trace's peak: {peak / 2**30:.3f} GiB above the start ({(base + peak) / 2**30:.2f} GiB "
             "in all), by allocating frame")
    lines = [title, "| GiB | blocks | frame |", "|---|---|---|"]
    for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {size / 2**30:.3f} | {count} | {key} |")
    return "\n".join(lines) + "\n"


def dynamo_counters() -> dict[str, Any]:
    """What torch.compile did during a row: graphs compiled, graph breaks (top reasons), recompiles."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {"unique_graphs": counters.get("stats", {}).get("unique_graphs", 0),
            "graph_breaks": sum(breaks.values()),
            "break_reasons": [f"{n}x {r[:200]}" for r, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:3]]}


def run_row(row: Row, args: argparse.Namespace, tokenizer: Any, peak: float | None,
            cache: ModelCache | None = None) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    from toolkit import fused_experts, lora, train

    cache = cache or ModelCache()
    cfg = row_config(row, args)
    lora.check_preconditions(cfg)
    config = model_config(args.tiny, args.layers)
    steps = args.warmup + args.steps
    if row.data == "fixed":
        dataset = fixed_dataset(row.batch * row.accum, row.seq, config.vocab_size, seed=args.seed)
    else:
        mean = statistics.fmean(p + c for p, c in corpus_lengths())
        per_step = row.batch * row.accum * (int(row.seq / mean) + 1 if cfg.packing else 1)
        dataset = corpus_dataset(per_step * steps, config.vocab_size, seed=args.seed)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    started = time.perf_counter()
    model, reused = cache.get(cfg, config, args.device, args.seed)
    start_gib = cache.base_gib  # what earlier rows left behind, without this row's model
    build_s = time.perf_counter() - started
    timer = step_timer(sync)
    callbacks = [timer]
    extra = extra_steps(row, args)
    for i, kind in enumerate(extra, start=steps + 1):
        recorder = step_profiler if kind == "profile" else step_memory
        callbacks.append(recorder(i, args.out / f"{kind}-{safe_name(row.name)}.txt"))
    counters.clear()
    with tempfile.TemporaryDirectory() as tmp, _LigerPatches():
        trainer = train.build_trainer(cfg, model, tokenizer, "harmony", dataset, None, Path(tmp), callbacks)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with train.recompile_limit(cfg):  # the dynamo settings of flex attention and compiled layers
                trainer.train()
        finally:
            if cuda and "memory" in extra:  # a failed step must not leave the allocator recording
                torch.cuda.memory._record_memory_history(enabled=None)
                fused_experts.eager(False)
        sync()
        mem = (None, None)
        if cuda:  # the timed steps' peak: a recorded step (run eagerly, after them) reports its own in its file
            timed = next((c.timed_peak for c in callbacks if getattr(c, "timed_peak", None)), None)
            alloc, reserved = timed or (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            mem = (alloc / 2**30 - start_gib, reserved / 2**30 - start_gib)
        del trainer
    del model
    marks = timer.marks
    if len(marks) < steps + 1:
        raise RuntimeError(f"only {len(marks) - 1} steps ran, expected {steps}")
    (_, t0, n0), (_, t1, n1) = marks[args.warmup], marks[steps]  # a profiled step after these is not timed
    tps = (n1 - n0) / (t1 - t0)
    losses = [timer.losses[k] for k in sorted(timer.losses)]
    return {
        "tokens_per_s": tps, "peak_alloc_gib": mem[0], "peak_reserved_gib": mem[1],
        "mfu": 6 * ACTIVE_PARAMS * tps / peak if peak else None,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "step_s": [round(b[1] - a[1], 4) for a, b in itertools.pairwise(marks)],
        "tokens_per_step": [b[2] - a[2] for a, b in itertools.pairwise(marks)],
        "build_s": round(build_s, 2), "start_gib": round(start_gib, 3), "model_reused": reused,
        "accum": row.accum, "dynamo": dynamo_counters() if cfg.compile_layers != "off" else None,
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_row(result: dict[str, Any], recipe_tps: float | None = None) -> str:
    """One markdown row; `recipe_tps`: the recipe row's tokens/s in the same run (for the x recipe column)."""
    head = f"| {result['row']} | {result['seq']} | {result['batch']} x {result.get('accum', 1)} |"
    if result.get("error"):
        return f"{head} error: {result['error'][:160]} | | | | | | |"
    mem = f"{_fmt(result['peak_alloc_gib'], '.1f')} / {_fmt(result['peak_reserved_gib'], '.1f')}"
    mfu = _fmt(result["mfu"] and 100 * result["mfu"], ".1f")
    ratio = _fmt(recipe_tps and result["tokens_per_s"] / recipe_tps, ".2f")
    dyn = result.get("dynamo")
    compiled = f"{dyn['unique_graphs']} / {dyn['graph_breaks']}" if dyn else "-"
    return (f"{head} {result['tokens_per_s']:,.0f} | {ratio} | {mem} | {mfu}% | {_fmt(result['loss_first'], '.4f')} | "
            f"{_fmt(result['loss_last'], '.4f')} | {compiled} |")


HEADER = ("| config | seq | micro-batch x accum | tokens/s | x recipe | peak GiB (alloc / reserved) | MFU | "
          "loss step 1 | loss last | compiled graphs / breaks |\n|---|---|---|---|---|---|---|---|---|---|")


def recipe_rate(results: list[dict[str, Any]]) -> float | None:
    """tokens/s of the run's recipe row at seq 2048 (the issues' baseline), if it ran."""
    return next((r["tokens_per_s"] for r in results if r["row"] == "recipe-2048" and not r.get("error")), None)


def free_memory(device: str) -> float | None:
    import torch

    gc.collect()
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
                 "triton"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(PRIORITY),
                        help=f"comma-separated, from: {', '.join(ROWS)}; or a named list: {', '.join(ROW_SETS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2-layer toy shapes (tests, CPU)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 24; tiny 2)")
    parser.add_argument("--seq-scale", type=float, default=1.0, help="multiply every row's seq (tiny runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip rows that would start after this")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    parser.add_argument("--profile", default="", help="comma-separated rows to profile one extra step of "
                        "(torch.profiler tables to OUT/profile-ROW.txt; the step is not timed)")
    parser.add_argument("--memory", default="", help="comma-separated rows to record the CUDA allocator over one "
                        "extra step of (what is live at its peak, by allocating frame, to OUT/memory-ROW.txt). "
                        "That step runs train.fused_experts' functions eagerly: recorded, their compiled form "
                        "failed on the H200 (SystemError in a recompute, 2026-12-03)")
    parser.add_argument("--probe-fp8", action="store_true", help="time bf16 vs FP8 grouped GEMMs at the expert shapes")
    parser.add_argument("--check-packing", action="store_true", help="packed vs separate logits, flex attention")
    parser.add_argument("--write-lengths", type=Path, metavar="PREP_DIR",
                        help="write bench/zh_nan_lengths.json from a prep folder and exit")
    args = parser.parse_args(argv)
    args.profile = {n.strip() for n in args.profile.split(",") if n.strip()}
    args.memory = {n.strip() for n in args.memory.split(",") if n.strip()}
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.write_lengths:
        print(write_lengths(args.write_lengths))
        return []
    names = [n for part in args.rows.split(",") if part.strip() for n in ROW_SETS.get(part.strip(), [part.strip()])]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    import torch

    from toolkit.tiny import build_bpe_tokenizer

    started = time.perf_counter()
    env = versions()
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    if args.device == "cuda":
        import torch._dynamo

        # many models, masks and shapes in one process: without this, flex attention falls back to its slow
        # eager form once dynamo's default limit of 8 recompiles is reached (seen in the first device run)
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
    peak = matmul_peak(args.device)
    env["bf16_matmul_tflops"] = peak and round(peak / 1e12, 1)
    print(f"# train_speed {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {json.dumps(env)}", flush=True)
    if args.check_packing:
        try:
            env["packing_check_max_abs_logit_diff"] = check_packing(args.device)
        except Exception as exc:  # noqa: BLE001
            env["packing_check_max_abs_logit_diff"] = f"{type(exc).__name__}: {exc}"
        print(f"# packing check (flex attention, {args.device}): {env['packing_check_max_abs_logit_diff']}",
              flush=True)
    if args.probe_fp8:
        env["fp8_probe"] = probe_fp8(args.device)
        for entry in env["fp8_probe"]:
            print(f"# fp8 probe: {json.dumps(entry)}", flush=True)
    tokenizer = build_bpe_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    cache = ModelCache()
    for name in names:
        row = ROWS[name]
        if args.seq_scale != 1.0:
            row = dataclasses.replace(row, seq=max(8, int(row.seq * args.seq_scale)))
        result: dict[str, Any] = {"row": row.name, "seq": row.seq, "batch": row.batch, "accum": row.accum,
                                  "preset": row.preset, "train": row.train, "data": row.data}
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            result["error"] = "skipped: out of time (--budget-s)"
        else:
            try:
                result.update(run_row(row, args, tokenizer, peak, cache))
            except Exception as exc:  # noqa: BLE001  (one failing lever must not stop the table)
                result["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                traceback.print_exc()
                cache.clear(args.device)  # a model left half-way through a failed step is not reused
        result["leftover_gib"] = free_memory(args.device)
        results.append(result)
        print(table_row(result, recipe_rate(results)), flush=True)
        (args.out / "train_speed.json").write_text(json.dumps({"env": env, "rows": results}, indent=1),
                                                   encoding="utf-8")
    order = {n: i for i, n in enumerate(ROWS)}
    print(f"\nbf16 matmul peak measured: {_fmt(env['bf16_matmul_tflops'], '.0f')} TFLOP/s; "
          f"{env.get('gpu', args.device)}; {json.dumps({k: v for k, v in env.items() if k != 'gpu'})}")
    print(HEADER)
    for result in sorted(results, key=lambda r: order[r["row"]]):
        print(table_row(result, recipe_rate(results)))
    return results


if __name__ == "__main__":
    main()
