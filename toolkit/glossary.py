"""Term lexicons (`--glossary FILE` of prep, eval and serve): read them, find their entries in sentences,
and write them as analysis text or as a prompt hint.

A glossary maps a source-language term to one or more target forms (`東西 → 物件`). It is read from:
- a TSV or CSV with a header naming its columns: the prep source and target columns (`zh`, `nan`) or
  `source` and `target`; one row per form, a term may have several rows;
- the iTaigi dictionary as ChhoeTaigi packages it (`HoaBun` → `HanLoTaibunKip`; `a/b` cells are two forms);
- the Ministry of Education's regional word table (`詞目` → the Han part of every place's `漢字　tâi-lô`
  items, the forms used in most places first). Both are read as they are, never rewritten.
The shipped lexicons are Mandarin → Taigi; with prep columns `nan` → `zh` they are read the other way.
Forms identical to their term are dropped (a term that does not change teaches nothing and hints nothing).

Matching is longest first, without overlaps: `attested(source, target)` gives the entries whose term is in
the source and one of whose forms is in the target (what prep writes into the analysis and what eval
counts in a reference); `entries_in(source)` gives those whose term is in the source (what a hint shows).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from toolkit.errors import DataError

log = logging.getLogger(__name__)
ARROW = " → "
FORM_SEPARATOR = " / "  # between several forms of one term in a hint
MAX_FORMS = 4  # forms of one term shown in a hint
ITAIGI = ("HoaBun", "HanLoTaibunKip")
MOE_TERM = "詞目"
MOE_PLACES = ("鹿港", "三峽", "臺北", "宜蘭", "臺南", "高雄", "金門", "馬公", "新竹", "臺中")
SHIPPED_SIDES = ("zh", "nan")  # the languages of the iTaigi and MOE lexicons

# The analysis text per reasoning language (`prep.analysis_template` replaces it); {terms} is the term list.
ANALYSIS_TEMPLATES = {
    "english": "Words that change: {terms}.",
    "mandarin": "要換的詞：{terms}。",
    "chinese": "要換的詞：{terms}。",
}
TERM_JOIN = "; "
DEFAULT_HINT_TEMPLATE = "Glossary (use an entry where it fits the text): {terms}"


class Glossary:
    """Source term -> target forms (in order, without repeats), with a longest-match index."""

    def __init__(self, entries: dict[str, list[str]] | None = None) -> None:
        self.entries: dict[str, list[str]] = {}
        self._index: dict[str, list[int]] | None = None
        self._reversed: Glossary | None = None
        for term, forms in (entries or {}).items():
            self.add(term, forms)

    def add(self, term: str, forms: Iterable[str]) -> None:
        term = term.strip()
        kept = [f for f in (f.strip() for f in forms) if f and f != term]
        if not term or not kept:
            return
        have = self.entries.setdefault(term, [])
        have.extend(f for f in kept if f not in have)
        self._index = None
        self._reversed = None

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def merged(self, other: Glossary | None) -> Glossary:
        """This glossary's entries first, then `other`'s (a term in both: this one's forms first)."""
        out = Glossary(self.entries)
        for term, forms in (other.entries.items() if other else ()):
            out.add(term, forms)
        return out

    def reversed(self) -> Glossary:
        """The other direction: each form becomes a term whose forms are the terms that had it."""
        if self._reversed is None:
            rev = Glossary()
            for term, forms in self.entries.items():
                for form in forms:
                    rev.add(form, [term])
            rev._reversed = self
            self._reversed = rev
        return self._reversed

    def _lengths(self) -> dict[str, list[int]]:
        if self._index is None:
            index: dict[str, set[int]] = {}
            for term in self.entries:
                index.setdefault(term[0], set()).add(len(term))
            self._index = {ch: sorted(lengths, reverse=True) for ch, lengths in index.items()}
        return self._index

    def _candidates(self, text: str) -> list[tuple[int, str]]:
        """Every (start, term) of the glossary in `text`, longest first, then leftmost."""
        lengths = self._lengths()
        found = [(i, text[i:i + n]) for i, ch in enumerate(text) for n in lengths.get(ch, ())
                 if text[i:i + n] in self.entries]
        return sorted(found, key=lambda c: (-len(c[1]), c[0]))

    def entries_in(self, text: str) -> list[tuple[str, list[str]]]:
        """(term, forms) of the terms in `text`, longest match first, no overlaps, each term once, in text order."""
        used: list[tuple[int, int]] = []
        chosen: dict[str, int] = {}
        for start, term in self._candidates(text):
            span = (start, start + len(term))
            if _overlaps(span, used):
                continue
            used.append(span)
            chosen.setdefault(term, start)
        return [(t, self.entries[t]) for t in sorted(chosen, key=chosen.get)]

    def attested(self, source: str, target: str) -> list[tuple[str, str]]:
        """(term, form) pairs whose term is in `source` and form in `target`: longest term first, no overlapping
        spans on either side, each pair once, in source order."""
        used_src: list[tuple[int, int]] = []
        used_tgt: list[tuple[int, int]] = []
        chosen: dict[tuple[str, str], int] = {}
        for start, term in self._candidates(source):
            span = (start, start + len(term))
            if _overlaps(span, used_src):
                continue
            for form in sorted(self.entries[term], key=len, reverse=True):
                at = _free_occurrence(target, form, used_tgt)
                if at is not None:
                    used_src.append(span)
                    used_tgt.append((at, at + len(form)))
                    chosen.setdefault((term, form), start)
                    break
        return sorted(chosen, key=chosen.get)


def _overlaps(span: tuple[int, int], used: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in used)


def _free_occurrence(text: str, form: str, used: list[tuple[int, int]]) -> int | None:
    at = text.find(form)
    while at >= 0:
        if not _overlaps((at, at + len(form)), used):
            return at
        at = text.find(form, at + 1)
    return None


# ---- rendering ----------------------------------------------------------------------------------

def term_list(pairs: Iterable[tuple[str, str]]) -> str:
    """`東西 → 物件; 便宜 → 俗`: the terms verbatim."""
    return TERM_JOIN.join(f"{term}{ARROW}{form}" for term, form in pairs)


def analysis_template(reasoning_language: str, override: str | None = None) -> str | None:
    """The analysis template of a reasoning language (None: no shipped one; set prep.analysis_template)."""
    if override:
        return override
    name = reasoning_language.strip().lower()
    words = [name, *name.replace("(", " ").replace(")", " ").split()]
    return next((ANALYSIS_TEMPLATES[w] for w in words if w in ANALYSIS_TEMPLATES), None)


def analysis_text(pairs: list[tuple[str, str]], template: str) -> str:
    return template.replace("{terms}", term_list(pairs))


def hint_text(entries: list[tuple[str, list[str]]], template: str = DEFAULT_HINT_TEMPLATE) -> str | None:
    """The hint of the system message: `東西 → 物件 / 物; 便宜 → 俗`. A hint is user text: the backends tokenize
    it as plain text (`PromptSpec.prompt_pieces`), and the Ollama one defuses it like the text."""
    if not entries:
        return None
    terms = TERM_JOIN.join(f"{term}{ARROW}{FORM_SEPARATOR.join(forms[:MAX_FORMS])}" for term, forms in entries)
    return template.replace("{terms}", terms)


# ---- reading ------------------------------------------------------------------------------------

def load(paths: Iterable[str | Path], source_column: str = "zh", target_column: str = "nan") -> Glossary:
    """One glossary from several files (earlier files' forms first), oriented source_column -> target_column."""
    out = Glossary()
    for path in paths:
        got = read(Path(path), source_column, target_column)
        log.info("glossary: %s: %d terms", path, len(got))
        out = out.merged(got)
    return out


def read(path: Path, source_column: str = "zh", target_column: str = "nan") -> Glossary:
    if not path.is_file():
        raise DataError(f"{path}: no such glossary file. Pass a TSV/CSV with a header (e.g. zh<TAB>nan), the iTaigi "
                        "CSV or the MOE regional word table.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start}). Save the glossary as UTF-8.") from None
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first else ","
    rows = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip() for h in next(rows, [])]
    if not header:
        raise DataError(f"{path}: empty glossary file. Expected a header line such as zh<TAB>nan.")
    if all(c in header for c in ITAIGI):
        glossary = _read_columns(path, rows, header, *ITAIGI, split="/")
        return _orient(glossary, source_column, target_column)
    if MOE_TERM in header and any(p in header for p in MOE_PLACES):
        return _orient(_read_moe(path, rows, header), source_column, target_column)
    for src, tgt in ((source_column, target_column), ("source", "target")):
        if src in header and tgt in header:
            return _read_columns(path, rows, header, src, tgt)
    raise DataError(f"{path}:1: expected a header naming the columns {source_column} and {target_column} (or source "
                    f"and target), found {first[:80]!r}. Add such a header, or pass the iTaigi or MOE file as it is.")


