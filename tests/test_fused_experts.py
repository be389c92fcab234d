"""`train.fused_experts`: gpt-oss' experts with their element-wise work fused give transformers' forward and
gradients (eager here; the compiled form is checked to trace as one graph)."""

from __future__ import annotations

import pytest
from test_expert_lora import cfg_for, trained

from toolkit.errors import ConfigError


@pytest.mark.parametrize("lowrank", [False, True])
def test_fused_experts_match_transformers(tiny_model, lowrank):
    import torch

    from toolkit import fused_experts

    _, base_loss, base_grads = trained(tiny_model, random_biases=True, lowrank_experts=lowrank)
    model, loss, grads = trained(tiny_model, random_biases=True, lowrank_experts=lowrank, fused_experts=True)
    experts = [m for m in model.modules() if type(m).__name__ == "GptOssExperts"]
    assert experts and all(m.forward.__func__ is fused_experts.forward for m in experts)
    assert fused_experts.disable(model) == len(experts) and fused_experts.disable(model) == 0
    assert all(getattr(m.forward, "__func__", None) is not fused_experts.forward for m in experts)
    assert loss == pytest.approx(base_loss, rel=1e-6)
    assert grads.keys() == base_grads.keys()
    assert any("experts" in n for n in grads)
    for name in base_grads:
        torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-4, atol=1e-6)  # float32: the bias is added after the low-rank term


def test_fused_functions_match_the_eager_ops():
    """`gate` and `combine` against transformers' own ops, values and gradients, including clamped entries."""
    import torch
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from toolkit import fused_experts

    config = GptOssConfig(hidden_size=8, intermediate_size=6, num_local_experts=4)
    experts = GptOssExperts(config)
    g = torch.Generator().manual_seed(0)
    rows, tokens, top_k = 12, 6, 2
    x = (torch.randn(rows, 12, generator=g) * 6).requires_grad_()  # beyond the clamp limit (7) on both sides
    bias = torch.randn(4, 12, generator=g)
    ids = torch.sort(torch.randint(0, 4, (rows,), generator=g)).values
    fused = fused_experts.gate(x, bias, ids, experts.alpha, experts.limit)
    ref = experts._apply_gate(x + bias[ids])
    assert (x + bias[ids] > experts.limit).any() and (x + bias[ids] < -experts.limit).any()
    torch.testing.assert_close(fused, ref)
    grad = torch.randn(fused.shape, generator=g)
    (gx,) = torch.autograd.grad(fused, x, grad)
    (rx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(gx, rx)

    down = torch.randn(rows, 8, generator=g, requires_grad=True)
    dbias = torch.randn(4, 8, generator=g)
    weights = torch.rand(rows, generator=g, requires_grad=True)
    perm = torch.randperm(rows, generator=g)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(rows)
    out = fused_experts.combine(down, dbias, ids, weights, inv, tokens, top_k)
    expect = ((down + dbias[ids]) * weights[:, None])[inv].view(tokens, top_k, 8).sum(1)
    torch.testing.assert_close(out, expect)
    # each token's output is its top-k rows' weighted sum: row r of the sorted order belongs to token perm[r] // k
    token0 = [r for r in range(rows) if perm[r] // top_k == 0]
    torch.testing.assert_close(out[0], sum(weights[r] * (down[r] + dbias[ids[r]]) for r in token0))
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (down, weights), grad)
    want = torch.autograd.grad(expect, (down, weights), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fused_functions_trace_as_one_graph():
    """What runs compiled on the GPU: each function one graph (fullgraph, dynamic rows), its backward too."""
    import torch

    from toolkit import fused_experts

    g = torch.Generator().manual_seed(1)
    gate = torch.compile(fused_experts.gate, backend="aot_eager", dynamic=True, fullgraph=True)
    combine = torch.compile(fused_experts.combine, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows in (8, 14):  # a second row count: no recompile needed to run, same results as eager
        x = torch.randn(rows, 6, generator=g, requires_grad=True)
        bias, ids = torch.randn(3, 6, generator=g), torch.sort(torch.randint(0, 3, (rows,), generator=g)).values
        out = gate(x, bias, ids, 1.702, 7.0)
        torch.testing.assert_close(out, fused_experts.gate(x, bias, ids, 1.702, 7.0))
        down, w = torch.randn(rows, 5, generator=g, requires_grad=True), torch.rand(rows, generator=g)
        inv = torch.randperm(rows, generator=g)
        total = combine(down, bias[:, :5], ids, w, inv, rows // 2, 2)
        torch.testing.assert_close(total, fused_experts.combine(down, bias[:, :5], ids, w, inv, rows // 2, 2))
        (out.sum() + total.sum()).backward()
        assert x.grad is not None and down.grad is not None


def test_fused_experts_config_check(tiny_model):
    with pytest.raises(ConfigError, match="fused_experts: needs experts_implementation = grouped_mm"):
        cfg_for(tiny_model, fused_experts=True, experts_implementation="eager")
    assert cfg_for(tiny_model, fused_experts=True).fused_experts


def test_cuda_tensors_get_the_compiled_functions_unless_eager():
    from types import SimpleNamespace

    from toolkit import fused_experts

    on_gpu, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert fused_experts._kernel("gate", on_cpu) is fused_experts.gate
    assert fused_experts._kernel("gate", on_gpu) is fused_experts._compiled("gate")  # compiles lazily: not run
    fused_experts.eager(True)
    try:
        assert fused_experts._kernel("combine", on_gpu) is fused_experts.combine
    finally:
        fused_experts.eager(False)
    assert fused_experts._kernel("combine", on_gpu) is fused_experts._compiled("combine")
