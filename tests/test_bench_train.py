"""bench/train_speed.py on the CPU at toy size: the logic of the GPU benchmark (issue 8), and its switches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import train_speed


def test_full_size_config_is_gpt_oss_20b():
    import torch
    from transformers import GptOssForCausalLM

    config = train_speed.model_config()
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"] and len(config.layer_types) == 24
    with torch.device("meta"):
        model = GptOssForCausalLM._from_config(config, dtype=torch.bfloat16)
    # gpt-oss-20b: 20.9B parameters (model card), 32 experts of hidden 2880, vocabulary 201,088
    assert sum(p.numel() for p in model.parameters()) == 20_914_757_184
    assert tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape) == (32, 2880, 5760)


def test_random_model_is_seeded_and_initialised(tmp_path):
    import torch

    cfg = train_speed.row_config(train_speed.ROWS["recipe-1024"], _args(tmp_path))
    config = train_speed.model_config(tiny=True)
    a = train_speed.build_model(cfg, config, "cpu", seed=3)
    b = train_speed.build_model(cfg, config, "cpu", seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb), name
    layer = a.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not layer.mlp.experts.gate_up_proj_bias.any() and layer.mlp.experts.gate_up_proj.std() > 0.01
    assert a.model.rotary_emb.inv_freq.isfinite().all() and a.model.rotary_emb.inv_freq.max() > 0.1


def test_datasets_mask_prompts():
    fixed = train_speed.fixed_dataset(rows=2, seq=40, vocab=100)
    assert len(fixed) == 2 and all(len(r) == 40 for r in fixed["input_ids"])
    assert fixed["completion_mask"][0] == [0] * 30 + [1] * 10
    corpus = train_speed.corpus_dataset(8, vocab=100)
    pairs = set(train_speed.corpus_lengths())
    for ids, mask in zip(corpus["input_ids"], corpus["completion_mask"], strict=True):
        assert (mask.count(0), mask.count(1)) in pairs and len(ids) == len(mask)


def _args(tmp_path, *extra):
    import argparse

    ns = argparse.Namespace(tiny=True, device="cpu", layers=None, steps=1, warmup=1, seed=0, out=tmp_path)
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        setattr(ns, key, value)
    return ns


def test_tiny_rows_on_cpu(tmp_path, capsys):
    rows = "recipe-2048,grouped_mm-2048,flex-2048"
    results = train_speed.main(["--tiny", "--device", "cpu", "--rows", rows, "--seq-scale", str(1 / 64),
                                "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    by_name = {r["row"]: r for r in results}
    recipe, grouped = by_name["recipe-2048"], by_name["grouped_mm-2048"]
    for r in (recipe, grouped):
        assert "error" not in r, r.get("error")
        assert r["seq"] == 32 and r["tokens_per_step"] == [4 * 32, 4 * 32] and r["tokens_per_s"] > 0
    # same weights, same batch: the experts loop and grouped GEMMs give the same loss (float32 on the CPU)
    assert recipe["loss_first"] == pytest.approx(grouped["loss_first"], rel=1e-4)
    assert 5.0 < recipe["loss_first"] < 9.0  # about ln(1024) for random weights
    # transformers' flex attention refuses sinks on the CPU: an error row, and the table still printed
    assert "CPU" in by_name["flex-2048"]["error"]
    out = capsys.readouterr().out
    assert out.count("| recipe-2048 | 32 | 4 x 1 |") == 2 and "| config | seq |" in out
    assert out.count(f"| {recipe['tokens_per_s']:,.0f} | 1.00 |") == 2  # the x recipe column
    saved = json.loads((tmp_path / "train_speed.json").read_text())
    assert [r["row"] for r in saved["rows"]] == rows.split(",")


def test_unknown_row_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        train_speed.main(["--tiny", "--device", "cpu", "--rows", "nope", "--out", str(tmp_path)])


def test_switches_reach_transformers_and_trl():
    from toolkit import config, lora, train
    from toolkit.errors import ConfigError

    cfg = config.build("train", "tiny-cpu", ["train.experts_implementation=eager",
                                             "train.gradient_checkpointing=true",
                                             "train.checkpoint_every_n_layers=2"])
    assert lora.kernel_kwargs(cfg) == {"attn_implementation": "eager", "experts_implementation": "eager"}
    assert train.checkpointing_kwargs(cfg) == {"use_reentrant": False, "every_n_layers": 2}
    auto = config.build("train", "tiny-cpu")
    assert "experts_implementation" not in lora.kernel_kwargs(auto)
    assert train.checkpointing_kwargs(auto) is None  # tiny-cpu trains without checkpointing
    offloaded = config.build("train", "tiny-cpu", ["train.activation_offloading=true", "train.device=cuda"])
    assert train.training_args(offloaded, Path("/nonexistent"), "harmony").activation_offloading
    assert not train.training_args(auto, Path("/nonexistent"), "harmony").activation_offloading
    with pytest.raises(ConfigError, match="activation_offloading"):
        config.build("train", "tiny-cpu", ["train.activation_offloading=true", "train.device=cpu"])
    with pytest.raises(ConfigError, match="needs every layer recomputed"):  # the lora preset checkpoints every 12th
        config.build("train", "gpt-oss-20b-lora", ["train.activation_offloading=true"])
    import dataclasses
    import importlib.util

    from toolkit.errors import ExternalToolError

    if importlib.util.find_spec("liger_kernel") is None:  # fails before any weights load, with the fix
        with pytest.raises(ExternalToolError, match="liger_kernel=false"):
            lora.check_preconditions(dataclasses.replace(auto, liger_kernel=True))
    lora_preset, qlora_preset = config.build("train", "gpt-oss-20b-lora"), config.build("train", "gpt-oss-20b-qlora")
    assert lora.kernel_kwargs(lora_preset) == {"attn_implementation": "flex_attention",
                                               "experts_implementation": "grouped_mm"}
    # the fast path the lora preset uses: recompute every 12th layer, expert LoRA as low-rank grouped GEMMs, the
    # MoE element-wise work fused; qlora: micro-batch 6 with the layer inputs offloaded (every layer recomputed)
    assert lora_preset.liger_kernel and train.checkpointing_kwargs(lora_preset)["every_n_layers"] == 12
    assert lora_preset.lowrank_experts and qlora_preset.lowrank_experts
    assert lora_preset.fused_experts and qlora_preset.fused_experts and not lora_preset.activation_offloading
    assert qlora_preset.activation_offloading and train.checkpointing_kwargs(qlora_preset) == {"use_reentrant": False}
    assert (qlora_preset.batch_size, qlora_preset.grad_accum) == (6, 3)  # 13.9 GiB on the H200, 2026-12-03
    assert qlora_preset.offload_embeddings and not qlora_preset.liger_kernel  # measured: liger costs qlora 1 GiB
    # eval on the lora preset's 80 GB card in batches of 256 (24x the old path on the H200); smaller cards: 32
    eval_batches = [config.build("eval", p).batch_size for p in ("gpt-oss-20b-lora", "gpt-oss-20b-qlora")]
    assert eval_batches == [256, 32]
    with pytest.raises(ConfigError) as err:
        config.build("train", "tiny-cpu", ["train.experts_implementation=fast", "train.liger_kernel=true"])
    assert "train.experts_implementation" in str(err.value) and "train.liger_kernel" in str(err.value)


def test_multi_gpu_table_scales_per_gpu_throughput_against_the_single_run(tmp_path):
    """bench/multi_gpu.py: per-GPU tokens/s and the scaling efficiency against the 1-GPU run of the same code."""
    import multi_gpu

    def run(name, processes, steady, peaks):
        folder = tmp_path / name
        folder.mkdir()
        metrics = {"parallelism": name, "processes": processes, "steps": 12, "tokens_seen": 1, "tokens_per_second": 1,
                   "steady_tokens_per_second": steady, "train_loss": 9.9,
                   "peak_gpu_memory_gib": {"allocated": peaks, "reserved": peaks}}
        (folder / "manifest.json").write_text(json.dumps({"metrics": metrics, "outputs": []}))
        return folder

    rows = multi_gpu.with_scaling([multi_gpu.run_summary(run("single", 1, 12963.2, [70.7])),
                                   multi_gpu.run_summary(run("fsdp2", 2, 19321.5, [52.9, 52.7]))])
    assert rows[1]["per_gpu"] == pytest.approx(9660.8, abs=0.1)
    assert rows[1]["scaling"] == pytest.approx(9660.8 / 12963.2, abs=1e-3)
    text = multi_gpu.table(rows)
    assert "| fsdp2 | fsdp2 | 2 | 12 | 19,322 | 9,661 | 74% | 52.9 / 52.7 |" in text


def test_lengths_file_names_its_corpus_relative_to_the_repository(tmp_path):
    from toolkit import corpus
    from toolkit.config import PrepConfig

    corpus.prepare(PrepConfig(), ROOT / "corpora" / "zh-nan-moe-sample" / "sample.tsv", tmp_path / "prep")
    out = train_speed.write_lengths(tmp_path / "prep", out=tmp_path / "lengths.json", sample=16)
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["source"].startswith("corpora/zh-nan-moe-sample/sample.tsv -> toolkit prep -> 16 sampled")
    assert written["examples"] == 16 and all(p > 0 and c > 0 for p, c in written["pairs"])
    recorded = json.loads((ROOT / "bench" / "zh_nan_lengths.json").read_text(encoding="utf-8"))["source"]
    assert not Path(recorded.split(" ")[0]).is_absolute()


def test_row_sets_name_known_rows():
    for name, rows in train_speed.ROW_SETS.items():
        assert rows and all(r in train_speed.ROWS for r in rows), name
    issue21 = train_speed.ROW_SETS["issue21"]
    # the table of issue 21: recipe and both presets first, qlora at its own max_length (1024) and at 2048
    assert issue21[:4] == ["recipe-2048", "lora-2048", "qlora-2048", "qlora-1024"]
    # measured against the presets of their time; the presets as shipped now have rows of their own
    assert train_speed.ROWS["lora-2048"].train == train_speed.LORA_UNTIL_1203
    assert train_speed.ROWS["lora+fused-2048"].train == {"checkpoint_every_n_layers": 4, "fused_experts": True}
    assert train_speed.ROWS["qlora-1024"].seq == 1024 and train_speed.ROWS["lora-preset-2048"].train == {}


def test_reused_model_starts_each_row_from_the_same_weights(tmp_path):
    """ModelCache: a row that differs only in per-row settings reuses the last row's model, with the LoRA
    weights put back, so its step-1 loss equals a fresh build's; micro-batches x accumulation are counted."""
    fresh = train_speed.main(["--tiny", "--device", "cpu", "--rows", "recipe-2048", "--seq-scale", str(1 / 64),
                              "--steps", "1", "--warmup", "1", "--out", str(tmp_path / "a")])[0]
    both = train_speed.main(["--tiny", "--device", "cpu", "--rows", "recipe-1024,recipe-2048", "--seq-scale",
                             str(1 / 64), "--steps", "1", "--warmup", "1", "--out", str(tmp_path / "b")])
    assert [r["model_reused"] for r in both] == [False, True]
    assert both[1]["loss_first"] == pytest.approx(fresh["loss_first"], abs=1e-6)
    assert both[1]["loss_last"] == pytest.approx(fresh["loss_last"], abs=1e-6)

    from toolkit.tiny import build_bpe_tokenizer

    row = train_speed.Row("accum", "gpt-oss-20b-lora", 16, 2, train_speed.RECIPE, accum=3)
    result = train_speed.run_row(row, _args(tmp_path), build_bpe_tokenizer(), None)
    assert result["tokens_per_step"] == [2 * 3 * 16, 2 * 3 * 16] and result["accum"] == 3


