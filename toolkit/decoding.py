"""How long each translation may run and when a looping one stops: shared by every backend of eval and serve.

A fixed token cap is wrong for sentences of every length: too short for a long sentence (its output is cut
off), far too long for a short one that loops (`遮跤，遮厝，遮跤…` until the cap). `Decoding.limit` gives each
sentence `base_tokens + tokens_per_source_token × its source tokens`, plus `analysis_tokens` for a model
that writes an analysis channel first (Harmony: gpt-oss), capped by `max_new_tokens` and by the room left in
the context window. `RepeatStop` ends an output whose last tokens are the same n-gram repeated, and the
repeats are cut: what stays is the text before the loop and one copy of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Why a generation ended: its stop token, its token limit, or a repetition loop.
END, LENGTH, REPETITION = "end", "length", "repetition"


@dataclass(frozen=True)
class RepeatStop:
    """A loop: the last `min_copies` or more copies of one n-gram (n <= max_ngram) that span >= min_tokens.

    `min_tokens` keeps legitimate short repeats (the digits of 1,000,000, 哈哈哈) out: a 1-token repeat must
    occur `min_tokens` times, a 6-token one 3 times. `max_ngram` 0 turns the stop off. The defaults stop none
    of 28,992 human sentences (news and MOE, both languages, Gemma and gpt-oss tokens; two copies would stop
    19): bench/decoding_limits.py.
    """

    max_ngram: int = 16
    min_copies: int = 3
    min_tokens: int = 16

    def copies_needed(self, n: int) -> int:
        return max(self.min_copies, math.ceil(self.min_tokens / n))

    def cut(self, ids: Sequence[Any]) -> int | None:
        """Where to cut `ids` when they end in a loop (the length that keeps one copy), else None.

        Called after every new token, so only loops that end at the last token are looked for; the first
        test (the last token equals the one n before it) rejects almost every n at once.
        """
        if not self.max_ngram:
            return None
        size = len(ids)
        for n in range(1, min(self.max_ngram, size // 2) + 1):
            if ids[-1] != ids[-1 - n]:
                continue
            copies = self.copies_needed(n)
            span = n * copies
            if span > size:
                continue
            tail = ids[size - span:]
            if all(tail[i] == tail[i - n] for i in range(n, span)):
                return size - span + n
        return None


@dataclass(frozen=True)
class Decoding:
    """The per-sentence token limit and the repetition stop of a backend (see the module docstring)."""

    base_tokens: int = 24
    tokens_per_source_token: float = 2.0  # 0: every sentence gets max_new_tokens (the old fixed cap)
    analysis_tokens: int = 192
    repeat: RepeatStop = RepeatStop()

    def limit(self, source_tokens: int, cap: int, *, analysis: bool = False, room: int | None = None) -> int:
        """Tokens sentence may generate: its own limit, at most `cap` and the `room` left in the context."""
        if self.tokens_per_source_token:
            own = self.base_tokens + math.ceil(self.tokens_per_source_token * source_tokens)
            own += self.analysis_tokens if analysis else 0
            cap = min(cap, own)
        return max(1, min(cap, room) if room is not None else cap)


def from_config(cfg: Any) -> Decoding:
    """The Decoding of an eval or serve config (their fields of the same names)."""
    return Decoding(base_tokens=cfg.base_tokens, tokens_per_source_token=cfg.tokens_per_source_token,
                    analysis_tokens=cfg.analysis_tokens,
                    repeat=RepeatStop(cfg.repeat_max_ngram, cfg.repeat_min_copies, cfg.repeat_min_tokens))


def trim(ids: list[Any], repeat: RepeatStop) -> tuple[list[Any], bool]:
    """`ids` cut at the first loop found scanning left to right (for backends that see the output only at the
    end, such as Ollama), and whether one was found."""
    for end in range(2, len(ids) + 1):
        cut = repeat.cut(ids[:end])
        if cut is not None:
            return ids[:cut], True
    return ids, False
