"""GPU memory savers for `toolkit train` that need no change to the model's code.

`cap_gpu_memory(gib)` makes this process's CUDA allocator refuse to hold more than `gib` GiB, so a run on
a large card behaves as on a consumer one (an out-of-memory error past the cap) and proves a preset fits it.

`offload_input_embeddings(model)` keeps the input embedding table in CPU memory (gpt-oss: 201,088 x 2880
bf16 = 1.1 GiB, a twelfth of a 4-bit gpt-oss-20b): each step looks up its few thousand rows on the CPU
and copies them to the GPU. The table is frozen (LoRA does not train it), so nothing else needs it on
the GPU. The weight becomes a plain attribute, so `model.to(device)` (the Trainer's placement) leaves
it where it is and `get_input_embeddings().weight` still answers; it is no longer in `state_dict()`,
which only matters for full-model saves (the train stage saves the adapter alone).
"""

from __future__ import annotations

from typing import Any


def offload_input_embeddings(model: Any) -> int:
    """Move the input embedding table of `model` to the CPU; returns the bytes freed on the accelerator."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if embedding.weight.device.type == "cpu" or output is not None and output.weight is embedding.weight:
        return 0  # already there, or tied to the LM head (which needs it on the accelerator)
    return keep_table_on(embedding, "cpu", embedding.weight.device)


def keep_table_on(embedding: Any, home: Any, device: Any) -> int:
    """Hold `embedding`'s frozen table on `home` as a plain attribute; lookups run there, outputs go to `device`."""
    weight = embedding.weight
    table = weight.detach().to(home)
    del embedding._parameters["weight"]
    embedding.weight = table  # a plain attribute now: Module.to() no longer moves it

    def to_home(module: Any, args: tuple) -> tuple:
        return (args[0].to(home), *args[1:])

    def to_device(module: Any, args: tuple, output: Any) -> Any:
        return output.to(device, non_blocking=True)

    embedding.register_forward_pre_hook(to_home)
    embedding.register_forward_hook(to_device)
    return weight.numel() * weight.element_size()


def cap_gpu_memory(gib: float, device: int | None = None) -> float:
    """Cap the caching allocator of `device` (default: the current one) at `gib` GiB; returns the fraction set."""
    import torch

    from toolkit.errors import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError(f"train.gpu_memory_gib {gib}: torch sees no CUDA GPU to cap; set it to 0")
    device = torch.cuda.current_device() if device is None else device
    total = torch.cuda.get_device_properties(device).total_memory
    if gib * 2**30 > total:
        raise ConfigError(f"train.gpu_memory_gib {gib}: more than this GPU has ({total / 2**30:.1f} GiB)")
    fraction = gib * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
