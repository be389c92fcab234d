"""The merged checkpoint of `toolkit merge`: its layout, planned from the base's headers, and its tensors one by one.

`MergePlan(base, adapter, fmt, dtype)` lists every tensor the output will hold (`entries`, for
`checkpoint.write_shards`) and `produce(entry)` computes one: the base tensor in float32 (an MXFP4 expert
stack dequantized one expert at a time), plus the adapter's delta (`toolkit.adapter`), cast to `dtype`.
Formats:
- `bf16`: every floating tensor dense in `dtype` (the MXFP4 expert stacks too).
- `mxfp4`: gpt-oss' released layout: the expert stacks as MXFP4 `*_blocks`/`*_scales` (a stack the adapter
  does not change is copied verbatim from an MXFP4 base), the rest in `dtype`. The experts modules the
  adapter changes stay dense in `dtype` (named in `modules_to_not_convert`, which transformers and llama.cpp
  read per module) unless `requantize_adapted`: then they are re-quantized one expert at a time, and a
  delta smaller than half an FP4 step rounds back to the base weight.
Memory: one output tensor, the base tensor it comes from (packed, when MXFP4) and one expert in float32.
"""

from __future__ import annotations

from typing import Any

from toolkit import mxfp4
from toolkit.adapter import Adapter
from toolkit.checkpoint import Checkpoint, Entry, st_dtype
from toolkit.errors import ArtifactError
from toolkit.tiny import expert_param

FORMATS = ("bf16", "mxfp4")
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def module_of(param: str) -> str:
    """`model.layers.7.mlp.experts.gate_up_proj` -> `model.layers.7.mlp.experts`."""
    return param.rpartition(".")[0]


