"""Scores for `toolkit eval`: sacrebleu metrics with their signatures, the copy-source baseline,
bootstrap confidence intervals, paired significance between two systems, and the share of analysis
texts written in the requested reasoning language.

Han text has no spaces, so BLEU uses sacrebleu's `zh` tokenizer; its CJK ranges stop before
Extension B (common in Taigi: 𪜶), so a character-level BLEU (`char`) is reported beside it. TER is
normalized with Asian support, else a sentence without spaces would be a single "word".
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sacrebleu
from sacrebleu.metrics.base import Metric

from toolkit.logs import logger_level

N_BOOTSTRAP = 1000
SEED = 12345  # sacrebleu's default SACREBLEU_SEED: our numbers match its CLI


@dataclass(frozen=True)
class MetricDef:
    key: str  # our name in scores.json
    label: str  # column header in reports
    higher_is_better: bool
    make: Any  # () -> a fresh sacrebleu Metric


METRICS: tuple[MetricDef, ...] = (
    MetricDef("bleu", "BLEU (zh)", True, lambda: sacrebleu.BLEU(tokenize="zh")),
    MetricDef("bleu_char", "BLEU (char)", True, lambda: sacrebleu.BLEU(tokenize="char")),
    MetricDef("chrf", "chrF", True, lambda: sacrebleu.CHRF()),
    MetricDef("chrf_pp", "chrF++", True, lambda: sacrebleu.CHRF(word_order=2)),
    MetricDef("ter", "TER", False, lambda: sacrebleu.TER(normalized=True, asian_support=True)),
)
METRIC_KEYS = tuple(m.key for m in METRICS)
LABELS = {m.key: m.label for m in METRICS}


# Sentence statistics of recent (metric, hypotheses, references): a comparison scores each system, then tests
# it against the copy baseline and against the first system, and sacrebleu recomputes the statistics every
# time. TER's are slow on long, wrong outputs (a base model's 500 continuations: over 2 minutes), so each
# system's are computed once. sacrebleu does not modify the statistics it is given. The cached extractor is set on
# each metric object made here, never on sacrebleu's classes: other users of sacrebleu in the process are untouched.
_STATS_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_STATS_CACHE_SIZE = 64


def _metric(m: MetricDef) -> Metric:
    """A fresh sacrebleu metric of `m` whose sentence statistics come from `_STATS_CACHE` when known."""
    metric = m.make()
    extract = metric._extract_corpus_statistics

    def cached(hypotheses: Sequence[str], references: Sequence[Sequence[str]] | None) -> Any:
        if references is None:  # references cached in the metric object: not ours to key on
            return extract(hypotheses, references)
        key = (m.key, tuple(hypotheses), tuple(tuple(r) for r in references))
        if key in _STATS_CACHE:
            _STATS_CACHE.move_to_end(key)
            stats, metric.num_refs = _STATS_CACHE[key]  # what extracting sets on the metric (its signature)
            return stats
        stats = extract(hypotheses, references)
        _STATS_CACHE[key] = (stats, metric.num_refs)
        if len(_STATS_CACHE) > _STATS_CACHE_SIZE:
            _STATS_CACHE.popitem(last=False)
        return stats

    metric._extract_corpus_statistics = cached
    return metric


@contextmanager
def _sacrebleu_settings() -> Iterator[None]:
    """sacrebleu's bootstrap seed pinned and its INFO log quiet for one call; both restored after.

    sacrebleu reads the seed from the environment (a user's own SACREBLEU_SEED wins), and PairedTest logs every
    step at INFO, which the CLI shows by default.
    """
    pinned = "SACREBLEU_SEED" not in os.environ
    if pinned:
        os.environ["SACREBLEU_SEED"] = str(SEED)
    try:
        with logger_level("sacrebleu", logging.WARNING):
            yield
    finally:
        if pinned:
            os.environ.pop("SACREBLEU_SEED", None)


def score(hypotheses: Sequence[str], references: Sequence[str], *, n_bootstrap: int = N_BOOTSTRAP,
          keys: Sequence[str] = METRIC_KEYS) -> dict[str, Any]:
    """Each metric (`keys`) of one system: score, bootstrap mean and 95% half-interval, sacrebleu signature."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    out: dict[str, Any] = {}
    with _sacrebleu_settings():
        for m in (m for m in METRICS if m.key in keys):
            metric = _metric(m)
            mean, ci, value = _corpus_score(metric, list(hypotheses), [list(references)], n_bootstrap)
            out[m.key] = {"score": value, "mean": mean, "ci": ci, "signature": str(metric.get_signature())}
    return out


def _corpus_score(metric: Metric, hyps: list[str], refs: list[list[str]], n_bootstrap: int):
    """`metric.corpus_score(hyps, refs, n_bootstrap)` -> (mean, ci, score), the same numbers and signature.

    sacrebleu 2.6.0's `Score.estimate_ci` calls `statistics.mean` on a mix of float and numpy float32
    scores (a resample whose BLEU is 0 is a plain float) and raises TypeError; this takes the mean and
    interval the same way (sorted scores, 1/40 from each end) after converting to float.
    """
    stats = metric._extract_corpus_statistics(hyps, refs)
    value = float(metric._aggregate_and_compute(stats).score)
    if n_bootstrap <= 1:
        return None, None, value
    from sacrebleu.significance import _bootstrap_resample

    metric.n_bootstrap = n_bootstrap  # recorded in the signature, as corpus_score does
    metric.seed, resampled = _bootstrap_resample(stats, metric, n_bootstrap)
    raw = sorted(float(s.score) for s in resampled)
    low = len(raw) // 40
    return statistics.mean(raw), 0.5 * (raw[len(raw) - low - 1] - raw[low]), value


def copy_hypotheses(sources: Sequence[str]) -> list[str]:
    """The copy-source baseline: the untranslated source as the hypothesis.

    Mandarin and Taigi Han text share most characters, so copying scores high; a model that does not
    beat it has learned nothing useful.
    """
    return list(sources)


def paired(
    baseline: Sequence[str],
    system: Sequence[str],
    references: Sequence[str],
    *,
    n_samples: int = N_BOOTSTRAP,
) -> dict[str, Any]:
    """Paired bootstrap resampling (sacrebleu's, as `sacrebleu --paired-bs`) of `system` against `baseline`.

    Per metric: both scores, the difference, the p-value (chance of a difference this large under the
    null hypothesis), and the system's bootstrap mean and 95% half-interval.
    """
    return paired_many(baseline, {"system": system}, references, n_samples=n_samples)["system"]


def paired_many(
    baseline: Sequence[str],
    systems: Mapping[str, Sequence[str]],
    references: Sequence[str],
    *,
    n_samples: int = N_BOOTSTRAP,
) -> dict[str, dict[str, Any]]:
    """`paired` for several systems against one baseline, with the same numbers: one sacrebleu test per metric,
    so the baseline's sentence statistics (TER's are slow) are computed once, not once per system."""
    from sacrebleu.significance import PairedTest

    names = list(systems)
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    if not names:
        return out
    named = [("baseline", list(baseline))] + [(f"system-{i}", list(systems[n])) for i, n in enumerate(names)]
    with _sacrebleu_settings():
        for m in METRICS:
            # One metric per test: PairedTest keys results by score name, and both BLEUs are "BLEU".
            metrics: dict[str, Metric] = {m.key: _metric(m)}
            test = PairedTest(named, metrics, [list(references)], test_type="bs", n_samples=n_samples)
            signatures, results = test()
            (score_name,) = [k for k in results if k != "System"]
            base, *per_system = results[score_name]
            for name, sys_result in zip(names, per_system, strict=True):
                delta = float(sys_result.score - base.score)
                # sacrebleu counts resampled differences strictly greater than the observed one, so two
                # systems with identical scores get p = 1/(n+1), "significant"; no observed difference is p = 1.
                p_value = 1.0 if delta == 0 else float(sys_result.p_value)
                out[name][m.key] = {
                    "baseline": float(base.score),
                    "system": float(sys_result.score),
                    "delta": delta,
                    "p_value": p_value,
                    "mean": float(sys_result.mean),
                    "ci": float(sys_result.ci),
                    "signature": str(signatures[score_name]),
                }
    return out


# ---- reasoning-language compliance -------------------------------------------------------------

# Language name (lower case, as written in `reasoning language: X`) -> scripts its text is written in.
_LATIN = ("english", "french", "german", "spanish", "italian", "portuguese", "dutch", "swedish", "norwegian",
          "danish", "finnish", "polish", "czech", "turkish", "indonesian", "malay", "vietnamese", "tagalog",
          "romanian", "hungarian", "taiwanese romanization", "tâi-lô", "pe̍h-ōe-jī")
SCRIPTS: dict[str, frozenset[str]] = {
    **{name: frozenset({"LATIN"}) for name in _LATIN},
    **{name: frozenset({"CJK"}) for name in ("chinese", "mandarin", "mandarin chinese", "cantonese",
                                             "taiwanese", "taiwanese hokkien", "hokkien", "taigi")},
    "japanese": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "korean": frozenset({"HANGUL"}),
    "russian": frozenset({"CYRILLIC"}),
    "ukrainian": frozenset({"CYRILLIC"}),
    "greek": frozenset({"GREEK"}),
    "arabic": frozenset({"ARABIC"}),
    "hebrew": frozenset({"HEBREW"}),
    "hindi": frozenset({"DEVANAGARI"}),
    "thai": frozenset({"THAI"}),
}


def scripts_for(language: str) -> frozenset[str] | None:
    """The scripts of a reasoning language, or None when we have no check for it.

    `Chinese (Traditional)` and `Mandarin Chinese` are looked up by their first matching word too.
    """
    name = language.strip().lower()
    if name in SCRIPTS:
        return SCRIPTS[name]
    for word in name.replace("(", " ").replace(")", " ").split():
        if word in SCRIPTS:
            return SCRIPTS[word]
    return None


def dominant_script(text: str) -> str | None:
    """The Unicode script (first word of the character name: LATIN, CJK, HANGUL...) of most letters."""
    counts: Counter[str] = Counter()
    for ch in text:
        if ch.isalpha():
            counts[unicodedata.name(ch, "UNKNOWN").split()[0]] += 1
    return counts.most_common(1)[0][0] if counts else None


def in_language(text: str, language: str) -> bool | None:
    """Whether `text` is mostly written in the script of `language` (None: language or text not checkable)."""
    scripts = scripts_for(language)
    script = dominant_script(text)
    if scripts is None or script is None:
        return None
    return script in scripts


# `東西 → 物件`: a term pair quoted verbatim in an analysis (toolkit.glossary); its script says nothing about the
# language the analysis is written in.
_TERM_PAIR = re.compile(r"[^\s;；:：,，]+\s*→\s*[^\s;；。,，]+")


def reasoning_compliance(analyses: Sequence[str | None], language: str) -> dict[str, Any]:
    """Share of non-empty analysis texts written in `language` (a script check, not language ID). Quoted term
    pairs (`東西 → 物件`, as a glossary analysis writes them) are left out of the check."""
    checked = compliant = 0
    for text in analyses:
        if not text:
            continue
        verdict = in_language(_TERM_PAIR.sub(" ", text), language)
        if verdict is None:
            continue
        checked += 1
        compliant += verdict
    return {
        "language": language,
        "checkable": scripts_for(language) is not None,
        "with_analysis": sum(1 for t in analyses if t),
        "checked": checked,
        "compliant": compliant,
        "share": compliant / checked if checked else None,
    }
