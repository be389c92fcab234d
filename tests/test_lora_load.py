"""Streamed base loading (toolkit.loader) for `toolkit train`: the same model as from_pretrained, read one tensor
at a time; qlora's NF4 placement equal to quantizing the from_pretrained model (needs bitsandbytes, CPU backend)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import weakref
from pathlib import Path

import pytest

from toolkit import config, loader, lora
from toolkit.checkpoint import Checkpoint
from toolkit.errors import ArtifactError, ConfigError

IDS = [[1, 5, 9, 33, 200, 7, 64, 3]]


def reference(folder: Path, dtype):
    """transformers' own load: MXFP4 experts dequantized by Mxfp4Config(dequantize=True)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if "quantization_config" in json.loads(
        (folder / "config.json").read_text()) else {}
    assert AutoConfig.from_pretrained(folder) is not None
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu", **kwargs)


def streamed(folder: Path, dtype, **kw):
    from transformers import AutoConfig

    return loader.load(folder, AutoConfig.from_pretrained(folder), dtype, "cpu", **kw)


def assert_same_model(got, want) -> None:
    import torch

    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, name
        assert torch.equal(a[name], b[name]), name
    assert {type(m).__name__ for m in got.modules()} == {type(m).__name__ for m in want.modules()}
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_streamed_load_equals_from_pretrained(tiny_mxfp4, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    assert any(name.endswith("_blocks") for name in Checkpoint(tiny_mxfp4).weight_map)  # experts stored as MXFP4
    want = reference(tiny_mxfp4, dtype)
    got = streamed(tiny_mxfp4, dtype)
    assert_same_model(got, want)
    assert not got.training and not getattr(got, "is_loaded_in_4bit", False)
    assert got.name_or_path == want.name_or_path and got.generation_config.eos_token_id == [2, 8]
    # dequantizing the packed experts where the weights go gives the same tensors
    assert_same_model(streamed(tiny_mxfp4, dtype, dequantize_on_device=True), want)


class CountingCheckpoint(Checkpoint):
    """Records every tensor it hands out (weakly) and the order of reads."""

    def __init__(self, folder):
        super().__init__(folder)
        self.handed: list[weakref.ref] = []
        self.reads: list[str] = []

    def param(self, name, dtype=None, device=None):
        tensor = super().param(name, dtype, device)
        self.handed.append(weakref.ref(tensor))
        return tensor

    def tensor(self, name, dtype=None):
        self.reads.append(name)
        return super().tensor(name, dtype)


def test_streaming_holds_one_tensor_at_a_time(tiny_mxfp4):
    """Each tensor read is placed before the next is read, and no reference to an earlier one is kept."""
    import torch
    from transformers import AutoConfig

    ckpt = CountingCheckpoint(tiny_mxfp4)
    model = loader.empty_model(AutoConfig.from_pretrained(tiny_mxfp4), torch.bfloat16)
    alive_at_place: list[int] = []

    def drop(module, name, tensor):  # stands in for the GPU: nothing stays in host memory
        alive_at_place.append(sum(ref() is not None for ref in ckpt.handed[:-1]))
        loader.assign(module, name, tensor.to("meta"))

    count = loader.stream_weights(model, ckpt, drop)
    params = ckpt.param_names()
    assert count == len(params) == len(alive_at_place) and set(params) == {n for n, _ in model.named_parameters()}
    assert alive_at_place == [0] * count  # would fail if the loader collected tensors (a dict of the state)
    assert all(ref() is None for ref in ckpt.handed)
    # each stored tensor read exactly once, shard after shard
    assert sorted(ckpt.reads) == sorted(ckpt.weight_map)
    shards = [ckpt.shards().index(ckpt.weight_map[n]) for n in ckpt.reads]
    assert shards == sorted(shards) and len(set(shards)) > 1


def test_offloaded_embeddings_are_read_into_cpu_memory(tiny_mxfp4):
    import torch

    want = reference(tiny_mxfp4, torch.float32)
    got = streamed(tiny_mxfp4, torch.float32, offload_embeddings=True)
    embedding = got.get_input_embeddings()
    assert "weight" not in embedding._parameters and "model.embed_tokens.weight" not in got.state_dict()
    assert torch.equal(embedding.weight, want.get_input_embeddings().weight)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory) -> Path:
    """A tiny random Gemma 3: no experts, input embeddings tied to the LM head, one safetensors file."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("gemma") / "model"
    Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                                       max_position_embeddings=2048)).save_pretrained(out)
    return out


def test_tied_model_without_experts(tiny_gemma):
    import torch

    assert "lm_head.weight" not in Checkpoint(tiny_gemma).weight_map
    want = reference(tiny_gemma, torch.float32)
    got = streamed(tiny_gemma, torch.float32, offload_embeddings=True)  # tied: the table must stay a parameter
    assert got.get_output_embeddings().weight is got.get_input_embeddings().weight
    assert_same_model(got, want)


def test_other_layouts_are_not_streamed(tiny_mxfp4, tiny_gemma, tmp_path, caplog):
    import torch
    from transformers import AutoConfig

    # tensor names the model does not have (a layout transformers converts while loading): refused before any read
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_mxfp4, renamed)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.gamma"] = index["weight_map"].pop("model.norm.weight")
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = CountingCheckpoint(renamed)
    model = loader.empty_model(AutoConfig.from_pretrained(renamed), torch.float32)
    with pytest.raises(loader.NotStreamable, match=r"missing \['model.norm.weight'\].*unexpected \['model.norm.gamma'"):
        loader.stream_weights(model, ckpt, loader.sixteen_bit("cpu"))
    assert ckpt.reads == []
    # no safetensors: train falls back to from_pretrained, saying why
    pt_only = tmp_path / "pt"
    pt_only.mkdir()
    shutil.copy(tiny_gemma / "config.json", pt_only / "config.json")
    torch.save(reference(tiny_gemma, torch.float32).state_dict(), pt_only / "pytorch_model.bin")
    cfg = config.build("train", "tiny-cpu", [f'train.base_model="{pt_only}"'])
    assert lora.load_streamed(cfg, lora.model_config(cfg), "cpu") is None
    assert "is not streamed" in caplog.text and "from_pretrained" in caplog.text
    # weights that do not fit config.json: a clear error
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_gemma, wrong)
    data = json.loads((wrong / "config.json").read_text())
    data["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"mlp.down_proj.weight has shape \(64, 128\).*expects \(64, 96\)"):
        streamed(wrong, torch.float32)


# --- qlora: NF4 on arrival (bitsandbytes' CPU backend quantizes NF4 the same way as its CUDA one) ---

def qlora_cfg(folder: Path, **kw):
    cfg = config.build("train", "tiny-cpu", [f'train.base_model="{folder}"', 'train.experts_implementation="grouped_mm"'])
    return dataclasses.replace(cfg, mode="qlora", dtype="bfloat16", **kw)  # the config refuses qlora on the CPU


def test_qlora_streamed_equals_quantizing_from_pretrained(tiny_mxfp4):
    pytest.importorskip("bitsandbytes", minversion="0.48", reason="qlora needs bitsandbytes >= 0.48")
    cfg = qlora_cfg(tiny_mxfp4)
    old = lora.load_pretrained(cfg, lora.model_config(cfg), "cpu")  # 16 bits in RAM, then quantize_4bit_
    new = lora.load_base(cfg)  # qlora always streams
    assert new.is_loaded_in_4bit and old.is_loaded_in_4bit
    assert type(new.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(new.lm_head).__name__ == "Linear"
    experts = new.model.layers[0].mlp.experts
    assert set(experts.parametrizations) == {"gate_up_proj", "down_proj"}
    assert experts.parametrizations["gate_up_proj"].original.dtype.is_floating_point is False
    assert_same_model(new, old)  # NF4 bytes, quantization statistics and logits all equal


def test_qlora_trains_expert_lora_on_4bit_experts(tiny_mxfp4):
    """attach_lora reaches the 4-bit (parametrized) experts; the low-rank path gives every adapter a gradient."""
    pytest.importorskip("bitsandbytes", minversion="0.48", reason="qlora needs bitsandbytes >= 0.48")
    import torch

    def loss_and_grads(cfg, experts_b: float):
        model = lora.attach_lora(lora.load_base(cfg), cfg)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * (experts_b if "experts" in name else 0))
        ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(4))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return model, loss.item()

    cfg = qlora_cfg(tiny_mxfp4, lowrank_experts=True, offload_embeddings=True)
    model, loss = loss_and_grads(cfg, 0.1)
    targets = lora.lora_targets(model)
    assert targets["parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                     for p in ("down_proj", "gate_up_proj")]
    expert_grads = {n: p.grad for n, p in model.named_parameters() if "experts" in n and p.requires_grad}
    assert len(expert_grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in expert_grads.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    _, without = loss_and_grads(cfg, 0.0)
    assert abs(loss - without) > 1e-3  # the expert adapters act on the output
    # peft's own path would drop one of a module's two 4-bit expert adapters: refused, not silent
    with pytest.raises(ConfigError, match="lowrank_experts=true"):
        lora.attach_lora(lora.load_base(qlora_cfg(tiny_mxfp4)), qlora_cfg(tiny_mxfp4))
