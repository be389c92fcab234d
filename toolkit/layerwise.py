"""Logits of a checkpoint without holding the model: one decoder layer's weights in memory at a time.

The model is built on the meta device (buffers such as RoPE frequencies stay real), the weights outside
the decoder layers (embeddings, final norm, LM head) are loaded, and each decoder layer gets a forward
pre-hook that reads its tensors from the checkpoint (MXFP4 experts dequantized one tensor at a time,
`toolkit.checkpoint`) and a forward hook that frees them again. The model's own `forward` runs, so the
logits are transformers' own, at the cost of reading the weights once per call.

`transform(name, tensor)` rewrites each tensor as it is loaded: the merge check uses it to run
base+adapter (the LoRA delta added in float32) from the base checkpoint alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.checkpoint import Checkpoint

log = logging.getLogger(__name__)
Transform = Callable[[str, Any], Any]


def _decoder_layers(model: Any) -> list[tuple[str, Any]]:
    """(prefix, module) of every decoder layer: the children of the model's largest ModuleList."""
    import torch

    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found")
    name, layers = max(lists, key=lambda item: len(item[1]))
    return [(f"{name}.{i}.", layer) for i, layer in enumerate(layers)]


def _load(module: Any, prefix: str, ckpt: Checkpoint, dtype: Any, transform: Transform | None) -> None:
    import torch
    from accelerate.utils import set_module_tensor_to_device

    for name, param in list(module.named_parameters()):
        full = prefix + name
        tensor = ckpt.param(full, dtype if transform is None else torch.float32)
        if transform is not None:
            tensor = transform(full, tensor)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{ckpt.folder}: {full} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(param.shape)}")
        set_module_tensor_to_device(module, name, "cpu", value=tensor.to(dtype))


def _unload(module: Any) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "meta")


def _table_names(model: Any) -> set[str]:
    """Names of the input and output embedding weights (gpt-oss-20b: 2 x 201,088 x 2,880)."""
    ids = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return {name for name, param in model.named_parameters() if id(param) in ids}


def _compact(tensor: Any, stored: str) -> Any:
    """A float32 embedding table back in its stored 16-bit dtype when that loses nothing (it came from there).

    A float32 forward then keeps gpt-oss-20b's two tables at 2.2 GB instead of 4.6 GB; `_compute_tables_in`
    upcasts what they produce, so the logits are the same bits.
    """
    import torch

    narrow = {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored)
    if narrow is None:
        return tensor.float()
    small = tensor.to(narrow)
    return small if torch.equal(small.float(), tensor.float()) else tensor.float()


def _compute_tables_in(model: Any, dtype: Any, rows: int = 16384) -> None:
    """Embedding lookups upcast to `dtype`; the LM head multiplies `rows` vocabulary rows at a time in `dtype`."""
    import types

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding.weight.dtype != dtype:
        embedding.register_forward_hook(lambda m, args, out: out.to(dtype))
    if head is not None and head.weight.dtype != dtype:
        def forward(self, hidden):
            import torch

            out = torch.empty(*hidden.shape[:-1], self.weight.shape[0], dtype=dtype)
            for start in range(0, self.weight.shape[0], rows):
                out[..., start:start + rows] = hidden.to(dtype) @ self.weight[start:start + rows].to(dtype).T
            if self.bias is not None:
                out += self.bias.to(dtype)
            return out

        head.forward = types.MethodType(forward, head)


def streamed_model(folder: str | Path, dtype: Any = None, transform: Transform | None = None, config: Any = None):
    """A CausalLM whose decoder layers load their weights from `folder` only while they run."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.float32
    ckpt = Checkpoint(folder)
    config = config if config is not None else AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # tensors arrive dequantized from the checkpoint reader
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    model.eval()
    layers = _decoder_layers(model)
    stored = set(ckpt.param_names())
    tables = _table_names(model)
    for name, _ in list(model.named_parameters()):
        if any(name.startswith(prefix) for prefix, _ in layers) or name not in stored:
            continue  # a layer's own (loaded by its hook), or a tied weight (tied again below)
        tensor = ckpt.param(name, dtype if transform is None else torch.float32)
        if transform is not None:
            tensor = transform(name, tensor)
        if name in tables and dtype == torch.float32:
            tensor = _compact(tensor, ckpt.header(name)[0])
        else:
            tensor = tensor.to(dtype)
        set_module_tensor_to_device(model, name, "cpu", value=tensor, dtype=tensor.dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if dtype == torch.float32:
        _compute_tables_in(model, dtype)
    for prefix, layer in layers:
        layer.register_forward_pre_hook(lambda m, args, p=prefix: _load(m, p, ckpt, dtype, transform))
        layer.register_forward_hook(lambda m, args, out: _unload(m))
    return model


def logits(folder: str | Path, rows: list[list[int]], *, dtype: Any = None, transform: Transform | None = None,
           config: Any = None) -> list[Any]:
    """Float32 logits [len(row), vocab] for each row of token ids, in one pass over the layers (a padded batch)."""
    import torch

    model = streamed_model(folder, dtype, transform, config)
    width = max(len(row) for row in rows)
    pad = 0
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    return [out[i, : len(row)].clone() for i, row in enumerate(rows)]
