"""`train.compile_layers`: each decoder layer compiled in place gives the same loss and gradients."""

from __future__ import annotations

import json

import pytest

from toolkit import config, lora, regional_compile
from toolkit.errors import ConfigError


def cfg_for(model, **kw):
    sets = {"base_model": str(model), "dtype": "float32", "experts_implementation": "grouped_mm",
            "expert_layers": "all", "lowrank_experts": True, **kw}
    return config.build("train", "tiny-cpu", [f"train.{k}={json.dumps(v)}" for k, v in sets.items()])


def loss_and_grads(model, every_n_layers: int | None):
    import torch

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a fresh LoRA has B = 0: give B values so every adapter path matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.train()
    if every_n_layers:  # as the Trainer turns it on: non-reentrant, inside each layer's forward
        model.get_base_model().activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [None, 2])
def test_compiled_layers_match_eager(tiny_model, checkpointing):
    """The tiny gpt-oss with LoRA on attention and low-rank expert LoRA: compiled layers (dynamo + AOT autograd,
    the part that changes the graph; the CPU's inductor only adds code generation) against plain eager; with
    checkpointing, layer 0 is recomputed and layer 1 is not."""
    import torch
    from torch._dynamo.utils import counters

    cfg = cfg_for(tiny_model)
    eager_loss, eager_grads = loss_and_grads(lora.attach_lora(lora.load_base(cfg), cfg), checkpointing)
    torch._dynamo.reset()
    counters.clear()
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    assert regional_compile.compile_layers(model, "default", backend="aot_eager") == 2
    before = dict(torch._dynamo.config.get_config_copy())
    with regional_compile.dynamo_settings():  # as toolkit.train trains compiled layers
        compiled_loss, compiled_grads = loss_and_grads(model, checkpointing)
    assert dict(torch._dynamo.config.get_config_copy()) == before  # nothing stays changed after
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and any("experts" in n for n in compiled_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6)
    # it really went through dynamo (a graph for each kind of layer: sliding and full attention, recomputed or
    # not), and without a graph break: one inside a checkpointed layer (the expert LoRA's registry) would leave
    # that layer uncompiled
    assert counters["stats"]["unique_graphs"] >= 2
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_layers_option_reaches_the_layers(tiny_model):
    cfg = cfg_for(tiny_model, compile_layers="max-autotune-no-cudagraphs")
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    layers = regional_compile.decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["GptOssDecoderLayer"] * 2
    assert all(layer._compiled_call_impl is not None for layer in layers)  # compiled lazily, at the first call
    plain = lora.attach_lora(lora.load_base(cfg_for(tiny_model)), cfg_for(tiny_model))
    assert all(layer._compiled_call_impl is None for layer in regional_compile.decoder_layers(plain))


def test_compile_layers_config_check(tiny_model):
    assert cfg_for(tiny_model).compile_layers == "off"
    with pytest.raises(ConfigError, match="train.compile_layers: expected one of off, default"):
        cfg_for(tiny_model, compile_layers="fast")
    with pytest.raises(ConfigError, match="no repeated decoder layer"):
        import torch

        regional_compile.compile_layers(torch.nn.Linear(2, 2), "default")


def test_4bit_experts_compile_once_per_layer_kind():
    """qlora's 4-bit experts (bitsandbytes parametrization, which runs on the CPU too): four layers compile into one
    graph per kind (sliding / full attention) instead of one per layer, and match the uncompiled model."""
    pytest.importorskip("bitsandbytes")
    import dataclasses
    import sys
    from pathlib import Path

    import torch
    from bitsandbytes.nn.parametrize import replace_parameter_4bit
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import train_speed

    cfg = dataclasses.replace(config.build("train", "tiny-cpu"), dtype="float32", experts_implementation="grouped_mm",
                              lora_experts=[])

    def run(compiled: bool):
        model = train_speed.build_model(cfg, train_speed.model_config(tiny=True, layers=4), "cpu")
        for layer in model.model.layers:
            for name in ("gate_up_proj", "down_proj"):
                replace_parameter_4bit(layer.mlp.experts, name, quant_type="nf4", compress_statistics=True)
        model = lora.attach_lora(model, cfg)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            regional_compile.compile_layers(model, "default", backend="aot_eager")
        with regional_compile.dynamo_settings():
            return loss_and_grads(model, every_n_layers=2)

    loss, grads = run(False)
    compiled_loss, compiled_grads = run(True)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2, "a graph per layer: the 4-bit modules still differ to dynamo"
    assert not counters["graph_break"], dict(counters["graph_break"])
