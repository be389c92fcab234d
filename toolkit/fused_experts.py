"""gpt-oss' MoE element-wise work fused into two compiled functions (`train.fused_experts`).

transformers' grouped-GEMM experts (`experts_implementation="grouped_mm"`) run the two expert GEMMs as
grouped GEMMs, but everything between them is eager element-wise PyTorch on tensors of (tokens x top-k)
rows: the gate/up bias gathered per row ([S, 5760], materialised) and added, the clamped SwiGLU (strided
slices, two clamps, a sigmoid, three products), the down bias gathered and added, the routing weights
multiplied, the rows put back in token order and summed. Each is a pass over memory, its backward a few
more, and autograd keeps most intermediates. On the H200 the lora preset spent about half of its step's
GPU time in such kernels (bench/results/train_speed-2026-12-02-h200-profile-lora-2048.txt).

Here the experts' forward is transformers' (same sort, offsets, grouped GEMMs through
`transformers.integrations.moe._grouped_linear`, so `toolkit.expert_lora` and `toolkit.redequantize` apply
as before), with the two element-wise stretches as functions compiled once with `torch.compile` (dynamic
shapes, no graph break possible: pure tensor code). Inductor fuses each forward into about one kernel that
reads the bias rows by index instead of materialising them, and AOT autograd's partitioner recomputes the
cheap element-wise values in backward instead of keeping them. The numbers are the same functions of the
same inputs; the fused kernels round once (float32 inside) where eager bf16 rounds after every op.

Only for gpt-oss' expert layout (interleaved gate/up, transposed weights, biases, no expert parallelism);
other modules keep transformers' forward. Off the GPU (or already inside a compiled region) the same
functions run eagerly, which is what the CPU tests compare with transformers' forward.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

log = logging.getLogger(__name__)


def gate(gate_up, bias, expert_ids, alpha: float, limit: float):
    """gpt-oss' clamped SwiGLU of (x W_gate_up + b[expert]) for rows sorted by expert: [S, 2I] -> [S, I]."""
    import torch

    gate_up = gate_up + bias[expert_ids]
    g = gate_up[..., ::2].clamp(max=limit)
    u = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def combine(down, bias, expert_ids, weights, inv_perm, tokens: int, top_k: int):
    """sum_k w[t, k] * (down[row of (t, k)] + b[expert]) back in token order: [S, H] -> [tokens, H]."""
    out = (down + bias[expert_ids]) * weights.unsqueeze(-1)
    return out[inv_perm].view(tokens, top_k, -1).sum(dim=1)


_FUNCTIONS = {"gate": gate, "combine": combine}
_EAGER = False  # `eager(True)`: the plain functions on CUDA too


def eager(on: bool) -> None:
    """Run the two functions eagerly on CUDA too (`on`), or compiled again. For the CUDA allocator's history
    (bench/train_speed.py --memory): recording Python stacks failed inside the compiled functions on the H200."""
    global _EAGER
    _EAGER = on


@functools.cache
def _compiled(name: str):
    import torch

    return torch.compile(_FUNCTIONS[name], dynamic=True, fullgraph=True)


def _kernel(name: str, tensor):
    """The compiled function on CUDA outside a compiled region (unless `eager`); the plain one otherwise."""
    import torch

    if tensor.is_cuda and not _EAGER and not torch.compiler.is_compiling():
        return _compiled(name)
    return _FUNCTIONS[name]


def supports(module: Any) -> bool:
    """gpt-oss' layout: interleaved gate/up with biases, [E, in, out] weights, the clamped SwiGLU."""
    return (getattr(module, "has_gate", False) and getattr(module, "has_bias", False)
            and getattr(module, "is_transposed", False) and not getattr(module, "is_concatenated", True)
            and not getattr(module, "has_post_expert_norm", False)
            and all(hasattr(module, a) for a in ("alpha", "limit", "gate_up_proj_bias")))


def forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' `grouped_mm_experts_forward` with its element-wise work in `gate` and `combine`."""
    import torch
    from transformers.integrations import moe

    if self._is_expert_parallel:
        return moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    tokens, top_k = top_k_index.shape
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[perm // top_k]
    weights_g = top_k_weights.reshape(-1)[perm]
    counts = torch.histc(expert_ids_g.float() if rows.device.type in ("cpu", "mps") else expert_ids_g.int(),
                         bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)

    proj = moe._grouped_linear(rows, self.gate_up_proj, offsets, bias=None, is_transposed=True)
    proj = _kernel("gate", proj)(proj, self.gate_up_proj_bias, expert_ids_g, self.alpha, self.limit)
    proj = moe._grouped_linear(proj, self.down_proj, offsets, bias=None, is_transposed=True)
    out = _kernel("combine", proj)(proj, self.down_proj_bias, expert_ids_g, weights_g, inv_perm, tokens, top_k)
    return out.to(hidden_states.dtype)


def enable(model: Any) -> int:
    """Switch every gpt-oss experts module of `model` (a transformers or peft model) to `forward`; returns how
    many. Per instance: other models and modules keep transformers' forward."""
    count = 0
    for module in model.modules():
        if supports(module):
            module.forward = types.MethodType(forward, module)
            count += 1
    log.info("fused_experts: %d experts modules with fused element-wise work", count)
    return count


def disable(model: Any) -> int:
    """Undo `enable`: transformers' forward again; returns how many modules changed."""
    count = 0
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is forward:
            del module.forward
            count += 1
    return count
