"""bench/decoding_variants.py: the two copy_bias variants tried for issue 10, on the tiny GGUF."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import decoding_variants as dv

from toolkit.prompt import default_spec


def test_keep_rates_count_pairs_not_occurrences(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("zh\tnan\n他們的車\tin 的車\n他的的\t伊的\n我\t我\n", encoding="utf-8")
    seen, kept = dv.keep_rates(tsv, "zh", "nan")
    assert (seen["他"], kept["他"]) == (2, 0)
    assert (seen["的"], kept["的"]) == (2, 2)  # twice in one sentence counts once
    assert (seen["車"], kept["車"], seen["我"], kept["我"]) == (1, 1, 1, 1)
    assert seen["伊"] == 0  # target-only characters are not source characters


@pytest.mark.llama
def test_window_copy_follows_the_source_in_order(tiny_gguf):
    spec = default_spec()
    text = "今天天氣很好，我們出去走走吧。"
    # no bonus on the source as a set, a large one on the next source token only: the output is the source
    translator = dv.WindowCopy(str(tiny_gguf), window=1, window_bias=80.0, n_ctx=512, copy_bias=0.0)
    source = translator.llm.tokenize(text.encode(), add_bos=False, special=False)
    generate, seen = translator.llm.generate, []

    def spy(*args, **kwargs):
        for tok in generate(*args, **kwargs):
            seen.append(tok)
            yield tok

    translator.llm.generate = spy
    translator.translate([text], spec, max_new_tokens=len(source))
    assert seen == source


@pytest.mark.llama
def test_weighted_copy_gives_never_kept_characters_no_bonus(tiny_gguf, tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("zh\tnan\n他很好\t伊真好\n他來\t伊來\n", encoding="utf-8")
    translator = dv.WeightedCopy(str(tiny_gguf), rates=dv.keep_rates(tsv, "zh", "nan"), alpha=0.0, n_ctx=512,
                                 copy_bias=2.0)
    token = {translator.llm.detokenize([i]).decode("utf-8", "ignore"): i
             for i in translator.llm.tokenize("他好".encode(), add_bos=False, special=False)}
    assert set(token) == {"他", "好"}  # one token each in o200k
    assert translator.weight(token["他"]) == 0.0 and translator.weight(token["好"]) == 1.0
    (favour,) = translator.logits_processors("他好", n_prompt=0)
    import numpy as np

    scores = favour(np.zeros(1), np.zeros(translator.llm.n_vocab(), dtype=np.float32))
    assert scores[token["他"]] == 0.0 and scores[token["好"]] == 2.0
