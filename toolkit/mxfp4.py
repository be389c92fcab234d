"""MXFP4 (OCP Microscaling FP4) in gpt-oss' released checkpoint layout: quantize and dequantize.

gpt-oss-20b ships its MoE expert weights as two uint8 tensors per projection:
- `*_blocks` [E, rows, cols/32, 16]: 32 FP4 (E2M1) values per block, two per byte, low nibble first;
- `*_scales` [E, rows, cols/32]: one E8M0 exponent per block (value = fp4 * 2**(scale - 127)).

`rows` is the projection's output size and `cols` its input size, so the transformers parameter
(`gate_up_proj` [E, hidden, 2*inter], `down_proj` [E, inter, hidden]) is the dequantized [E, rows, cols]
transposed on its last two axes (transformers' `convert_moe_packed_tensors` does the same).

`quantize` follows the OCP MX v1.0 rule: the block's shared exponent is floor(log2(max|x|)) - 2 (2 being
E2M1's largest exponent), each value is rounded to the nearest E2M1 value and saturates at +-6. A block
already representable in MXFP4 round-trips exactly. Work is done a slice of experts at a time, so the
float32 intermediates stay a fraction of the tensor.
"""

from __future__ import annotations

from typing import Any

BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive E2M1 magnitudes: rounding to nearest is a bucketize on them.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
SUFFIXES = ("_blocks", "_scales")
# What openai/gpt-oss-20b's config.json keeps out of MXFP4 (everything but the expert projections).
MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_SLICE_VALUES = 1 << 26  # values handled per slice (256 MB of float32)


def quantization_config() -> dict[str, Any]:
    """The `quantization_config` entry of a released gpt-oss config.json."""
    return {"modules_to_not_convert": list(MODULES_NOT_CONVERTED), "quant_method": "mxfp4"}


def is_mxfp4(config: Any) -> bool:
    """True for a model config (object or dict) whose checkpoint stores MXFP4 experts."""
    quant = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config",
                                                                                        None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method or "").lower().endswith("mxfp4")


def _slices(n: int, per_item: int):
    step = max(1, _SLICE_VALUES // max(per_item, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _pair_table(dtype, device):
    """[256, 2]: the two FP4 values of every byte (low nibble first), so one gather decodes a byte."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    return torch.stack([lut.repeat(16), lut.repeat_interleave(16)], -1).to(dtype=dtype, device=device)


def dequantize_rows(blocks, scales, dtype=None):
    """[..., rows, G, 16] uint8 blocks + [..., rows, G] scales -> [..., rows, G*32] in `dtype` (float32 default).

    Exact: every FP4 value times a power of two is representable in bfloat16 and float32, so bf16 output is
    computed in bf16 (half the memory traffic of a float32 pass).
    """
    import torch

    dtype = dtype or torch.float32
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    device = blocks.device  # works where the tensors are: the GPU dequantizes gpt-oss-20b's experts in seconds
    pairs = _pair_table(work, device)
    lead = blocks.shape[:-3]
    flat_blocks = blocks.reshape(-1, *blocks.shape[-3:])
    flat_scales = scales.reshape(-1, *scales.shape[-2:])
    rows, groups = flat_blocks.shape[1], flat_blocks.shape[2]
    out = torch.empty(flat_blocks.shape[0], rows, groups * BLOCK, dtype=dtype, device=device)
    for part in _slices(flat_blocks.shape[0], rows * groups * BLOCK):
        blk = flat_blocks[part]
        values = pairs.index_select(0, blk.reshape(-1).to(torch.int32)).reshape(*blk.shape[:-1], BLOCK)
        factor = torch.exp2(flat_scales[part].to(torch.float32) - 127).to(work).unsqueeze(-1)
        out[part] = (values * factor).reshape(blk.shape[0], rows, groups * BLOCK).to(dtype)
    return out.reshape(*lead, rows, groups * BLOCK)


def quantize_rows(x):
    """[..., rows, cols] float -> (blocks [..., rows, cols/32, 16] uint8, scales [..., rows, cols/32] uint8)."""
    import torch

    if x.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}; got shape {tuple(x.shape)}")
    lead, rows, cols = x.shape[:-2], x.shape[-2], x.shape[-1]
    flat = x.reshape(-1, rows, cols)
    groups = cols // BLOCK
    device = x.device
    blocks = torch.empty(flat.shape[0], rows, groups, BLOCK // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(flat.shape[0], rows, groups, dtype=torch.uint8, device=device)
    midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=device)
    for part in _slices(flat.shape[0], rows * cols):
        g = flat[part].float().contiguous().reshape(-1, rows, groups, BLOCK)
        amax = g.abs().amax(-1)
        _, exp2 = torch.frexp(amax)  # amax = m * 2**exp2, m in [0.5, 1): floor(log2(amax)) = exp2 - 1
        shared = torch.where(amax > 0, exp2 - 1 - 2, torch.full_like(exp2, -127)).clamp(-127, 127)
        scaled = torch.ldexp(g, (-shared).unsqueeze(-1).float())
        index = torch.bucketize(scaled.abs(), midpoints).to(torch.uint8)  # 0..7, saturating at 6
        index |= torch.signbit(scaled).to(torch.uint8) << 3
        blocks[part] = index[..., 0::2] | (index[..., 1::2] << 4)
        scales[part] = (shared + 127).to(torch.uint8)
    return blocks.reshape(*lead, rows, groups, BLOCK // 2), scales.reshape(*lead, rows, groups)


def dequantize_param(blocks, scales, dtype=None):
    """Released blocks/scales -> the transformers parameter ([E, in, out]: rows and cols swapped).

    Done a slice of experts at a time straight into the result: a whole-stack dequantize then transpose would
    hold two full copies.
    """
    import torch

    dtype = dtype or torch.float32
    rows, groups = blocks.shape[-3], blocks.shape[-2]
    flat_blocks, flat_scales = blocks.reshape(-1, *blocks.shape[-3:]), scales.reshape(-1, *scales.shape[-2:])
    out = torch.empty(flat_blocks.shape[0], groups * BLOCK, rows, dtype=dtype, device=blocks.device)
    for part in _slices(flat_blocks.shape[0], rows * groups * BLOCK):
        out[part] = dequantize_rows(flat_blocks[part], flat_scales[part], dtype).transpose(-1, -2)
    return out.reshape(*blocks.shape[:-3], groups * BLOCK, rows)


def quantize_param(param):
    """A transformers expert parameter [E, in, out] -> released (blocks, scales) over [E, out, in]."""
    import torch

    experts, cols, rows = param.shape
    if cols % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}; got {tuple(param.shape)}")
    blocks = torch.empty(experts, rows, cols // BLOCK, BLOCK // 2, dtype=torch.uint8, device=param.device)
    scales = torch.empty(experts, rows, cols // BLOCK, dtype=torch.uint8, device=param.device)
    for part in _slices(experts, rows * cols):
        blocks[part], scales[part] = quantize_rows(param[part].transpose(-1, -2))
    return blocks, scales


def packed_names(param_name: str) -> tuple[str, str]:
    """`...experts.gate_up_proj` -> (`...experts.gate_up_proj_blocks`, `...experts.gate_up_proj_scales`)."""
    return param_name + SUFFIXES[0], param_name + SUFFIXES[1]


def param_name_of(packed: str) -> str | None:
    """The parameter a `*_blocks`/`*_scales` tensor belongs to (None for any other name)."""
    for suffix in SUFFIXES:
        if packed.endswith(suffix):
            return packed[: -len(suffix)]
    return None
