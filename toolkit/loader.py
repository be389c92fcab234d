"""Base weights streamed from the checkpoint into a meta-device model, one tensor at a time (`toolkit train`).

`from_pretrained` with gpt-oss' MXFP4 checkpoint and `device_map="cpu"` holds the whole model dequantized
to 16 bits in host RAM (~42 GB for gpt-oss-20b) before qlora can quantize it. Here the model is built on
the meta device (buffers such as RoPE frequencies stay real), and `stream_weights` reads the checkpoint
shard by shard, tensor by tensor (`toolkit.checkpoint`: each MXFP4 expert tensor dequantized on its own,
straight to the parameter's dtype; each read opens and closes its shard, so no memory map lingers), and
hands each to a placement policy `place(module, name, tensor)` that puts it where it belongs before the
next one is read:

- `sixteen_bit(device)`: the tensor as it is, on `device` (lora on a GPU; the CPU tests);
- `nf4(model, device, compute_dtype)`: qlora. Every `nn.Linear` but `lm_head` is swapped for a
  bitsandbytes `Linear4bit` up front (still on meta) and its weight is quantized to NF4 on `device` as it
  arrives; a 3-D expert parameter goes to `device` and is quantized there at once with
  `replace_parameter_4bit`; everything else (embeddings, lm_head, router, norms, sinks, biases) stays
  16-bit. The modules and parameter layouts are those of `toolkit.lora.quantize_4bit_` (the
  from_pretrained-then-quantize path), so LoRA, the low-rank experts and training see no difference.

Host RAM holds one tensor beyond the model (plus, for an MXFP4 tensor, its packed bytes and a slice of
dequantizing work); GPU memory holds what the loaded model holds plus one 16-bit tensor on its way to
NF4, as before. A checkpoint whose names differ from the model's (another layout that transformers
converts while loading) raises `NotStreamable` before any tensor is read.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit import checkpoint as ckpt_mod
from toolkit import mxfp4
from toolkit.errors import ArtifactError

log = logging.getLogger(__name__)
Place = Callable[[Any, str, Any], None]  # (owning module, attribute name, CPU tensor in the model's dtype)
HUB_PATTERNS = ["model*.safetensors", ckpt_mod.INDEX, "generation_config.json"]


class NotStreamable(Exception):
    """The checkpoint cannot be streamed into the model as stored (the caller falls back to from_pretrained)."""


def local_folder(name_or_path: str) -> Path:
    """A local model folder, or the Hub cache's snapshot of a model id (safetensors weights only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown id, no access: from_pretrained gives its own message
        raise NotStreamable(f"cannot fetch its safetensors ({type(exc).__name__}: {exc})") from exc


def open_checkpoint(folder: Path) -> ckpt_mod.Checkpoint:
    if not (folder / ckpt_mod.INDEX).is_file() and not (folder / ckpt_mod.SINGLE).is_file():
        raise NotStreamable(f"{folder} holds no {ckpt_mod.SINGLE} or {ckpt_mod.INDEX}")
    return ckpt_mod.Checkpoint(folder)


def empty_model(config: Any, dtype: Any, **kwargs: Any):
    """The causal LM of `config` on the meta device (real buffers), tied weights tied, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # MXFP4 tensors arrive dequantized (as Mxfp4Config(dequantize=True))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.tie_weights()  # so a tied lm_head is not expected in the checkpoint
    model.eval()  # as from_pretrained returns it
    return model


def _targets(model: Any) -> dict[str, tuple[Any, str, Any]]:
    """name -> (owning module, attribute, current tensor) for every parameter and persistent buffer."""
    out: dict[str, tuple[Any, str, Any]] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                out.setdefault(dot + name, (module, name, param))
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.setdefault(dot + name, (module, name, buf))
    return out


def _aliases(model: Any) -> set[str]:
    """Names under which a tied parameter appears a second time (lm_head.weight of a tied model)."""
    unique = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique


def plan(model: Any, ckpt: Any) -> list[str]:
    """The checkpoint's names to read, shard by shard; NotStreamable when they are not the model's own."""
    aliases = _aliases(model)
    targets = {name: t for name, t in _targets(model).items() if name not in aliases}
    stored = ckpt.param_names()
    known = set(stored)
    # a real buffer (RoPE frequencies) need not be stored; a parameter must
    missing = [n for n in targets if n not in known and targets[n][2].device.type == "meta"]
    unexpected = [n for n in stored if n not in targets and n not in aliases]
    if missing or unexpected:
        raise NotStreamable(f"its tensor names are not {type(model).__name__}'s: missing {missing[:3]}"
                            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                            f"{'...' if len(unexpected) > 3 else ''}")
    return ckpt.in_shard_order(n for n in stored if n in targets)


def stream_weights(model: Any, ckpt: Any, place: Place, *, dequantize_on: Any = None,
                   progress: Callable[[str], None] | None = None) -> int:
    """Fill the meta-device `model` from `ckpt`, one tensor at a time, through `place`; returns the count.

    Each tensor is read in the dtype of the model's own parameter (an MXFP4 one dequantized on the CPU, or
    on `dequantize_on`: its packed bytes travel there, a quarter of the 16-bit size), checked against its
    shape and handed to `place` before the next is read. Tied weights are tied again at the end.
    """
    names = plan(model, ckpt)
    targets = _targets(model)
    for name in names:
        module, attr, old = targets[name]
        packed = mxfp4.packed_names(name)[0] in ckpt.weight_map
        tensor = ckpt.param(name, old.dtype, device=dequantize_on if packed else None)
        if tuple(tensor.shape) != tuple(old.shape):
            raise ArtifactError(f"{ckpt.folder}: {name} has shape {tuple(tensor.shape)}, the model's config.json "
                                f"expects {tuple(old.shape)}. Check that config.json belongs to these weights.")
        place(module, attr, tensor)
        del tensor
        release_freed_memory()
        if progress is not None:
            progress(name)
    model.tie_weights()
    return len(names)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold, which rises to 32 MB once large blocks are freed, so
    reading tensor after tensor grows the heap with the model's size; trimmed after each tensor, the peak stays
    at about one tensor (`bench/qlora_load.py` measures both).
    """
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def assign(module: Any, name: str, tensor: Any, requires_grad: bool | None = None) -> None:
    """Put `tensor` in `module` as its parameter (or buffer) `name`, replacing the meta one."""
    import torch

    if name in module._parameters:
        old = module._parameters[name]
        grad = old.requires_grad if requires_grad is None else requires_grad
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=grad and tensor.is_floating_point())
    else:
        module._buffers[name] = tensor


