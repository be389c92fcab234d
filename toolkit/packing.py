"""Per-example attention masks for packed / padding-free gpt-oss batches.

With `train.packing` or `train.padding_free`, TRL's collator concatenates a batch's examples into one
row, without an attention mask, and gives each example its own `position_ids` (0, 1, ... restarting at
each example). transformers detects that layout from `position_ids` when it builds the attention masks,
but (as of 5.24) `GptOssModel.forward` builds its masks without passing `position_ids`, so with eager or
flex attention an example attends to the examples packed before it. FlashAttention kernels read the
positions themselves and are not affected.

`mask_packed_examples(model)` adds a forward pre-hook to the gpt-oss backbone that builds the full and
sliding-window masks itself, with `position_ids` (transformers' own packed-sequence masks), and hands
them over as the prepared mask mapping the model accepts. Batches with an attention mask, or a cache
(generation), pass through untouched.
"""

from __future__ import annotations

from typing import Any

HOOKED = "_toolkit_packed_masks"


def _backbone(model: Any) -> Any | None:
    """The GptOssModel inside a causal LM / PeftModel, or None for other architectures."""
    for module in model.modules():
        if type(module).__name__ == "GptOssModel":
            return module
    return None


def _build_masks(module: Any, args: tuple, kwargs: dict[str, Any]):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("attention_mask") is not None or kwargs.get("cache") is not None:
        return None
    if args:  # input_ids given positionally
        kwargs = {**kwargs, "input_ids": args[0]}
        args = ()
    if kwargs.get("inputs_embeds") is None:
        kwargs = {**kwargs, "inputs_embeds": module.embed_tokens(kwargs["input_ids"]), "input_ids": None}
    mask_kwargs = {"config": module.config, "inputs_embeds": kwargs["inputs_embeds"], "attention_mask": None,
                   "cache": None, "position_ids": position_ids}
    kwargs["attention_mask"] = {"full_attention": create_causal_mask(**mask_kwargs),
                                "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
    return args, kwargs


def mask_packed_examples(model: Any) -> bool:
    """Hook the gpt-oss backbone of `model` (once); False for other architectures, which need no hook."""
    backbone = _backbone(model)
    if backbone is None:
        return False
    if not getattr(backbone, HOOKED, False):
        backbone.register_forward_pre_hook(_build_masks, with_kwargs=True)
        setattr(backbone, HOOKED, True)
    return True
