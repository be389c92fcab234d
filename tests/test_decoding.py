"""toolkit.decoding: the per-sentence token limit and the repetition stop; their config checks."""

from __future__ import annotations

import pytest

from toolkit import config
from toolkit.decoding import Decoding, RepeatStop, from_config, trim
from toolkit.errors import ConfigError


def test_limit_grows_with_the_source_and_is_capped():
    d = Decoding(base_tokens=16, tokens_per_source_token=2.0, analysis_tokens=100)
    assert d.limit(10, 256) == 36
    assert d.limit(10, 256, analysis=True) == 136  # room for a Harmony model's analysis channel
    assert d.limit(200, 256) == 256  # the configured maximum
    assert d.limit(10, 256, room=20) == 20  # what is left of the context window
    assert d.limit(3, 256, room=0) == 1
    assert Decoding(tokens_per_source_token=0).limit(3, 256) == 256  # off: the old fixed cap
    assert Decoding(base_tokens=0, tokens_per_source_token=1.5).limit(3, 99) == 5  # rounded up


@pytest.mark.parametrize(("ids", "cut"), [
    (list("abcabcabc"), None),  # 3 copies of 3 tokens span 9 < 12
    (list("abcdabcdabcd"), 4),  # 3 copies of 4 tokens: keep one copy
    (list("xyzabcdabcdabcd"), 7),  # the text before the loop stays
    (list("0") * 11, None),  # 10000000000: a 1-token repeat needs 12 copies
    (list("0") * 12, 1),
    (list("abababababab"), 2),  # 6 copies of 2 tokens
    (list("abcdabcdabce"), None),  # the last copy differs
    ([], None),
])
def test_repeat_stop_finds_loops_at_the_end(ids, cut):
    assert RepeatStop(max_ngram=16, min_copies=3, min_tokens=12).cut(ids) == cut


def test_repeat_stop_longest_ngram_and_off():
    loop = list("abcdefghij") * 3
    assert RepeatStop(max_ngram=16).cut(loop) == 10
    assert RepeatStop(max_ngram=8).cut(loop) is None  # a 10-token n-gram is longer than allowed
    assert RepeatStop(max_ngram=0).cut(list("a") * 50) is None


def test_trim_cuts_at_the_first_loop_from_the_left():
    text = list("我愛遮跤，遮厝，") + list("遮跤，遮厝，") * 4 + list("尾")
    ids, looped = trim(text, RepeatStop(max_ngram=16, min_copies=3, min_tokens=12))
    assert looped and "".join(ids) == "我愛遮跤，遮厝，"
    assert trim(list("一句無重複的話。"), RepeatStop()) == (list("一句無重複的話。"), False)


def test_eval_and_serve_share_the_decoding_fields():
    for section in ("eval", "serve"):
        cfg = config.build(section, None, [f"{section}.base_tokens=4", f"{section}.tokens_per_source_token=1.5",
                                           f"{section}.repeat_max_ngram=0"])
        d = from_config(cfg)
        assert (d.base_tokens, d.tokens_per_source_token, d.repeat.max_ngram) == (4, 1.5, 0)
    with pytest.raises(ConfigError) as err:
        config.build("serve", None, ["serve.tokens_per_source_token=-1", "serve.repeat_min_copies=1"])
    assert "serve.tokens_per_source_token: expected 0 or more" in str(err.value)
    assert "serve.repeat_min_copies: expected 2 or more" in str(err.value)