def sixteen_bit(device: Any, keep_on_cpu: frozenset[int] = frozenset()) -> Place:
    """Every tensor as read, on `device`; tensors of the modules whose id() is in `keep_on_cpu` stay on the CPU."""

    def place(module: Any, name: str, tensor: Any) -> None:
        assign(module, name, tensor if id(module) in keep_on_cpu else tensor.to(device))

    return place


def linear_4bit(linear: Any, compute_dtype: Any):
    """A bitsandbytes NF4 `Linear4bit` shaped like `linear` (weights not set yet)."""
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)


def params_4bit(weight: Any, module: Any):
    """`weight` as an NF4 `Params4bit` of `module`; it is quantized when moved to its device."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True, module=module)


def swap_linear_4bit(model: Any, compute_dtype: Any) -> int:
    """Replace every `nn.Linear` but `lm_head` of the meta-device `model` by an empty NF4 `Linear4bit`."""
    import torch

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                with torch.device("meta"):
                    q = linear_4bit(child, compute_dtype)
                # in the Linear's own dtype (Linear4bit's are float32): NF4 then dequantizes to it, as before
                q.weight = params_4bit(child.weight.data, q)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                count += 1
    return count


def nf4(model: Any, device: Any, compute_dtype: Any, keep_on_cpu: frozenset[int] = frozenset()) -> Place:
    """qlora's placement: Linear4bit weights and 3-D expert parameters quantized to NF4 on `device` on arrival.

    Swaps the model's `nn.Linear`s (not lm_head) for `Linear4bit` first; call before `stream_weights`.
    """
    import bitsandbytes as bnb
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    swap_linear_4bit(model, compute_dtype)
    sixteen = sixteen_bit(device, keep_on_cpu)
    counts = {"linear": 0, "experts": 0}

    def place(module: Any, name: str, tensor: Any) -> None:
        if isinstance(module, bnb.nn.Linear4bit):
            if name == "weight":
                module.weight = params_4bit(tensor, module).to(device)  # Params4bit quantizes on the move
                counts["linear"] += 1
            else:
                assign(module, name, tensor.to(device), requires_grad=False)
        elif tensor.ndim == 3 and name in module._parameters:
            assign(module, name, tensor.to(device), requires_grad=False)
            replace_parameter_4bit(module, name, quant_type="nf4", compress_statistics=True)
            counts["experts"] += 1
        else:
            sixteen(module, name, tensor)

    place.counts = counts  # type: ignore[attr-defined]
    return place


def load(folder: str | Path, config: Any, dtype: Any, device: Any, *, quantize: bool = False,
         offload_embeddings: bool = False, dequantize_on_device: bool = False,
         model_kwargs: dict[str, Any] | None = None):
    """The causal LM of the safetensors folder `folder`, streamed to `device` (`quantize`: qlora's NF4).

    `offload_embeddings`: the input embedding table is read straight into CPU memory and stays there
    (toolkit.memory), unless it is tied to the LM head. `dequantize_on_device`: MXFP4 experts travel packed
    and are dequantized on `device` (much faster on a GPU, a quarter of the bytes over PCIe, but the
    dequantizing slices add a few hundred MB to the GPU's loading peak); off, the CPU dequantizes them, as
    from_pretrained does. Raises NotStreamable before reading any tensor when the folder cannot be streamed.
    """
    from tqdm import tqdm

    folder = Path(folder)
    ckpt = open_checkpoint(folder)
    model = empty_model(config, dtype, **(model_kwargs or {}))
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    offload = offload_embeddings and not (output is not None and output.weight is embedding.weight)
    keep = frozenset({id(embedding)}) if offload else frozenset()
    place = nf4(model, device, dtype, keep) if quantize else sixteen_bit(device, keep)
    names = plan(model, ckpt)  # NotStreamable here, before any tensor is read
    bar = tqdm(total=len(names), desc="Loading weights (streamed)", unit="tensor", leave=False)
    try:
        stream_weights(model, ckpt, place, dequantize_on=device if dequantize_on_device else None,
                       progress=lambda name: bar.update())
    finally:
        bar.close()
    left = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if left:
        raise RuntimeError(f"streamed load left {len(left)} tensors unloaded, e.g. {left[:3]}")
    if offload:
        from toolkit.memory import keep_table_on

        keep_table_on(embedding, "cpu", device)  # before model.to: the table is a plain attribute then
    model.to(device)  # the buffers built on the CPU (RoPE frequencies); the weights are there already
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    if quantize:
        model.is_loaded_in_4bit = True  # TRL then keeps the LoRA weights in bf16, as for a bnb-loaded model
        log.info("qlora: %d nn.Linear and %d expert tensors quantized to NF4 while streaming",
                 place.counts["linear"], place.counts["experts"])  # type: ignore[attr-defined]
    return model
