"""MXFP4 codec, streamed checkpoints and layer-by-layer logits on the tiny gpt-oss in the released layout."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from toolkit import checkpoint, layerwise, mxfp4


def reference_dequantize(blocks, scales):
    """transformers' own dequantizer (the one `Mxfp4Config(dequantize=True)` uses)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def test_dequantize_matches_transformers():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 8, 4), generator=gen, dtype=torch.uint8)
    assert torch.equal(mxfp4.dequantize_param(blocks, scales), reference_dequantize(blocks, scales))


def test_round_trip_is_exact_for_representable_values():
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 16, 3, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 140, (2, 16, 3), generator=gen, dtype=torch.uint8)
    x = mxfp4.dequantize_param(blocks, scales)
    again = mxfp4.dequantize_param(*mxfp4.quantize_param(x))
    assert torch.equal(again, x)


def test_quantize_rounds_to_nearest_representable_value():
    x = torch.randn(2, 64, 96, generator=torch.Generator().manual_seed(2))
    y = mxfp4.dequantize_param(*mxfp4.quantize_param(x))
    # brute force: per block of 32 along the input axis, scale 2**(floor(log2 amax) - 2), nearest E2M1 magnitude
    g = x.transpose(-1, -2).reshape(-1, 32)
    exp = torch.floor(torch.log2(g.abs().amax(-1, keepdim=True))) - 2
    scaled = g / 2**exp
    mags = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
    nearest = mags[(scaled.abs().unsqueeze(-1) - mags).abs().argmin(-1)] * torch.sign(scaled) * 2**exp
    assert torch.equal(y.transpose(-1, -2).reshape(-1, 32), nearest)
    assert float((y - x).norm() / x.norm()) < 0.2  # 4-bit: coarse, but the same tensor


def test_quantize_refuses_a_ragged_last_dimension():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize_rows(torch.zeros(2, 40))


def test_tiny_mxfp4_is_in_the_released_layout(tiny_mxfp4):
    config = json.loads((tiny_mxfp4 / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert "model.embed_tokens" in config["quantization_config"]["modules_to_not_convert"]
    index = json.loads((tiny_mxfp4 / checkpoint.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    ckpt = checkpoint.Checkpoint(tiny_mxfp4)
    blocks = ckpt.tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")
    scales = ckpt.tensor("model.layers.0.mlp.experts.gate_up_proj_scales")
    assert blocks.dtype == scales.dtype == torch.uint8
    assert tuple(blocks.shape) == (4, 128, 2, 16) and tuple(scales.shape) == (4, 128, 2)  # [E, 2I, H/32, 16]
    assert ckpt.tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert "model.layers.0.mlp.experts.gate_up_proj" not in index["weight_map"]


def test_transformers_loads_it_like_its_dequantized_copy(tiny_mxfp4, tmp_path):
    """Mxfp4Config(dequantize=True) on the fixture == a plain bf16 copy written from our own dequantizer."""
    import shutil

    from transformers import AutoModelForCausalLM, Mxfp4Config

    ckpt = checkpoint.Checkpoint(tiny_mxfp4)
    params = {name: ckpt.param(name, torch.bfloat16) for name in ckpt.param_names()}
    entries = [checkpoint.Entry(n, "BF16", tuple(t.shape)) for n, t in params.items()]
    copy = tmp_path / "bf16"
    checkpoint.write_shards(copy, entries, lambda e: params[e.name], max_shard_bytes=10**9)
    config = json.loads((tiny_mxfp4 / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_mxfp4 / "generation_config.json", copy)

    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 1000, 42]])
    packed = AutoModelForCausalLM.from_pretrained(tiny_mxfp4, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.bfloat16).eval()
    plain = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, plain(input_ids=ids).logits)
    experts = "model.layers.1.mlp.experts.down_proj"
    assert torch.equal(packed.state_dict()[experts], plain.state_dict()[experts])


def test_write_shards_plans_shards_and_an_index(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(10, 10, generator=gen).to(torch.bfloat16) for i in range(5)}
    tensors["codes"] = torch.randint(0, 256, (7, 3), generator=gen, dtype=torch.uint8)
    entries = [checkpoint.Entry(n, checkpoint.st_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    files = checkpoint.write_shards(tmp_path, entries, lambda e: tensors[e.name], max_shard_bytes=450)
    assert len(files) == 3 and all(f.is_file() for f in files)
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    ckpt = checkpoint.Checkpoint(tmp_path)
    assert set(ckpt.param_names()) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(ckpt.tensor(name), tensor)


def test_write_shards_leaves_nothing_when_a_tensor_fails(tmp_path):
    entries = [checkpoint.Entry("a", "F32", (2,)), checkpoint.Entry("b", "F32", (2,))]

    def produce(entry):
        if entry.name == "b":
            raise RuntimeError("boom")
        return torch.zeros(2)

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.write_shards(tmp_path, entries, produce, max_shard_bytes=4)
    assert list(tmp_path.iterdir()) == []


def test_write_shards_refuses_a_tensor_that_breaks_the_plan(tmp_path):
    from toolkit.errors import ArtifactError

    with pytest.raises(ArtifactError, match="planned as F32"):
        checkpoint.write_shards(tmp_path, [checkpoint.Entry("a", "F32", (2,))], lambda e: torch.zeros(3),
                                max_shard_bytes=100)


def test_layerwise_logits_equal_the_whole_model(tiny_mxfp4):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    rows = [[1, 5, 9, 200, 17, 3, 1000, 42, 7], [4, 8, 15, 16]]
    model = AutoModelForCausalLM.from_pretrained(tiny_mxfp4, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([row])).logits[0] for row in rows]
    got = layerwise.logits(tiny_mxfp4, rows)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float((g - w).abs().max()) < 1e-4 * float(w.abs().max())


def test_layerwise_transform_sees_every_tensor_and_changes_the_logits(tiny_mxfp4):
    seen = []

    def double_lm_head(name, tensor):
        seen.append(name)
        return tensor * 2 if name == "lm_head.weight" else tensor

    rows = [[1, 2, 3, 4]]
    plain = layerwise.logits(tiny_mxfp4, rows)[0]
    doubled = layerwise.logits(tiny_mxfp4, rows, transform=double_lm_head)[0]
    assert torch.allclose(doubled, 2 * plain, rtol=1e-5, atol=1e-5)
    assert set(seen) == set(checkpoint.Checkpoint(tiny_mxfp4).param_names())


def test_full_size_writer_on_a_small_config(tiny_model_real_tokenizer, tmp_path):
    """`toolkit tiny --size 20b`'s writer, given a small GptOssConfig: released layout, loads, runs."""
    from transformers import AutoModelForCausalLM, GptOssConfig, Mxfp4Config

    from toolkit.tiny import build_gpt_oss_20b, gpt_oss_20b_config

    full = gpt_oss_20b_config()
    assert (full.num_hidden_layers, full.num_local_experts, full.hidden_size, full.vocab_size) == (24, 32, 2880, 201088)
    small = GptOssConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=201088, layer_types=["sliding_attention", "full_attention"])
    out = build_gpt_oss_20b(tmp_path / "m", seed=1, tokenizer=tiny_model_real_tokenizer, config=small,
                            max_shard_size=20_000_000)
    assert len(checkpoint.Checkpoint(out).shards()) > 1
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.bfloat16)
    experts = model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"].float()
    assert 0 < float(experts.abs().max()) <= 6 * 2.0**-6  # random FP4 codes at scales 2**-8..2**-6
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    again = build_gpt_oss_20b(tmp_path / "again", seed=1, tokenizer=tiny_model_real_tokenizer, config=small,
                              max_shard_size=20_000_000)
    for shard in checkpoint.Checkpoint(out).shards():  # deterministic: the same bytes on any machine
        assert (out / shard).read_bytes() == (again / shard).read_bytes()


