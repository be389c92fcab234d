"""Benchmark: `copy_bias` per direction and per domain, for one GGUF through llama.cpp (issue 24).

    python bench/copy_bias_domains.py --gguf RUN/export/MODEL-Q4_K_M.gguf [--biases 0,0.5,1,1.5,2,3]
        [--directions forward,reverse] [--limit N] [--n-threads 2] [--old-cap 96] [--out DIR]

Domains: `news`, the tuning slice of the news set (data lines 1001-1200 of ../shared/eval/zh-nan.heldout.tsv,
disjoint from the 500 the README reports), and `moe`, the MOE dictionary's dev split
(../shared/corpora/zh-nan-moe/dev.tsv: short colloquial sentences, the training domain). Every sentence is
decoded once per bias (greedy, the toolkit's per-sentence limits and repetition stop), then for each
direction and domain: chrF and BLEU with 95% bootstrap intervals, the copy-source baseline, outputs at
their token limit and cut for repeating, the paired test of each bias against 0, and the bias with the best
chrF. Then rules that pick a bias per sentence from its source alone (the news bias above a threshold, the
MOE bias below it), by source length in characters and by the share of the source covered by lexicon
words (../shared/lexicons: MOE dialect-difference entries and iTaigi; a text full of words Taigi says
otherwise needs translating, not copying), each threshold scored on both domains together. The thresholds
are chosen on the same sentences they are scored on: a rule that wins here still needs a held-out check.
Tables go to stdout, everything to OUT/copy_bias_domains.json.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
NEWS = SHARED / "eval" / "zh-nan.heldout.tsv"
MOE_DEV = SHARED / "corpora" / "zh-nan-moe" / "dev.tsv"
DIALECT = SHARED / "lexicons" / "moe-dialect-words" / "詞彙方言差.csv"
ITAIGI = SHARED / "lexicons" / "itaigi" / "ChhoeTaigi_iTaigiHoataiTuichiautian.csv"
TUNE_FROM, TUNE_N = 1000, 200  # data lines 1001-1200


def domains(args: argparse.Namespace, direction: str) -> dict[str, tuple[list[str], list[str]]]:
    """{domain: (sources, references)} of one direction."""
    from toolkit.evaluate import read_test_set

    news = read_test_set(args.news, "zh", "nan", direction)
    moe = read_test_set(args.moe, "zh", "nan", direction)
    out = {"news": (news.sources[TUNE_FROM:TUNE_FROM + TUNE_N], news.references[TUNE_FROM:TUNE_FROM + TUNE_N]),
           "moe": (moe.sources, moe.references)}
    if args.limit:
        out = {k: (s[:args.limit], r[:args.limit]) for k, (s, r) in out.items()}
    return out


def lexicon_words(side: str) -> set[str]:
    """Lexicon entries (2+ characters) in Mandarin (`zh`) or in Taigi Han characters (`nan`)."""
    words: set[str] = set()
    if side == "zh" and DIALECT.is_file():
        with DIALECT.open(encoding="utf-8-sig", newline="") as fh:
            words |= {row["詞目"].strip() for row in csv.DictReader(fh)}
    if ITAIGI.is_file():
        column = "HoaBun" if side == "zh" else "HanLoTaibunKip"
        with ITAIGI.open(encoding="utf-8-sig", newline="") as fh:
            for row in csv.DictReader(fh):
                words |= {w.strip() for w in (row.get(column) or "").replace("，", ",").split(",")}
    return {w for w in words if len(w) >= 2}


def coverage(text: str, words: set[str], longest: int = 6) -> float:
    """Share of `text`'s characters inside lexicon words (greedy longest match, left to right)."""
    covered, i = 0, 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 1, -1):
            if text[i:i + n] in words:
                covered += n
                i += n
                break
        else:
            i += 1
    return covered / max(1, len(text))


def decode_all(translator: Any, spec: Any, sources: list[str], bias: float, max_new_tokens: int) -> list[Any]:
    translator.copy_bias = bias
    return translator.translate(sources, spec, max_new_tokens=max_new_tokens)