def test_model_cache_turns_compilation_on_and_off(tmp_path):
    import dataclasses

    from toolkit import regional_compile

    args = _args(tmp_path)
    cfg = train_speed.row_config(train_speed.ROWS["recipe-2048"], args)
    cache = train_speed.ModelCache()
    config = train_speed.model_config(tiny=True)
    model, reused = cache.get(dataclasses.replace(cfg, compile_layers="default"), config, "cpu", 0)
    layers = regional_compile.decoder_layers(model)
    assert not reused and len(layers) == 2 and all(m._compiled_call_impl is not None for m in layers)
    again, reused = cache.get(dataclasses.replace(cfg, max_length=64, batch_size=1), config, "cpu", 0)
    assert reused and again is model and all(m._compiled_call_impl is None for m in layers)
    other, reused = cache.get(dataclasses.replace(cfg, lora_r=16), config, "cpu", 0)
    assert not reused and other is not model


def test_fp8_rowwise_scaling_round_trips():
    import torch

    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)[:, None]
    q, scale = train_speed.fp8_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = q.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself, whatever the row's magnitude (values below
    # 2^-6 of the scale are subnormal: within half their spacing, 2^-10 of the scale)
    assert ((back - x).abs() <= x.abs() * 2**-4 + scale[:, None] * 2**-10).all()
    assert ((back - x).norm(dim=1) / x.norm(dim=1)).max() < 0.05
    assert train_speed.probe_fp8("cpu")[0]["error"].startswith("FP8 grouped GEMMs need a CUDA GPU")