def test_full_size_writer_inits(tiny_model_real_tokenizer, tmp_path):
    """`--init scaled` (default) keeps the residual stream in charge; `uniform` draws every weight alike."""
    import math

    from transformers import GptOssConfig

    from toolkit import mxfp4
    from toolkit.tiny import build_gpt_oss_20b

    small = GptOssConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=1024, layer_types=["sliding_attention", "full_attention"])
    stds = {}
    for init in ("scaled", "uniform"):
        ckpt = checkpoint.Checkpoint(build_gpt_oss_20b(tmp_path / init, tokenizer=tiny_model_real_tokenizer,
                                                       config=small, init=init))
        stds[init] = {name: float(ckpt.tensor(name, torch.float32).std()) for name in
                      ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
                       "model.layers.0.self_attn.q_proj.weight")}
        for proj in ("gate_up_proj", "down_proj"):
            _, scales = mxfp4.packed_names(f"model.layers.0.mlp.experts.{proj}")
            stds[init][proj] = int(ckpt.tensor(scales, torch.uint8).min()) - 127
    scaled, uniform = stds["scaled"], stds["uniform"]
    assert scaled["model.embed_tokens.weight"] == pytest.approx(1.0, rel=0.05)
    assert scaled["model.layers.0.self_attn.o_proj.weight"] == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert scaled["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.02, rel=0.1)
    assert (scaled["gate_up_proj"], scaled["down_proj"]) == (-8, -11)  # FP4 scale exponents
    assert all(uniform[n] == pytest.approx(0.02, rel=0.1) for n in list(uniform)[:3])
    assert (uniform["gate_up_proj"], uniform["down_proj"]) == (-8, -8)
    with pytest.raises(ValueError, match="init must be one of"):
        build_gpt_oss_20b(tmp_path / "bad", tokenizer=tiny_model_real_tokenizer, config=small, init="wild")