def decode_before(args: argparse.Namespace, translator: Any, spec: Any, sources: list[str], refs: list[str],
                  after: list[str] | None) -> dict[str, Any]:
    """Bias 0 decoded as before issue 24 (a fixed cap of --old-cap tokens, no repetition stop), scored, and
    the paired test of the current decoding's bias-0 outputs against it."""
    from toolkit import metrics
    from toolkit.decoding import Decoding, RepeatStop

    now = translator.decoding
    translator.decoding = Decoding(tokens_per_source_token=0, repeat=RepeatStop(0))
    started = time.perf_counter()
    try:
        done = decode_all(translator, spec, sources, 0.0, args.old_cap)
    finally:
        translator.decoding = now
    hyps = [t.text for t in done]
    block = {**score_block(hyps, refs, args.n_bootstrap), "cap": args.old_cap, **stop_counts(done),
             "seconds": round(time.perf_counter() - started, 1)}
    if after is not None and args.n_bootstrap > 1:
        paired = metrics.paired_many(hyps, {"after": after}, refs, n_samples=args.n_bootstrap)["after"]
        block["after_vs_before"] = paired_summary(paired)
    return block


def stop_counts(done: list[Any]) -> dict[str, int]:
    return {"hit_limit": sum(t.stop == "length" for t in done),
            "stopped_repetition": sum(t.stop == "repetition" for t in done)}


def paired_summary(per_metric: dict[str, Any]) -> dict[str, Any]:
    return {k: {"delta": round(per_metric[k]["delta"], 2), "p": round(per_metric[k]["p_value"], 4)}
            for k in ("chrf", "bleu")}


def score_block(hyps: list[str], refs: list[str], n_bootstrap: int) -> dict[str, Any]:
    from toolkit import metrics

    scores = metrics.score(hyps, refs, n_bootstrap=n_bootstrap, keys=("bleu", "chrf"))
    return {k: {"score": round(scores[k]["score"], 2), "ci": scores[k]["ci"] and round(scores[k]["ci"], 2)}
            for k in ("chrf", "bleu")}


def cell(s: dict[str, Any]) -> str:
    return f"{s['score']:.1f}" + (f" ± {s['ci']:.1f}" if s.get("ci") is not None else "")


def run_direction(args: argparse.Namespace, translator: Any, direction: str) -> dict[str, Any]:
    from toolkit import backends, metrics

    spec = backends.spec_for("llama-cpp", args.gguf).for_direction(direction)
    biases = [float(b) for b in args.biases.split(",")]
    result: dict[str, Any] = {"domains": {}}
    outputs: dict[str, dict[float, list[str]]] = {}
    data = domains(args, direction)
    for domain, (sources, refs) in data.items():
        block: dict[str, Any] = {"sentences": len(sources),
                                 "copy": score_block(metrics.copy_hypotheses(sources), refs, args.n_bootstrap),
                                 "biases": {}}
        outputs[domain] = {}
        for bias in biases:
            started = time.perf_counter()
            done = decode_all(translator, spec, sources, bias, args.max_new_tokens)
            hyps = [t.text for t in done]
            outputs[domain][bias] = hyps
            block["biases"][str(bias)] = {**score_block(hyps, refs, args.n_bootstrap),
                                          **stop_counts(done),
                                          "seconds": round(time.perf_counter() - started, 1)}
            print(f"  {direction} {domain} bias {bias:g}: chrF {block['biases'][str(bias)]['chrf']['score']:.1f}",
                  file=sys.stderr, flush=True)
        if args.n_bootstrap > 1 and len(biases) > 1:
            paired = metrics.paired_many(outputs[domain][biases[0]], {str(b): outputs[domain][b] for b in biases[1:]},
                                         refs, n_samples=args.n_bootstrap)
            for b, per_metric in paired.items():
                block["biases"][b]["vs_first"] = paired_summary(per_metric)
        if args.old_cap:  # issue 24's "before": one fixed cap for every sentence, no repetition stop, bias 0
            block["before"] = decode_before(args, translator, spec, sources, refs, outputs[domain].get(0.0))
            print(f"  {direction} {domain} before (cap {args.old_cap}): chrF {block['before']['chrf']['score']:.1f}",
                  file=sys.stderr, flush=True)
        block["best_bias"] = max(biases, key=lambda b: block["biases"][str(b)]["chrf"]["score"])
        result["domains"][domain] = block
    result["rules"] = rules(data, outputs, result, direction, args.n_bootstrap)
    return result


