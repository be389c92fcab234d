"""Two variants of `copy_bias` tried for issue 10 (Mandarin -> Taigi), kept so their numbers can be reproduced.

Neither beat the plain bias on the tuning slice, so neither is a toolkit option
(bench/results/gemma3-270m-sweep-2026-11-25.md):

- `weighted`: the bonus of each source token scaled by how often the training corpus keeps its characters
  (a character of a Mandarin sentence that reappears in its Taigi translation: 是 74%, 的 58%, 他 0%, 在 7%),
  smoothed with `alpha` pseudo-counts so that characters the corpus never shows get the full bonus.
- `window`: the plain bonus on every source token plus `window_bias` on the next `window` source tokens after
  the last one the output has followed (a monotonic pointer), to discourage skipping clauses.

    python bench/decoding_variants.py MODEL.gguf TEST.tsv --variant weighted --bias 2 --train-tsv TRAIN.tsv \
        --out DIR [--direction forward] [--limit N]

DIR is an ordinary `toolkit eval` folder (scores with intervals and the copy baseline, predictions).
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path
from typing import Any

from toolkit import evaluate
from toolkit.backends import LlamaCppTranslator, source_token_ids, spec_for
from toolkit.config import EvalConfig

LOOKAHEAD = 12  # how far past the pointer an output token may match the source (window variant)


def keep_rates(train_tsv: Path, source_column: str, target_column: str) -> tuple[Counter, Counter]:
    """Per source character: in how many training pairs it occurs, and in how many the target has it too."""
    seen: Counter = Counter()
    kept: Counter = Counter()
    with open(train_tsv, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            source, target = row[source_column], row[target_column]
            for ch in set(source):
                seen[ch] += 1
                kept[ch] += ch in target
    return seen, kept


class WeightedCopy(LlamaCppTranslator):
    def __init__(self, target: str, *, rates: tuple[Counter, Counter], alpha: float, **kw: Any) -> None:
        super().__init__(target, **kw)
        self.seen, self.kept = rates
        self.alpha = alpha

    def weight(self, token: int) -> float:
        chars = [c for c in self.llm.detokenize([token]).decode("utf-8", "ignore") if not c.isspace()]
        if not chars:
            return 1.0
        return sum((self.kept[c] + self.alpha) / (self.seen[c] + self.alpha) for c in chars) / len(chars)

    def logits_processors(self, text: str, n_prompt: int) -> list[Any] | None:
        ids = source_token_ids(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        bonus = [self.copy_bias * self.weight(i) for i in ids]

        def favour(_input_ids: Any, scores: Any) -> Any:
            scores[ids] += bonus
            return scores

        return [favour]


class WindowCopy(LlamaCppTranslator):
    def __init__(self, target: str, *, window: int, window_bias: float, **kw: Any) -> None:
        super().__init__(target, **kw)
        self.window, self.window_bias = window, window_bias

    def logits_processors(self, text: str, n_prompt: int) -> list[Any] | None:
        source = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        every = source_token_ids(source)

        def favour(input_ids: Any, scores: Any) -> Any:
            pointer = 0
            for tok in list(input_ids[n_prompt:]):
                for j in range(pointer, min(len(source), pointer + LOOKAHEAD)):
                    if source[j] == tok:
                        pointer = j + 1
                        break
            if self.copy_bias:
                scores[every] += self.copy_bias
            ahead = sorted(set(source[pointer:pointer + self.window]))
            if ahead:
                scores[ahead] += self.window_bias
            return scores

        return [favour]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a GGUF exported by `toolkit export` (its manifest gives the prompt)")
    ap.add_argument("test", type=Path)
    ap.add_argument("--variant", choices=("weighted", "window"), required=True)
    ap.add_argument("--bias", type=float, default=2.0, help="the copy_bias (weighted: before weighting)")
    ap.add_argument("--train-tsv", type=Path, help="weighted: the training corpus the keep rates come from")
    ap.add_argument("--alpha", type=float, default=1.0, help="weighted: pseudo-counts of 'kept'")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--window-bias", type=float, default=1.0)
    ap.add_argument("--direction", default="forward", choices=("forward", "reverse"))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    # model=None: the scores then carry the translator's name, which says the variant and its settings
    cfg = EvalConfig(backend="llama-cpp", model=None, direction=args.direction, limit=args.limit,
                     max_new_tokens=128, n_threads=args.n_threads)
    common = {"n_threads": args.n_threads, "copy_bias": args.bias}
    if args.variant == "weighted":
        if args.train_tsv is None:
            ap.error("--variant weighted needs --train-tsv")
        columns = ("zh", "nan") if args.direction == "forward" else ("nan", "zh")
        translator: LlamaCppTranslator = WeightedCopy(args.model, rates=keep_rates(args.train_tsv, *columns),
                                                      alpha=args.alpha, **common)
        translator.name = f"{Path(args.model).name} (weighted copy_bias {args.bias:g}, alpha {args.alpha:g})"
    else:
        translator = WindowCopy(args.model, window=args.window, window_bias=args.window_bias, **common)
        translator.name = (f"{Path(args.model).name} (copy_bias {args.bias:g} + {args.window_bias:g} on the next "
                           f"{args.window} source tokens)")
    evaluate.run(cfg, args.test, args.out, translator=translator, spec=spec_for("llama-cpp", args.model))
    print(args.out)


if __name__ == "__main__":
    main()
