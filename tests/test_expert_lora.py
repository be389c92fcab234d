"""`train.lowrank_experts`: expert LoRA as low-rank grouped GEMMs gives peft's forward and gradients."""

from __future__ import annotations

import json

import pytest

from toolkit import config, lora
from toolkit.errors import ConfigError


def cfg_for(model, **kw):
    sets = {"base_model": str(model), "dtype": "float32", "experts_implementation": "grouped_mm",
            "expert_layers": "all", **kw}
    return config.build("train", "tiny-cpu", [f"train.{k}={json.dumps(v)}" for k, v in sets.items()])


def trained(model_dir, random_biases: bool = False, **kw):
    """(model, loss, LoRA gradients) of one forward and backward of the tiny gpt-oss with `kw` train settings;
    `random_biases`: the expert biases random too (the tiny model's are zero)."""
    import torch

    cfg = cfg_for(model_dir, **kw)
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a fresh LoRA has B = 0: give B values so the expert path matters
        for name, param in model.named_parameters():
            if "lora_B" in name or random_biases and name.endswith("_proj_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.item(), grads


def loss_and_grads(model_dir, **kw):
    return trained(model_dir, **kw)[1:]


def test_lowrank_experts_match_peft(tiny_model):
    import torch
    from transformers.integrations import moe

    from toolkit import expert_lora

    shipped = expert_lora._ORIGINAL or moe._grouped_linear  # transformers' own, whatever ran before
    base_loss, base_grads = loss_and_grads(tiny_model)
    low_loss, low_grads = loss_and_grads(tiny_model, lowrank_experts=True)
    # the one process-wide patch: installed once (again a no-op), wrapping transformers' own function
    assert moe._grouped_linear is expert_lora._grouped_linear and expert_lora._ORIGINAL is shipped
    expert_lora.install()
    assert expert_lora._ORIGINAL is shipped
    assert low_loss == pytest.approx(base_loss, rel=1e-5)
    assert low_grads.keys() == base_grads.keys()
    expert = [n for n in base_grads if "experts" in n]
    assert len(expert) == 2 * 2 * 2  # gate_up + down, A + B, 2 layers
    for name in base_grads:
        torch.testing.assert_close(low_grads[name], base_grads[name], rtol=1e-4, atol=1e-6)
    assert all(base_grads[n].abs().sum() > 0 for n in expert)
    # and the expert adapters matter: without them the loss is another
    other_loss, _ = loss_and_grads(tiny_model, lora_experts=[])
    assert abs(other_loss - base_loss) > 1e-4
    # and a plain peft model after the low-rank one, with the wrapper in place, still gets peft's own result
    again_loss, again_grads = loss_and_grads(tiny_model)
    assert again_loss == base_loss
    for name in base_grads:
        assert torch.equal(again_grads[name], base_grads[name]), name


def test_lowrank_experts_refuse_a_kernel_that_skips_them(tiny_model):
    import dataclasses

    import torch

    cfg = cfg_for(tiny_model, lowrank_experts=True)
    assert not cfg.problems()
    assert any("lowrank_experts" in p for p in dataclasses.replace(cfg, experts_implementation="eager").problems())
    eager = dataclasses.replace(cfg, experts_implementation="eager")
    model = lora.attach_lora(lora.load_base(eager), eager)  # built around the config check on purpose

    with pytest.raises(RuntimeError, match="did not run through transformers' grouped GEMMs"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    from toolkit import expert_lora

    assert not expert_lora._ACTIVE  # nothing left registered on the way out of the error


def test_lowrank_experts_config_check(tiny_model):
    with pytest.raises(ConfigError, match="lowrank_experts"):
        cfg_for(tiny_model, lowrank_experts=True, experts_implementation="eager")
    with pytest.raises(ConfigError, match="lora_r a multiple of 8"):  # bf16 rows of r values must span 16 bytes
        cfg_for(tiny_model, lowrank_experts=True, dtype="bfloat16", lora_r=4)
    assert cfg_for(tiny_model, lowrank_experts=True, dtype="bfloat16", lora_r=16).lowrank_experts