def rules(data, outputs, result, direction: str, n_bootstrap: int) -> list[dict[str, Any]]:
    """Per-sentence choice between the news bias and the MOE bias, scored on both domains together."""
    high = result["domains"]["news"]["best_bias"]
    low = result["domains"]["moe"]["best_bias"]
    words = lexicon_words("zh" if direction == "forward" else "nan")
    rows = [(src, ref, domain, i) for domain, (sources, refs) in data.items()
            for i, (src, ref) in enumerate(zip(sources, refs, strict=True))]
    refs = [r for _, r, _, _ in rows]

    def score_choice(pick) -> dict[str, Any]:
        hyps = [outputs[d][high if pick(src) else low][i] for src, _, d, i in rows]
        return score_block(hyps, refs, n_bootstrap)

    out = [{"rule": f"one bias {b:g} for all", **score_choice(lambda _s, b=b: b == high)} for b in sorted({low, high})]
    if low == high:
        return out
    for chars in (8, 12, 16, 20, 25, 30):
        out.append({"rule": f"news bias {high:g} when the source has >= {chars} chars, else {low:g}",
                    **score_choice(lambda s, c=chars: len(s) >= c)})
    if words:
        for share in (0.2, 0.35, 0.5):
            out.append({"rule": f"MOE bias {low:g} when lexicon words cover >= {share:.0%} of the source, else "
                                f"{high:g}", **score_choice(lambda s, c=share: coverage(s, words) < c)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--biases", default="0,0.5,1,1.5,2,3")
    ap.add_argument("--directions", default="forward,reverse")
    ap.add_argument("--news", type=Path, default=NEWS)
    ap.add_argument("--moe", type=Path, default=MOE_DEV)
    ap.add_argument("--limit", type=int, default=0, help="first N sentences of each domain (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--old-cap", type=int, default=0,
                    help="also decode bias 0 as before issue 24: this fixed cap for all, no repetition stop")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from toolkit import backends

    translator = backends.load_translator("llama-cpp", args.gguf, n_threads=args.n_threads, n_ctx=args.n_ctx)
    results = {"gguf": str(args.gguf), "biases": args.biases, "limit": args.limit, "directions": {}}
    for direction in args.directions.split(","):
        res = run_direction(args, translator, direction)
        results["directions"][direction] = res
        for domain, block in res["domains"].items():
            print(f"\n{direction}, {domain} ({block['sentences']} sentences): copy chrF {cell(block['copy']['chrf'])}, "
                  f"BLEU {cell(block['copy']['bleu'])}; best bias {block['best_bias']:g}\n\n"
                  "| bias | chrF | BLEU | vs bias 0: chrF (p) | hit limit | loop cut |\n|---|---|---|---|---|---|")
            if "before" in block:
                b = block["before"]
                vs = b.get("after_vs_before", {}).get("chrf")
                versus = "" if vs is None else f"bias 0 now {vs['delta']:+.1f} ({vs['p']:.3f})"
                print(f"| 0, before (cap {b['cap']}, no stop) | {cell(b['chrf'])} | {cell(b['bleu'])} | {versus} | "
                      f"{b['hit_limit']} | – |")
            for bias, b in block["biases"].items():
                vs = b.get("vs_first", {}).get("chrf")
                versus = "" if vs is None else f"{vs['delta']:+.1f} ({vs['p']:.3f})"
                print(f"| {bias} | {cell(b['chrf'])} | {cell(b['bleu'])} | {versus} | {b['hit_limit']} | "
                      f"{b['stopped_repetition']} |")
        print(f"\n{direction}, rules on both domains together:\n\n| rule | chrF | BLEU |\n|---|---|---|")
        for r in res["rules"]:
            print(f"| {r['rule']} | {cell(r['chrf'])} | {cell(r['bleu'])} |")
    if args.out:
        from toolkit.artifacts import atomic_write_json

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "copy_bias_domains.json", results)
    return results


if __name__ == "__main__":
    main()
