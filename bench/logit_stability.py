"""How chaotic is a random gpt-oss? float32 vs bfloat16 activations on the same weights, per `toolkit tiny` init.

A logit check (merge parity, export verification) can only judge a conversion if rounding the activations
moves the logits much less than a real error would. Random weights drawn the same for every layer make each
layer rewrite the residual stream: such a model amplifies any rounding, and no check of llama.cpp (8-bit
activations in its MXFP4 kernel) against float32 can pass. This script builds gpt-oss-20b's layer shapes
(24 layers, width 2880, 64 heads; fewer experts and a small vocabulary, which do not change the depth or the
per-layer gain) with each `--init` of `toolkit tiny --size 20b` and prints the difference of the last logits.

    python bench/logit_stability.py [--experts 2] [--vocab 4096] [--tokens 24] [--json OUT.json]
    python bench/logit_stability.py --model DIR        # any gpt-oss folder instead (e.g. the full-size one)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compare(folder: Path, rows: list[list[int]]) -> dict:
    import torch

    from toolkit import layerwise

    start = time.perf_counter()
    f32, b16 = (layerwise.logits(folder, rows, dtype=d)[0] for d in (torch.float32, torch.bfloat16))
    last = (b16 - f32)[-1].abs().max().item()
    return {"max_abs_diff_last": round(last, 5), "rel_diff_last": round(last / f32[-1].abs().max().item(), 5),
            "top1_agreement": round((b16.argmax(-1) == f32.argmax(-1)).float().mean().item(), 4),
            "positions": f32.shape[0], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Compare this folder instead of building models.")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    rows = [torch.randint(0, args.vocab if not args.model else 200000, (args.tokens,),
                          generator=torch.Generator().manual_seed(0)).tolist()]
    results = []
    if args.model:
        results.append({"model": str(args.model), **compare(args.model, rows)})
    else:
        from transformers import GptOssConfig

        from toolkit.tiny import INITS, build_gpt_oss_20b, build_tiny

        layers = 24
        config = GptOssConfig(num_hidden_layers=layers, num_local_experts=args.experts,
                              num_experts_per_tok=min(4, args.experts), hidden_size=2880, intermediate_size=2880,
                              head_dim=64, num_attention_heads=64, num_key_value_heads=8, vocab_size=args.vocab,
                              sliding_window=128, tie_word_embeddings=False,
                              layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(layers)])
        with tempfile.TemporaryDirectory() as tmp:
            tok = build_tiny(Path(tmp) / "tok")  # only its tokenizer files are copied
            for init in INITS:
                folder = build_gpt_oss_20b(Path(tmp) / init, tokenizer=tok, config=config, init=init)
                results.append({"init": init, "layers": layers, "hidden": 2880, "experts": args.experts,
                                **compare(folder, rows)})
                print(json.dumps(results[-1]), file=sys.stderr)
    print("| model | max abs diff (last) | rel | top-1 agreement | positions |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r.get('init', r.get('model'))} | {r['max_abs_diff_last']} | {r['rel_diff_last']} | "
              f"{r['top1_agreement']:.1%} | {r['positions']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
