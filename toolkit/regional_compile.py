"""Regional `torch.compile` of the decoder layers (`train.compile_layers`).

Compiling the whole model costs minutes and recompiles on every change of its outer code (masks, loss);
compiling each decoder layer in place (`nn.Module.compile`, as accelerate's `compile_regions_fsdp2` and
PyTorch's regional-compilation recipe do) compiles one layer's forward and backward once and reuses the
code for the other layers of the same kind (parameters are graph inputs): gpt-oss has four kinds, sliding
or full attention, with or without expert LoRA. What it buys is fewer kernel launches and fused
element-wise work (norms, RoPE, routing, the clamped SwiGLU, LoRA adds); it matters most where the GPU
waits on Python, e.g. qlora at micro-batch 1.

In place, so the module tree, the peft wrappers, the saved adapter and hooks (bitsandbytes' dequantization
cache) stay as they are; transformers' gradient checkpointing runs inside the layer's forward and is
compiled with it (non-reentrant checkpointing is traced as a recompute region). Modes are torch.compile's:
`default`, `max-autotune-no-cudagraphs` (autotuned Triton GEMM choices, longer compile) and
`reduce-overhead` (CUDA graphs too; may not survive MoE routing and checkpointing: measure first).
"""

from __future__ import annotations

import logging
from typing import Any

from toolkit.config import COMPILE_MODES as MODES
from toolkit.errors import ConfigError

log = logging.getLogger(__name__)
RECOMPILE_LIMIT = 64  # layer kinds x train/eval x shapes share one code object's cache (dynamo's default: 8)


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of `model` (a PeftModel or a transformers model): its `_no_split_modules` classes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def dynamo_settings() -> Any:
    """The dynamo settings compiled layers train under, as a context manager (`torch._dynamo.config.patch`):
    `toolkit.train` enters it around training when `train.compile_layers` is on, so nothing stays changed after.

    toolkit.expert_lora / toolkit.redequantize register state while a layer's forward runs and remove it at its
    end. Under checkpointing dynamo refuses such mutations (a graph break: the layer runs uncompiled) unless told
    that the recompute need not replay them; the compiled recompute replays the traced graph, whose low-rank terms
    and GEMM choices were fixed when it was traced, so nothing is lost. Data-dependent sizes in MoE routing stay in
    the graph (capture_scalar_outputs), and layer kinds x train/eval x shapes need more than dynamo's 8 recompiles.
    """
    import torch._dynamo

    config = torch._dynamo.config
    return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True, capture_scalar_outputs=True,
                        recompile_limit=max(config.recompile_limit, RECOMPILE_LIMIT),
                        accumulated_recompile_limit=max(config.accumulated_recompile_limit, 16 * RECOMPILE_LIMIT))


def compile_layers(model: Any, mode: str = "default", backend: str = "inductor") -> int:
    """Compile each decoder layer of `model` in place with `mode`; returns how many ("off": none). The layers
    compile at their first call: train them inside `dynamo_settings()`."""

    if mode not in MODES:
        raise ConfigError(f"train.compile_layers: expected one of {', '.join(MODES)}, found {mode!r}")
    if mode == "off":
        return 0
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.compile_layers {mode}: {type(model).__name__} names no repeated decoder layer "
                          "(_no_split_modules). Set train.compile_layers=off for this model.")
    _share_parametrized_classes(layers)
    _drop_parametrization_cache_hooks(layers)
    kwargs = {"backend": backend}
    if mode != "default":
        kwargs["mode"] = mode
    for layer in layers:
        layer.compile(**kwargs)
    log.info("compile_layers: %d %s layers compiled (%s, mode %s)", len(layers), type(layers[0]).__name__,
             backend, mode)
    return len(layers)


def _share_parametrized_classes(layers: list[Any]) -> int:
    """One class for all modules parametrized alike (qlora's 4-bit experts), so each layer kind compiles once.

    torch's parametrize gives every parametrized module a class of its own, and dynamo guards on the class:
    every qlora layer then compiled anew (24 compilations instead of 2; seen on the CPU with bitsandbytes'
    4-bit experts). The classes differ only in name; their properties read `self.parametrizations[name]`.
    """
    shared: dict[tuple, type] = {}
    count = 0
    for layer in layers:
        for module in layer.modules():
            cls = type(module)
            params = getattr(module, "parametrizations", None)
            if params is None or not cls.__name__.startswith("Parametrized"):
                continue
            key = (cls.__bases__[0], tuple(sorted(params.keys())))
            if shared.setdefault(key, cls) is not cls:
                module.__class__ = shared[key]
                count += 1
    return count


def _drop_parametrization_cache_hooks(layers: list[Any]) -> int:
    """Remove bitsandbytes' hooks that turn on torch's parametrization cache around each 4-bit experts forward.

    The cache only saves a second dequantization when a forward reads a weight twice (transformers' grouped
    GEMMs read each once), but it keys on id(module) and its hooks differ per module: dynamo guards on both,
    so each layer recompiled. Without them each read dequantizes, as it does uncompiled outside the forward.
    """
    names = {"_enable_parametrization_cache", "_disable_parametrization_cache"}
    count = 0
    for layer in layers:
        for module in layer.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [k for k, fn in hooks.items() if getattr(fn, "__name__", "") in names
                            and getattr(fn, "__module__", "").startswith("bitsandbytes")]:
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)
                    count += 1
    return count