def test_profiled_step_is_extra_and_untimed(tmp_path):
    result = train_speed.main(["--tiny", "--device", "cpu", "--rows", "recipe-2048", "--seq-scale", str(1 / 64),
                               "--steps", "1", "--warmup", "1", "--profile", "recipe-2048",
                               "--out", str(tmp_path)])[0]
    assert "error" not in result, result.get("error")
    assert len(result["step_s"]) == 3  # warm-up, timed, profiled
    timed = result["tokens_per_step"][1] / result["step_s"][1]
    assert result["tokens_per_s"] == pytest.approx(timed, rel=0.02)
    text = (tmp_path / "profile-recipe-2048.txt").read_text()
    assert "## by self CPU time" in text and "aten::" in text


def test_peak_breakdown_sums_the_blocks_live_at_the_peak_by_frame():
    def frames(*names):
        return [{"filename": f"/x/site-packages/{n}.py", "line": 1, "name": n.rsplit("/", 1)[-1]} for n in names]

    gib = 2**30
    trace = [
        {"action": "alloc", "addr": 1, "size": 2 * gib, "frames": frames("torch/nn/functional", "toolkit/lora")},
        {"action": "alloc", "addr": 2, "size": gib, "frames": frames("bitsandbytes/functional")},
        {"action": "alloc", "addr": 3, "size": gib, "frames": frames("torch/other")},  # peak: 4 GiB live
        {"action": "free_completed", "addr": 1, "size": 2 * gib},
        {"action": "alloc", "addr": 4, "size": gib // 2, "frames": frames("toolkit/lora")},  # 2.5 GiB: below
    ]
    text = train_speed.peak_breakdown(trace, base=10 * gib)
    assert "4.000 GiB above the start (14.00 GiB in all)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "GiB |" not in line]
    assert rows[0].startswith("| 2.000 | 1 | toolkit/lora.py:1 lora")  # the innermost own frame, not torch's
    assert {r.split(" | ")[2] for r in rows[1:]} == {"bitsandbytes/functional.py:1 functional |",
                                                     "torch/other.py:1 other |"}
