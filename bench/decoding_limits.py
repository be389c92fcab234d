"""Benchmark: the per-sentence token limit and the repetition stop of toolkit.decoding, measured on references
(issue 24): which `base_tokens + tokens_per_source_token x source tokens` lets every reference through, and
which repetition settings never stop a human translation.

    python bench/decoding_limits.py --gguf MODEL.gguf          # token counts in that GGUF's vocabulary
    python bench/decoding_limits.py --tokenizer MODEL_DIR       # ... in a transformers tokenizer
    python bench/decoding_limits.py --tokenizer gpt-oss         # ... in o200k_harmony (toolkit.tokenizer)
    python bench/decoding_limits.py --gguf M.gguf --predictions EVAL_DIR...   # and what the stop does to outputs

Pairs: the news set (../shared/eval/zh-nan.heldout.tsv, all 2,000), the MOE dev split and the MOE training
split (../shared/corpora/zh-nan-moe), both directions. Limits: for each (a, b), the references longer than
a + b x source tokens (the reply's own end tokens are part of `a`: 1 for Gemma's <end_of_turn>, about 5 for
Harmony's `<|channel|>final<|message|>...<|return|>`). Repetition: for each setting, the references it would
cut (every cut of a reference is a false stop). With `--predictions`, the eval outputs it would cut and the
chrF of those outputs before and after the cut (the outputs are re-tokenized from their raw text).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
CORPORA = {"news": SHARED / "eval" / "zh-nan.heldout.tsv", "moe-dev": SHARED / "corpora" / "zh-nan-moe" / "dev.tsv",
           "moe-train": SHARED / "corpora" / "zh-nan-moe" / "train.tsv"}
BASES, RATIOS = (8, 12, 16, 24, 32), (1.0, 1.5, 2.0, 2.5, 3.0)
REPEATS = [(n, c, t) for n, c, t in itertools.product((8, 16, 32), (2, 3, 4), (8, 12, 16))]


def tokenizer(args: argparse.Namespace):
    """text -> token ids, in the vocabulary asked for."""
    if args.gguf:
        from llama_cpp import Llama

        llm = Llama(model_path=str(args.gguf), vocab_only=True, verbose=False)
        return lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
    if args.tokenizer == "gpt-oss":
        from toolkit.tokenizer import tiktoken_encoding

        enc = tiktoken_encoding()
        return enc.encode_ordinary
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    return lambda t: tok(t, add_special_tokens=False)["input_ids"]


def pairs(path: Path, limit: int) -> list[tuple[str, str]]:
    from toolkit.evaluate import read_test_set

    test = read_test_set(path, "zh", "nan", "forward", limit)
    return list(zip(test.sources, test.references, strict=True))


def limits_table(lengths: list[tuple[int, int]]) -> dict[str, Any]:
    over = {f"{a}+{b:g}x": sum(ref > a + math.ceil(b * src) for src, ref in lengths) for a in BASES for b in RATIOS}
    ratios = sorted(ref / max(1, src) for src, ref in lengths)
    pick = [ratios[min(len(ratios) - 1, int(q * len(ratios)))] for q in (0.5, 0.9, 0.99, 0.999)]
    return {"pairs": len(lengths), "over_limit": over, "ratio_p50_p90_p99_p999": [round(r, 2) for r in pick],
            "longest_reference": max(ref for _, ref in lengths), "longest_source": max(src for src, _ in lengths)}


def false_stops(sequences: list[list[int]]) -> dict[str, int]:
    from toolkit.decoding import RepeatStop, trim

    return {f"ngram{n} copies{c} tokens{t}": sum(trim(ids, RepeatStop(n, c, t))[1] for ids in sequences)
            for n, c, t in REPEATS}


def predictions_effect(folders: list[Path], encode, decode_ids) -> dict[str, Any]:
    from toolkit import metrics
    from toolkit.decoding import RepeatStop, trim

    out = {}
    for folder in folders:
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        refs = [r["reference"] for r in rows]
        before = [r["hypothesis"] for r in rows]
        per = {}
        for n, c, t in REPEATS:
            after, cut = [], 0
            for r in rows:
                ids, looped = trim(encode(r["hypothesis"]), RepeatStop(n, c, t))
                after.append(decode_ids(ids) if looped else r["hypothesis"])
                cut += looped
            per[f"ngram{n} copies{c} tokens{t}"] = {
                "cut": cut, "chrf_after": round(metrics.score(after, refs, n_bootstrap=1, keys=("chrf",))["chrf"]["score"], 2)}
        out[str(folder)] = {"rows": len(rows), "chrf_before": round(metrics.score(before, refs, n_bootstrap=1,
                                                                                  keys=("chrf",))["chrf"]["score"], 2),
                            "settings": per}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--gguf", type=Path)
    what.add_argument("--tokenizer", help="a transformers tokenizer folder, or gpt-oss")
    ap.add_argument("--train-limit", type=int, default=20000, help="MOE training pairs used (0 = all)")
    ap.add_argument("--predictions", type=Path, nargs="*", default=[], help="eval folders (predictions.jsonl)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    encode = tokenizer(args)
    results: dict[str, Any] = {"tokenizer": str(args.gguf or args.tokenizer), "limits": {}, "false_stops": {}}
    references: list[list[int]] = []
    for name, path in CORPORA.items():
        if not path.is_file():
            continue
        data = pairs(path, args.train_limit if name == "moe-train" else 0)
        ids = [(encode(zh), encode(nan)) for zh, nan in data]
        references += [z for z, _ in ids] + [n for _, n in ids]
        for direction, lengths in (("forward", [(len(z), len(n)) for z, n in ids]),
                                   ("reverse", [(len(n), len(z)) for z, n in ids])):
            results["limits"][f"{name} {direction}"] = table = limits_table(lengths)
            print(f"{name} {direction}: {table['pairs']} pairs, reference/source token ratio p50/p90/p99/p99.9 "
                  f"{table['ratio_p50_p90_p99_p999']}, longest source {table['longest_source']}, references over "
                  "a+b*src: " + ", ".join(f"{k} {v}" for k, v in table["over_limit"].items() if k.endswith(
                      ("+1.5x", "+2x", "+2.5x"))), flush=True)
    results["false_stops"] = stops = false_stops(references)
    print(f"repetition stops on {len(references):,} human sentences (every one is a false stop): "
          + ", ".join(f"{k} {v}" for k, v in stops.items()))
    if args.predictions:
        if args.gguf:
            from llama_cpp import Llama

            llm = Llama(model_path=str(args.gguf), vocab_only=True, verbose=False)
            def decode_ids(ids):
                return llm.detokenize(ids).decode("utf-8", "replace")
        elif args.tokenizer == "gpt-oss":
            from toolkit.tokenizer import tiktoken_encoding

            decode_ids = tiktoken_encoding().decode
        else:
            from transformers import AutoTokenizer

            decode_ids = AutoTokenizer.from_pretrained(args.tokenizer).decode
        results["predictions"] = effect = predictions_effect(args.predictions, encode, decode_ids)
        for folder, e in effect.items():
            print(f"{folder}: {e['rows']} outputs, chrF {e['chrf_before']}; cut / chrF after: "
                  + ", ".join(f"{k} {v['cut']}/{v['chrf_after']}" for k, v in e["settings"].items()))
    if args.out:
        from toolkit.artifacts import atomic_write_json

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "decoding_limits.json", results)
    return results


if __name__ == "__main__":
    main()
