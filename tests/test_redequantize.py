"""`train.redequantize_experts`: a layer that is not recomputed keeps no 16-bit expert tensor for backward,
and gets the same loss and gradients."""

from __future__ import annotations

import json

import pytest

from toolkit import config, lora, redequantize
from toolkit.errors import ConfigError


def cfg_for(model, **kw):
    sets = {"base_model": str(model), "dtype": "float32", "experts_implementation": "grouped_mm",
            "lora_experts": [], **kw}
    return config.build("train", "tiny-cpu", [f"train.{k}={json.dumps(v)}" for k, v in sets.items()])


def fake_4bit(model) -> list:
    """Give every expert tensor a parametrization that derives it on each access without autograd, as
    bitsandbytes' 4-bit one does (bitsandbytes needs CUDA here); returns them (each counts its calls)."""
    import torch
    from torch.nn.utils import parametrize

    class Derived(torch.nn.Module):
        calls = 0

        @torch.no_grad()
        def forward(self, stored):
            self.calls += 1
            return stored * 1.0  # a new tensor, as a dequantization gives

    made = []
    for layer in model.get_base_model().model.layers:
        for name in ("gate_up_proj", "down_proj"):
            made.append(Derived())
            parametrize.register_parametrization(layer.mlp.experts, name, made[-1], unsafe=True)
    return made


def run(tiny_model, redequantize_experts: bool, recomputed: bool = False):
    """Loss, LoRA gradients, shapes of the expert-sized tensors autograd kept, dequantizations per tensor."""
    import torch

    cfg = cfg_for(tiny_model)
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    derived = fake_4bit(model)
    if redequantize_experts:
        assert redequantize.enable(model, recomputed=recomputed) == 2
    model.train()
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    layers = model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]  # layer 1 is not recomputed
    expert_shapes = {tuple(p.shape) for layer in layers for p in (layer.mlp.experts.gate_up_proj,
                                                                   layer.mlp.experts.down_proj)}
    expert_shapes |= {s[:1] + s[1:][::-1] for s in expert_shapes}
    kept = []

    def pack(tensor):
        if tuple(tensor.shape) in expert_shapes:
            kept.append(tuple(tensor.shape))
        return tensor

    calls_before = [d.calls for d in derived]
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, kept, [d.calls - c for d, c in zip(derived, calls_before, strict=True)]


def test_redequantized_experts_match_and_keep_nothing(tiny_model):
    import torch

    loss, grads, kept, calls = run(tiny_model, False)
    r_loss, r_grads, r_kept, r_calls = run(tiny_model, True)
    assert r_loss == pytest.approx(loss, rel=1e-6)
    assert r_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(r_grads[name], grad, rtol=1e-5, atol=1e-7)
    assert kept and not r_kept  # transformers' path keeps layer 1's derived experts for backward; ours none
    # layer 0 (recomputed): forward + recompute either way; layer 1: forward, and with the option backward too
    assert calls == [2, 2, 1, 1] and r_calls == [2, 2, 2, 2]
    # train.redequantize_recomputed: the recomputed layer 0 too, so its recompute keeps no W and backward
    # dequantizes each tensor once more (forward, recompute, backward); same numbers
    a_loss, a_grads, a_kept, a_calls = run(tiny_model, True, recomputed=True)
    assert a_loss == pytest.approx(loss, rel=1e-6) and not a_kept and a_calls == [3, 3, 2, 2]
    for name, grad in grads.items():
        torch.testing.assert_close(a_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_redequantize_config_check(tiny_model):
    with pytest.raises(ConfigError, match="redequantize_experts: needs experts_implementation = grouped_mm"):
        cfg_for(tiny_model, redequantize_experts=True, experts_implementation="eager")
    with pytest.raises(ConfigError, match="redequantize_experts works uncompiled only"):
        cfg_for(tiny_model, redequantize_experts=True, compile_layers="default")
    with pytest.raises(ConfigError, match="redequantize_recomputed extends train.redequantize_experts"):
        cfg_for(tiny_model, redequantize_recomputed=True)
    cfg = cfg_for(tiny_model, redequantize_experts=True)
    model = lora.attach_lora(lora.load_base(cfg), cfg)  # 16-bit experts: nothing to hook (a warning)
    assert redequantize.enable(model) == 0
