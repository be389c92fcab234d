"""SDPA attention that a left-padded batch cannot poison (transformers' own kernel, a corrected mask).

In a left-padded batch the pad positions are query rows that may attend to no key at all: causality allows
only the keys before them and the padding mask removes exactly those. transformers' `sdpa_mask` (5.x) no
longer corrects such rows (its `allow_torch_fix` is a no-op), and PyTorch's CUDA SDPA kernels return NaN or
garbage for them; the next layer multiplies those values by attention weights of zero (0 × NaN = NaN), so
every padded row of the batch decodes to junk while the longest (unpadded) row stays right. PyTorch's CPU
kernels return zeros there, which is why CPU runs never show it (transformers#47651, unsloth#9848).

`use_for(model)` switches a model that runs `sdpa` to `sdpa_padding_safe`: the same attention function,
with a mask in which a row that attends to nothing attends to everything instead (what transformers 4.x's
`_unmask_unattended` did). Only pad rows change, and no real token attends to a pad row's key, so the
outputs of real tokens are those of an unpadded run. The name is registered through transformers'
`AttentionInterface` / `AttentionMaskInterface`, the documented extension points; nothing of transformers'
own is replaced.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

NAME = "sdpa_padding_safe"


def unmask_unattended(mask: Any) -> Any:
    """A boolean 4-D mask (True = attend) in which every row that attends to no key attends to all of them."""
    if mask is None or mask.dtype.is_floating_point:  # no mask (no padding), or an additive one: no -inf row
        return mask
    return mask | ~mask.any(dim=-1, keepdim=True)


def padding_safe_sdpa_mask(*args: Any, **kwargs: Any) -> Any:
    from transformers.masking_utils import sdpa_mask

    return unmask_unattended(sdpa_mask(*args, **kwargs))


def register() -> str:
    """Registers `sdpa_padding_safe` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, padding_safe_sdpa_mask)
    return NAME


def use_for(model: Any) -> bool:
    """Switches `model` from `sdpa` to `sdpa_padding_safe`; True when it did (other kernels are left alone:
    eager and flex attention mask with a large negative number, not -inf, and gpt-oss never runs sdpa)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(register())
    log.debug("attention: %s -> %s", type(model).__name__, NAME)
    return True