def _orient(glossary: Glossary, source_column: str, target_column: str) -> Glossary:
    if (source_column, target_column) == SHIPPED_SIDES[::-1]:
        return glossary.reversed()
    if (source_column, target_column) != SHIPPED_SIDES:
        log.warning("glossary: a Mandarin -> Taigi lexicon read for columns %s -> %s, as Mandarin -> Taigi",
                    source_column, target_column)
    return glossary


def _read_columns(path: Path, rows: Iterable[list[str]], header: list[str], src: str, tgt: str,
                  split: str | None = None) -> Glossary:
    glossary = Glossary()
    i, j = header.index(src), header.index(tgt)
    for number, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{number}: expected {len(header)} columns ({', '.join(header)}), found "
                            f"{len(row)}. Fix the line (quote a cell holding the delimiter).")
        terms, forms = row[i], row[j]
        for term in (terms.split(split) if split else [terms]):
            glossary.add(term, forms.split(split) if split else [forms])
    return glossary


def _read_moe(path: Path, rows: Iterable[list[str]], header: list[str]) -> Glossary:
    glossary = Glossary()
    term_at = header.index(MOE_TERM)
    places = [header.index(p) for p in MOE_PLACES if p in header]
    for number, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{number}: expected {len(header)} columns, found {len(row)}. The MOE table is "
                            "read as it is: use an unmodified copy.")
        count: dict[str, int] = {}
        for at in places:
            for item in row[at].split(","):
                han = item.strip().split("\u3000")[0].strip()  # `漢字　tâi-lô`: the Han part
                if han:
                    count[han] = count.get(han, 0) + 1
        glossary.add(row[term_at], sorted(count, key=lambda f: -count[f]))  # stable: ties keep table order
    return glossary


