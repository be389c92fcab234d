"""Sharded safetensors checkpoints read and written one tensor at a time (bounded host memory).

`Checkpoint(folder)` indexes a model folder (`model.safetensors` or `model.safetensors.index.json`
with its shards) and hands out tensors by name without loading a whole shard; `params(dtype)` yields
the model's parameters in transformers' naming and layout, each MXFP4 `*_blocks`/`*_scales` pair
dequantized on its own (see toolkit.mxfp4).

`write_shards(folder, plan, produce)` writes a checkpoint whose layout is planned up front: the
names, dtypes and shapes of every tensor are known before any value is computed, so each shard's
safetensors header is written first and each tensor is produced, written and freed in turn. The
safetensors package itself only writes a whole dict at once, which would hold a shard (GBs) in RAM.
Shards go to temporary names and are renamed, with the index, once all are complete.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit import mxfp4
from toolkit.errors import ArtifactError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors dtype names <-> torch dtypes (the subset checkpoints here use)
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "U8": "uint8", "I64": "int64", "I32": "int32",
           "BOOL": "bool", "F64": "float64", "I8": "int8", "I16": "int16"}
_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I64": 8, "I32": 4, "BOOL": 1, "F64": 8, "I8": 1, "I16": 2}


def st_dtype(dtype: Any) -> str:
    """torch dtype -> safetensors dtype name."""
    name = str(dtype).removeprefix("torch.")
    for key, value in _DTYPES.items():
        if value == name:
            return key
    raise ValueError(f"no safetensors dtype for {dtype}")


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / bytes -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * units[unit])
    return int(upper)


class Checkpoint:
    """Read-only view of a safetensors model folder, tensor by tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.folder / SINGLE), "pt") as fh:
                self.weight_map = {name: SINGLE for name in fh.keys()}  # noqa: SIM118 (a safe_open handle)
        else:
            raise ArtifactError(f"{self.folder}: no {INDEX} or {SINGLE}. Pass a folder holding a safetensors model.")
        config = self.folder / "config.json"
        self.config: dict[str, Any] = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}

    @property
    def is_mxfp4(self) -> bool:
        return mxfp4.is_mxfp4(self.config) or any(mxfp4.param_name_of(n) for n in self.weight_map)

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def tensor(self, name: str, dtype=None):
        """One stored tensor, copied out of its shard (converted to `dtype` on the way, when given).

        The shard is opened for this one read and closed again: safetensors memory-maps the file, and pages
        touched through an open map count in the process's resident memory until it is closed, so a cached
        handle would grow to the whole shard.
        """
        from safetensors import safe_open

        try:
            shard = self.weight_map[name]
        except KeyError:
            raise ArtifactError(f"{self.folder}: no tensor {name!r} in the checkpoint") from None
        with safe_open(str(self.folder / shard), "pt") as fh:
            stored = fh.get_tensor(name)  # a view of the mapped file: converting copies it once
            return stored.clone() if dtype is None or dtype == stored.dtype else stored.to(dtype)

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of one stored tensor, from its shard's header (nothing is read)."""
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise ArtifactError(f"{self.folder}: no tensor {name!r} in the checkpoint") from None
        from safetensors import safe_open

        with safe_open(str(self.folder / shard), "pt") as fh:
            view = fh.get_slice(name)
            return view.get_dtype(), tuple(view.get_shape())

    def param_names(self) -> list[str]:
        """Parameter names in transformers' naming: each blocks/scales pair counts once, under its parameter."""
        names: list[str] = []
        for name in self.weight_map:
            base = mxfp4.param_name_of(name)
            if base is None:
                names.append(name)
            elif name.endswith(mxfp4.SUFFIXES[0]):
                names.append(base)
        return names

    def param(self, name: str, dtype=None, device=None):
        """A parameter in transformers' layout; an MXFP4 expert parameter is dequantized to `dtype`.

        `device`: where to put it; packed MXFP4 tensors travel packed (a quarter of the bytes) and are
        dequantized there.
        """
        blocks, scales = mxfp4.packed_names(name)
        if blocks in self.weight_map:
            packed = self.tensor(blocks), self.tensor(scales)
            if device is not None:
                packed = tuple(t.to(device) for t in packed)
            return mxfp4.dequantize_param(*packed, dtype)
        if device is None:
            return self.tensor(name, dtype)
        tensor = self.tensor(name).to(device)
        return tensor if dtype is None else tensor.to(dtype)

    def packed(self, name: str) -> tuple[Any, Any] | None:
        """The stored (blocks, scales) of an MXFP4 parameter, or None when it is stored plainly."""
        blocks, scales = mxfp4.packed_names(name)
        if blocks not in self.weight_map:
            return None
        return self.tensor(blocks), self.tensor(scales)

    def params(self, dtype=None) -> Iterator[tuple[str, Any]]:
        """Every parameter, shard by shard (MXFP4 pairs dequantized one at a time)."""
        for name in self.in_shard_order(self.param_names()):
            yield name, self.param(name, dtype)

    def shard_of(self, param: str) -> str:
        """The shard holding a parameter (an MXFP4 one: the shard of its blocks)."""
        return self.weight_map.get(param) or self.weight_map[mxfp4.packed_names(param)[0]]

    def in_shard_order(self, params) -> list[str]:
        """`params` sorted shard after shard (then by name), so a pass reads each shard once, front to back."""
        order = {shard: i for i, shard in enumerate(self.shards())}
        return sorted(params, key=lambda n: (order[self.shard_of(n)], n))



@dataclass(frozen=True)
class Entry:
    """One tensor of a planned checkpoint: stored name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * _SIZES[self.dtype]


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split `entries` (in order) into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(fh, tensor, entry: Entry) -> None:
    import torch

    if st_dtype(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise ArtifactError(f"checkpoint writer: {entry.name} planned as {entry.dtype}{list(entry.shape)}, produced "
                            f"{st_dtype(tensor.dtype)}{list(tensor.shape)}")
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    fh.write(memoryview(data))


def write_shards(
    folder: Path,
    entries: list[Entry],
    produce: Callable[[Entry], Any],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    progress: Callable[[Entry], None] | None = None,
) -> list[Path]:
    """Write `entries` as safetensors shards (+ index when more than one); `produce(entry)` gives each tensor.

    Tensors are produced in `entries` order and written straight to disk. Files appear under their final
    names only when every shard is complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_names(len(shards))
    metadata = {"format": "pt", **(metadata or {})}
    temps = [folder / f".{name}.tmp" for name in names]
    try:
        for shard, tmp in zip(shards, temps):
            with open(tmp, "wb") as fh:
                fh.write(_header(shard, metadata))
                for entry in shard:
                    _write_tensor(fh, produce(entry), entry)
                    if progress:
                        progress(entry)
        for tmp, name in zip(temps, names):
            os.replace(tmp, folder / name)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: name for shard, name in zip(shards, names) for e in shard}}
        tmp = folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / INDEX)
    return [folder / name for name in names]
