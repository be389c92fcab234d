"""4-bit expert tensors dequantized again in backward, not kept from forward (`train.redequantize_experts`).

qlora stores gpt-oss' expert tensors in NF4 (bitsandbytes parametrization: each access dequantizes the
whole [32, 2880, 5760] tensor to bf16). The grouped GEMM x @ W keeps its W for backward (the gradient of
x needs it), so a decoder layer that is not recomputed holds ~1.6 GB of bf16 experts from its forward to
its backward: that is why the qlora preset recomputes every layer, and every step then runs each layer's
forward twice (attention, routing, all the GEMMs) to save memory it only spends on W.

With this option a layer that is not recomputed (`checkpoint_every_n_layers` > 1 leaves some) runs its
base expert GEMMs through an autograd function that keeps nothing but the routing offsets and
dequantizes W again in backward: one dequantization replaces one layer recompute. Checkpointed layers
(their recompute holds W only for their own backward) keep transformers' path unless
`train.redequantize_recomputed` says otherwise (then their recompute keeps no W either, and backward holds one
expert tensor at a time: the peak of the qlora preset, which recomputes every layer); 16-bit weights always. The
result is the same numbers: the same W, the same grouped GEMMs. Uncompiled only (`train.compile_layers` off):
compiled, AOT autograd keeps the weight for backward again (seen on the CPU), so the config refuses both.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_RUNNING: list[Any] = []  # the hooked 4-bit experts modules whose forward is running (innermost last)
_FUNCTION = None


def _redequantized():
    import torch

    from toolkit import expert_lora

    class Redequantized(torch.autograd.Function):
        """x @ W (grouped) for a frozen 4-bit W: keeps only the offsets; backward fetches W from its module."""

        @staticmethod
        def forward(ctx, input, weight, offs, module, name, is_transposed):
            ctx.module, ctx.name, ctx.is_transposed = module, name, is_transposed
            ctx.save_for_backward(offs)
            return expert_lora.base_grouped_linear(input, weight, offs, None, is_transposed)

        @staticmethod
        def backward(ctx, grad):
            from transformers.integrations import moe

            (offs,) = ctx.saved_tensors
            with torch.no_grad():
                weight = getattr(ctx.module, ctx.name)  # the parametrization dequantizes it again
            # forward: x @ W (W [E, in, out], transposed layout) or x @ W^T (W [E, out, in]);
            # so d/dx = grad @ W^T or grad @ W (a transposed view: grouped_mm reads it column-major)
            rhs = weight.transpose(-2, -1) if ctx.is_transposed else weight
            return moe._grouped_mm(grad, rhs, offs), None, None, None, None, None

    return Redequantized


def grouped_linear(input, weight, offs, bias=None, is_transposed=False):
    """transformers' grouped linear; through `Redequantized` for a frozen 4-bit W of a layer not recomputed (or of
    any layer, for a module enabled with `recomputed=True`)."""
    import torch

    from toolkit import expert_lora

    global _FUNCTION
    module = _RUNNING[-1] if _RUNNING else None
    layer = module._redequantize_layer() if module is not None else None
    if (layer is None or weight.requires_grad or not input.requires_grad or not torch.is_grad_enabled()
            or layer.training and getattr(layer, "gradient_checkpointing", False)
            and not getattr(module, "_redequantize_recomputed", False)):
        return expert_lora.base_grouped_linear(input, weight, offs, bias, is_transposed)
    names = [n for n in _quantized_names(module) if _shape_of(module, n) == tuple(weight.shape)]
    if len(names) != 1:
        raise RuntimeError(f"redequantize_experts: {len(names)} 4-bit expert tensors of shape {tuple(weight.shape)} "
                           "in one module; set train.redequantize_experts=false for this model.")
    _FUNCTION = _FUNCTION or _redequantized()
    out = _FUNCTION.apply(input, weight, offs, module, names[0], is_transposed)
    return out if bias is None else out + bias


def _quantized_names(module: Any) -> list[str]:
    """The module's own parametrized 2-D / 3-D tensors (bitsandbytes' 4-bit experts)."""
    from torch.nn.utils import parametrize

    params = getattr(module, "parametrizations", None) or {}
    return [n for n in params if parametrize.is_parametrized(module, n) and params[n].original.ndim in (2, 3)]


def _shape_of(module: Any, name: str) -> tuple[int, ...]:
    """The dequantized shape of a parametrized tensor, without dequantizing it (bitsandbytes' quant_state)."""
    for parametrization in module.parametrizations[name]:
        shape = getattr(getattr(parametrization, "quant_state", None), "shape", None)
        if shape is not None:
            return tuple(shape)
    return tuple(module.parametrizations[name].original.shape)


def _push(module, args):
    _RUNNING.append(module)


def _pop(module, args, output):
    if _RUNNING and _RUNNING[-1] is module:
        _RUNNING.pop()


def enable(model: Any, recomputed: bool = False) -> int:
    """Hook every 4-bit (parametrized) experts module of `model`'s decoder layers; returns how many. `recomputed`:
    layers that are recomputed go through `Redequantized` too (`train.redequantize_recomputed`): their recompute
    keeps only the offsets, and backward dequantizes each expert tensor once more, one at a time, instead of
    holding both from the recompute (gpt-oss-20b: 1.06 + 0.53 GB; then at most the 1.06)."""
    import weakref

    from toolkit import expert_lora, regional_compile

    expert_lora.install()
    count = 0
    for layer in regional_compile.decoder_layers(model):
        for module in layer.modules():
            if not _quantized_names(module):
                continue
            module._redequantize_recomputed = recomputed
            if hasattr(module, "_redequantize_layer"):
                continue
            module._redequantize_layer = weakref.ref(layer)  # a weak one: no cycle keeps a freed model alive
            module.register_forward_pre_hook(_push)
            module.register_forward_hook(_pop, always_call=True)
            count += 1
    log.info("redequantize_experts: %d 4-bit experts modules dequantize again in backward when not recomputed",
             count)
    return count