# ---- prep: analysis and hints of training examples ----------------------------------------------

class Annotator:
    """`toolkit prep --glossary`: the analysis and the hint of each example, from the terms attested in it.

    Seeded (prep.seed), so a prep is reproducible. A hint shows what eval/serve would show for the source (each
    entry with up to MAX_FORMS forms, the attested one among them) for the attested entries, plus up to
    `glossary_hint_distractors` entries found in the source whose forms are not in the target.
    """

    def __init__(self, glossary: Glossary, cfg: Any, analysis_template: str | None) -> None:
        import random

        self.by_direction = {"forward": glossary, "reverse": glossary.reversed()}
        self.cfg, self.template = cfg, analysis_template
        self.rng = random.Random(cfg.seed)
        self.counts: Counter = Counter()
        self.per_example: Counter = Counter()
        self.top: Counter = Counter()

    def annotate(self, direction: str, source: str, target: str, *, count: bool = True,
                 has_analysis: bool = False) -> tuple[str | None, str | None]:
        """(analysis, hint) of one example; `has_analysis`: it has its own (a reasoning column), keep it."""
        cfg = self.cfg
        glossary = self.by_direction[direction]
        pairs = glossary.attested(source, target)
        draw_analysis, draw_hint = self.rng.random(), self.rng.random()
        analysis = hint = None
        if pairs and not has_analysis and self.template and draw_analysis < cfg.glossary_analysis_share:
            longest = sorted(pairs, key=lambda p: -len(p[0]))[:cfg.glossary_max_terms]
            analysis = analysis_text([p for p in pairs if p in longest], self.template)
        if draw_hint < cfg.glossary_hint_share:
            hint = self._hint(glossary, source, target, pairs)
        if count:
            self.counts["examples"] += 1
            self.counts["with_terms"] += bool(pairs)
            self.counts["terms"] += len(pairs)
            self.counts["with_analysis"] += analysis is not None
            self.counts["with_hint"] += hint is not None
            self.per_example[min(len(pairs), 5)] += 1
            self.top.update(f"{t}{ARROW}{f}" for t, f in pairs)
        return analysis, hint

    def _hint(self, glossary: Glossary, source: str, target: str, pairs: list[tuple[str, str]]) -> str | None:
        attested = dict(pairs)
        entries = []
        for term, form in pairs:
            forms = glossary.entries[term][:MAX_FORMS]
            if form not in forms:  # the right form must be in the hint (at a place that gives nothing away)
                forms = [*forms[:MAX_FORMS - 1], form]
            entries.append((term, forms))
        distractors = [(t, forms) for t, forms in glossary.entries_in(source)
                       if t not in attested and not any(f in target for f in forms)]
        k = min(self.cfg.glossary_hint_distractors, len(distractors))
        entries += self.rng.sample(distractors, k) if k else []
        entries = entries[:self.cfg.glossary_hint_max_terms]
        if not entries:
            return None
        self.counts["hint_distractors"] += k
        entries.sort(key=lambda e: source.find(e[0]))
        return hint_text(entries, self.cfg.hint_template)

    def stats(self, files: list[str], size: int) -> dict[str, Any]:
        n = self.counts["examples"]
        return {
            "files": files,
            "terms": size,
            "examples": n,
            "share_with_terms": round(self.counts["with_terms"] / n, 4) if n else 0.0,
            "terms_per_example": round(self.counts["terms"] / n, 3) if n else 0.0,
            "terms_per_example_with_terms": (round(self.counts["terms"] / self.counts["with_terms"], 3)
                                             if self.counts["with_terms"] else 0.0),
            "examples_by_terms": {("5+" if k == 5 else str(k)): v for k, v in sorted(self.per_example.items())},
            "with_analysis": self.counts["with_analysis"],
            "with_hint": self.counts["with_hint"],
            "hint_distractors": self.counts["hint_distractors"],
            "top_terms": [[term, count] for term, count in self.top.most_common(25)],
        }


