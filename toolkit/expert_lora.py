"""LoRA on MoE expert tensors without a full-size delta (`train.lowrank_experts`).

peft reaches gpt-oss' 3-D expert tensors through `target_parameters` (`ParamWrapper`): for each forward it
parametrizes the tensor as W + s * B @ A, a new full-size tensor ([32, 2880, 5760] for `gate_up_proj`),
and because that sum needs a gradient, backward computes a dense gradient of the whole expert stack, a
grouped GEMM as large as the forward's, only to project it onto A and B.

Here the same adapter weights act on the routed tokens instead: transformers' grouped-GEMM experts
(`experts_implementation="grouped_mm"`) compute x @ W_e, and this module adds s * (x @ A_e) @ B_e as two
thin grouped GEMMs (inner size r). The trainable parameters, the saved adapter and `toolkit merge` are
peft's, unchanged; only the training forward differs, and the result equals peft's within rounding.

The hook: `ParamWrapper.forward` of each expert adapter is replaced (per instance) by one that registers
its factors by the tensor's shape while its experts module runs, and transformers'
`integrations.moe._grouped_linear` is wrapped to add the low-rank term for a registered shape. A forward
that did not go through the grouped GEMMs (another experts kernel) is an error, never a silent no-op.

The wrapper is the one process-wide patch that stays: `install` puts it in place once, from `enable` and
`toolkit.redequantize` (a compiled decoder layer cannot swap it per call without a graph break). With no
registered factors and no re-dequantized experts it returns transformers' own result unchanged
(`tests/test_expert_lora.py` checks a plain model's loss and gradients with the wrapper in place).
"""

from __future__ import annotations

import logging
import types
from typing import Any

log = logging.getLogger(__name__)

_ACTIVE: dict[tuple[int, ...], list[Any]] = {}  # weight shape -> [A, B, scale, uses]
_ORIGINAL = None


def base_grouped_linear(input, weight, offs, bias=None, is_transposed=False):
    """transformers' own `_grouped_linear` (as it was before `install`)."""
    return _ORIGINAL(input, weight, offs, bias=bias, is_transposed=is_transposed)


def _grouped_linear(input, weight, offs, bias=None, is_transposed=False):
    from transformers.integrations import moe

    from toolkit import redequantize

    out = redequantize.grouped_linear(input, weight, offs, bias=bias, is_transposed=is_transposed)
    entry = _ACTIVE.get(tuple(weight.shape))
    if entry is None:
        return out
    a, b, scale = entry[0], entry[1], entry[2]
    entry[3] += 1
    if not is_transposed:  # weight is [E, out, in]: x @ W^T = x @ (lhs @ rhs)^T
        a, b = b.transpose(-2, -1), a.transpose(-2, -1)
    low = moe._grouped_mm(moe._grouped_mm(input, a.contiguous(), offs), b.contiguous(), offs)
    return out + scale * low


def install() -> None:
    """Wrap transformers' `_grouped_linear` once: the base GEMM (`toolkit.redequantize`), plus a registered low-rank
    term. Both options patch through here, so there is one wrapper whatever their order."""
    global _ORIGINAL
    from transformers.integrations import moe

    if _ORIGINAL is None:
        _ORIGINAL = moe._grouped_linear
        moe._grouped_linear = _grouped_linear


def _lowrank_forward(self, x, *args, **kwargs):
    """ParamWrapper.forward with the adapter applied as low-rank grouped GEMMs (single adapter, not merged)."""
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or len(adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    lhs, rhs, scale = self.get_delta_factors(adapters[0])
    shape = (lhs.shape[0], lhs.shape[1], rhs.shape[2])  # the expert tensor's: [E, d0, r] @ [E, r, d1]
    if shape in _ACTIVE:
        raise RuntimeError(f"lowrank_experts: two expert tensors of shape {shape} in one module; "
                           "set train.lowrank_experts=false for this model.")
    entry = _ACTIVE[shape] = [lhs, rhs, scale, 0]
    try:
        result = self.base_layer(x, *args, **kwargs)
    finally:
        del _ACTIVE[shape]
    if entry[3] == 0:
        raise RuntimeError(f"lowrank_experts: the experts of {self.parameter_name} did not run through "
                           "transformers' grouped GEMMs; set train.experts_implementation=grouped_mm "
                           "or train.lowrank_experts=false.")
    return result


def enable(peft_model: Any) -> int:
    """Switches every expert-tensor adapter of `peft_model` to the low-rank path; returns how many."""
    from peft.tuners.lora.layer import ParamWrapper

    install()
    count = 0
    for module in peft_model.modules():
        if isinstance(module, ParamWrapper) and getattr(module, "num_experts", 1) > 1:
            module.forward = types.MethodType(_lowrank_forward, module)
            count += 1
    log.info("lowrank_experts: %d expert adapters run as low-rank grouped GEMMs", count)
    return count
