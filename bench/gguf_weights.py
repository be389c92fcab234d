"""`python bench/gguf_weights.py GGUF MERGED_DIR`: compare a gpt-oss GGUF's weights with the merged checkpoint,
tensor by tensor (one layer in memory at a time): the expert stacks (MXFP4 passed through, or dense), the
embeddings and the output head. Prints one line a tensor kind and a JSON summary; exits 1 on any mismatch.

A weight-level check of the conversion for models whose logits cannot check it: a random full-size gpt-oss is
chaotic (20 qlora steps move its logits by 6.7, bf16 rounding of the changed tensors by 5), so llama.cpp's 8-bit
activations in its MXFP4 kernel alone move them as much as any conversion error would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str]) -> int:
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from toolkit.checkpoint import Checkpoint

    path, folder = Path(argv[0]), Path(argv[1])
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    ckpt = Checkpoint(folder)

    def gguf_values(name):
        t = tensors[name]
        return t.tensor_type.name, np.asarray(dequantize(t.data, t.tensor_type)).reshape(
            tuple(int(n) for n in reversed(t.shape)))

    results = {}

    def compare(gname, want):
        kind, got = gguf_values(gname)
        same = got.shape == want.shape and np.array_equal(got, want)
        worst = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
        results[gname] = {"type": kind, "exact": bool(same), "max_abs_diff": worst}
        print(f"{gname}: {kind} {'exact' if same else f'DIFFERS max {worst:.3g}'}", file=sys.stderr, flush=True)

    compare("token_embd.weight", ckpt.param("model.embed_tokens.weight", torch.float32).numpy())
    compare("output.weight", ckpt.param("lm_head.weight", torch.float32).numpy())
    for layer in range(ckpt.config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = ckpt.param(prefix + "gate_up_proj", torch.float32)  # [E, hidden, 2 * inter], gate/up interleaved
        compare(f"blk.{layer}.ffn_gate_exps.weight", gate_up[..., ::2].transpose(-1, -2).numpy())
        compare(f"blk.{layer}.ffn_up_exps.weight", gate_up[..., 1::2].transpose(-1, -2).numpy())
        del gate_up
        compare(f"blk.{layer}.ffn_down_exps.weight", ckpt.param(prefix + "down_proj", torch.float32)
                .transpose(-1, -2).numpy())
    exact = sum(r["exact"] for r in results.values())
    types: dict[str, int] = {}
    for r in results.values():
        types[r["type"]] = types.get(r["type"], 0) + 1
    print(json.dumps({"gguf": path.name, "tensors": len(results), "exact": exact, "types": types}))
    return 0 if exact == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