# ---- eval: term accuracy ------------------------------------------------------------------------

def _share(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def term_scores(glossary: Glossary, sources: list[str], references: list[str], hypotheses: list[str],
                hints: list[list[tuple[str, list[str]]]] | None = None) -> dict[str, Any]:
    """Term accuracy of one system's outputs.

    reference: the (term, form) pairs attested in each source and reference (as prep finds them); produced =
    the reference's form is in the output. hinted (with `hints`, the entries each prompt's hint showed):
    produced = one of the entry's forms is in the output; `hinted_in_reference` restricts that to the entries
    whose form the reference uses (the hints that were right).
    """
    attested = produced = 0
    for source, reference, hypothesis in zip(sources, references, hypotheses, strict=True):
        for _, form in glossary.attested(source, reference):
            attested += 1
            produced += form in hypothesis
    out: dict[str, Any] = {"reference_terms": attested, "reference_terms_produced": produced,
                           "reference_term_accuracy": _share(produced, attested)}
    if hints is not None:
        counts = Counter()
        for entries, reference, hypothesis in zip(hints, references, hypotheses, strict=True):
            for _, forms in entries:
                hit = any(f in hypothesis for f in forms)
                right = any(f in reference for f in forms)
                counts["hinted"] += 1
                counts["hinted_produced"] += hit
                counts["hinted_in_reference"] += right
                counts["hinted_in_reference_produced"] += hit and right
        out.update(counts)
        out["hint_accuracy"] = _share(counts["hinted_produced"], counts["hinted"])
        out["right_hint_accuracy"] = _share(counts["hinted_in_reference_produced"], counts["hinted_in_reference"])
    return out