class MergePlan:
    def __init__(self, base: Checkpoint, adapter: Adapter, fmt: str, dtype: Any, requantize_adapted: bool = True):
        self.base, self.adapter, self.fmt, self.dtype = base, adapter, fmt, dtype
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.stored_dtypes: dict[str, str] = {}
        for name in base.param_names():
            blocks, _ = mxfp4.packed_names(name)
            if blocks in base.weight_map:
                _, (experts, rows, groups, _half) = base.header(blocks)
                self.shapes[name], self.stored_dtypes[name] = (experts, groups * mxfp4.BLOCK, rows), "U8"
            else:
                self.stored_dtypes[name], self.shapes[name] = base.header(name)
        self.names = base.in_shard_order(self.shapes)
        experts = {n for n in self.names if fmt == "mxfp4" and (self.is_packed(n) or expert_param(n))}
        # a module is converted whole (transformers swaps the experts module, llama.cpp reads its tensors as a set)
        self.dense_modules = sorted({module_of(n) for n in experts if n in adapter.targets}) if (
            not requantize_adapted) else []
        self.packed_out = {n for n in experts if module_of(n) not in self.dense_modules}
        self.requantized = sorted(n for n in self.packed_out if n in adapter.targets)
        self._check()
        self._pair: tuple[str, tuple[Any, Any]] | None = None

    def is_packed(self, name: str) -> bool:
        return self.stored_dtypes[name] == "U8" and mxfp4.packed_names(name)[0] in self.base.weight_map

    def _check(self) -> None:
        where = self.adapter.folder
        for name, target in self.adapter.targets.items():
            if name not in self.shapes:
                raise ArtifactError(f"{where}: the adapter changes {name}, which {self.base.folder} does not store "
                                    "(a tied weight?). `toolkit merge` cannot merge it.")
            if tuple(target.shape) != self.shapes[name]:
                raise ArtifactError(f"{where}: the adapter expects {name} of shape {list(target.shape)}, the base "
                                    f"stores {list(self.shapes[name])}. Check --base-model.")
        if self.fmt not in FORMATS:
            raise ArtifactError(f"merge.format: expected one of {', '.join(FORMATS)}, found {self.fmt!r}")
        if self.fmt == "mxfp4":
            if not self.packed_out and not self.dense_modules:
                raise ArtifactError(f"{self.base.folder}: no MoE expert tensors (mlp.experts.gate_up_proj/down_proj) "
                                    "to store as MXFP4. Use --format bf16.")
            for name in self.packed_out:
                if self.shapes[name][1] % mxfp4.BLOCK:
                    raise ArtifactError(f"{self.base.folder}: {name} {list(self.shapes[name])}: MXFP4 needs the input "
                                        f"size to be a multiple of {mxfp4.BLOCK}. Use --format bf16.")

    @property
    def entries(self) -> list[Entry]:
        out = []
        dense = st_dtype(self.dtype)
        for name in self.names:
            shape = self.shapes[name]
            if name in self.packed_out:  # [E, in, out] stored over [E, out, in/32, 16]
                experts, cols, rows = shape
                blocks, scales = mxfp4.packed_names(name)
                out += [Entry(blocks, "U8", (experts, rows, cols // mxfp4.BLOCK, mxfp4.BLOCK // 2)),
                        Entry(scales, "U8", (experts, rows, cols // mxfp4.BLOCK))]
            else:
                stored = self.stored_dtypes[name]
                float_like = stored in FLOAT_DTYPES or self.is_packed(name)
                out.append(Entry(name, dense if float_like else stored, shape))
        return out

    def as_stored(self, name: str, tensor):
        """`toolkit.layerwise` transform: base + the adapter's delta, rounded as the output stores that tensor."""
        import torch

        merged = self.adapter.add_to(name, tensor) if name in self.adapter.targets else tensor
        if name in self.requantized:
            return mxfp4.dequantize_param(*mxfp4.quantize_param(merged), torch.float32)
        for part in merged.view(-1, merged.shape[-1]).split(4096):  # in place, a slice at a time: no second copy
            part.copy_(part.to(self.dtype))
        return merged

    def produce(self, entry: Entry):
        """The tensor of one planned entry (a blocks/scales pair is computed once, at its first half)."""
        param = mxfp4.param_name_of(entry.name)
        if param in self.packed_out:
            if self._pair is None or self._pair[0] != param:
                self._pair = (param, self._packed(param))
            tensor = self._pair[1][0 if entry.name.endswith(mxfp4.SUFFIXES[0]) else 1]
        else:
            self._pair = None
            tensor = self._dense(entry.name)
        return tensor

    def _experts(self, name: str):
        """Yields (index, base expert [1, in, out] in float32) for a 3-D stack, stored MXFP4 or plain."""
        import torch

        packed = self.base.packed(name)
        stack = None if packed else self.base.tensor(name)
        for e in range(self.shapes[name][0]):
            if packed:
                yield e, mxfp4.dequantize_param(packed[0][e:e + 1], packed[1][e:e + 1], torch.float32)
            else:
                yield e, stack[e:e + 1].to(torch.float32, copy=True)

    def _dense(self, name: str):
        import torch

        target = self.adapter.targets.get(name)
        if len(self.shapes[name]) == 3 and (target or self.is_packed(name)):
            out = torch.empty(self.shapes[name], dtype=self.dtype)
            for e, weight in self._experts(name):
                if target:
                    self.adapter.add_to(name, weight, slice(e, e + 1))
                out[e] = weight[0].to(self.dtype)
            return out
        tensor = self.base.tensor(name)
        if target:
            tensor = self.adapter.add_to(name, tensor.to(torch.float32, copy=True))
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def _packed(self, name: str):
        import torch

        packed = self.base.packed(name)
        if packed is not None and name not in self.adapter.targets:
            return packed  # exactly the released blocks and scales
        experts, cols, rows = self.shapes[name]
        blocks = torch.empty(experts, rows, cols // mxfp4.BLOCK, mxfp4.BLOCK // 2, dtype=torch.uint8)
        scales = torch.empty(experts, rows, cols // mxfp4.BLOCK, dtype=torch.uint8)
        for e, weight in self._experts(name):
            if name in self.adapter.targets:
                self.adapter.add_to(name, weight, slice(e, e + 1))
            blocks[e:e + 1], scales[e:e + 1] = mxfp4.quantize_param(weight)
        return blocks, scales
