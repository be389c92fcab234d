"""`toolkit prep corpus.tsv`: parallel pairs -> Harmony chat examples (train.jsonl, dev.jsonl, stats.json).

Streams the input line by line (bytes, so invalid UTF-8 is reported with its line number), validates
every row, filters by length, dedupes, splits dev by a seeded hash of the source sentence (identical
sources always land in the same split, and the split needs no second pass), and writes the JSONL
examples through temporary files so nothing half-written is ever left behind. The sentences are never
altered (the sample corpus is CC BY-ND): only a BOM, CR line ends and surrounding whitespace of a line
are format, and they are dropped. With `join_pairs` > 1, consecutive training pairs are also written
joined into longer examples (sentences verbatim, in order), next to the single pairs. With `--glossary`,
the lexicon entries attested in an example go into its analysis and, for a share of examples, a hint in
its system message (`toolkit.glossary`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from toolkit import artifacts, resources
from toolkit.config import PrepConfig
from toolkit.errors import DataError
from toolkit.prompt import PromptSpec, prep_spec

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 20  # a longer "line" is a binary file or a missing newline, not a sentence
FIX_OR_SKIP = "Fix the line or pass --skip-bad-lines."
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Pair:
    line: int
    source: str
    target: str
    thinking: str | None = None
    system: str | None = None  # recipe JSONL: the example's own system message


class RowError(Exception):
    """One bad line: its reason key (for stats) and the message (for the error line)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        yield from enumerate(fh, start=1)


def _decode(path: Path, number: int, raw: bytes, counts: Counter) -> str:
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        counts["bom_removed"] += 1
        raw = raw[3:]
    if len(raw) > MAX_LINE_BYTES:
        raise RowError("line_too_long", f"line is {len(raw):,} bytes (limit {MAX_LINE_BYTES:,}); "
                                        "is this a text file with one pair per line?")
    if b"\x00" in raw:
        raise RowError("nul_byte", "contains a NUL byte; the file is binary or UTF-16. Save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8") from exc
    if text.endswith("\r\n"):
        counts["crlf_normalized"] += 1
        text = text[:-2]
    else:
        text = text.rstrip("\n").removesuffix("\r")  # a CR without LF at the very end: a CRLF file's last line
    if "\r" in text:
        raise RowError("lone_cr", "holds a carriage return (CR) inside the line: the file has classic Mac line ends "
                                  "(CR only) or a stray CR. Save it with LF line ends, e.g. tr '\\r' '\\n' < IN > OUT")
    return text


def read_tsv(path: Path, cfg: PrepConfig, counts: Counter, fix: str = FIX_OR_SKIP) -> Iterator[Pair]:
    """Pairs from a TSV with a header; bad rows raise DataError (`fix` says what to do), or are counted with
    skip_bad_lines."""
    columns: list[str] | None = None
    idx: dict[str, int] = {}
    for number, raw in _lines(path):
        try:
            text = _decode(path, number, raw, counts)
        except RowError as err:
            if columns is None or not cfg.skip_bad_lines:
                raise DataError(f"{path}:{number}: {err}") from None
            counts[f"bad_{err.reason}"] += 1
            continue
        if columns is None:
            columns = text.split("\t")
            wanted = [cfg.source_column, cfg.target_column] + ([cfg.reasoning_column] if cfg.reasoning_column else [])
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise DataError(
                    f"{path}:1: expected a header naming the column(s) {', '.join(missing)}, found "
                    f"{text[:80]!r}. Add a header line (e.g. 'zh<TAB>nan') or pick columns with --src/--tgt."
                )
            idx = {c: columns.index(c) for c in wanted}
            continue
        if not text.strip():
            counts["blank_line"] += 1
            continue
        counts["rows_read"] += 1
        try:
            yield _row(text, columns, idx, cfg, number)
        except RowError as err:
            if not cfg.skip_bad_lines:
                raise DataError(f"{path}:{number}: {err}. {fix}") from None
            counts[f"bad_{err.reason}"] += 1
    if columns is None:
        raise DataError(f"{path}: empty file. Expected a header line and tab-separated pairs.")


def _row(text: str, columns: list[str], idx: dict[str, int], cfg: PrepConfig, number: int) -> Pair:
    cells = text.split("\t")
    if len(cells) != len(columns):
        raise RowError("column_count", f"expected {len(columns)} tab-separated columns ({', '.join(columns)}), "
                                       f"found {len(cells)}")
    source, target = cells[idx[cfg.source_column]].strip(), cells[idx[cfg.target_column]].strip()
    for name, value in ((cfg.source_column, source), (cfg.target_column, target)):
        if not value:
            raise RowError("empty_field", f"column {name} is empty")
    thinking = cells[idx[cfg.reasoning_column]].strip() or None if cfg.reasoning_column else None
    return Pair(number, source, target, thinking)


def read_jsonl(path: Path, cfg: PrepConfig, counts: Counter, fix: str = FIX_OR_SKIP) -> Iterator[Pair]:
    """Pairs from JSONL in the multilingual-reasoning recipe's schema (flat fields or `messages`)."""
    for number, raw in _lines(path):
        try:
            text = _decode(path, number, raw, counts)
            if not text.strip():
                continue
            counts["rows_read"] += 1
            yield _recipe_row(text, number)
        except RowError as err:
            if not cfg.skip_bad_lines:
                raise DataError(f"{path}:{number}: {err}. {fix}") from None
            counts[f"bad_{err.reason}"] += 1


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _text_field(name: str, value: Any, required: bool = True) -> str | None:
    """A text field of a recipe row: a string (non-blank when required), never a number or a list."""
    if value is None and not required:
        return None
    if value is None:
        raise RowError("missing_field", f"missing {name}")
    if not isinstance(value, str):
        raise RowError("invalid_field", f"{name}: expected a string, found {_json_type(value)}")
    if required and not value.strip():
        raise RowError("empty_field", f"{name} is empty")
    if _SURROGATE.search(value):  # a JSON escape such as \ud800 without its pair: not encodable text
        raise RowError("invalid_text", f"{name} holds a lone surrogate escape (\\ud800-\\udfff), not valid Unicode")
    return value or None


def _recipe_row(text: str, number: int) -> Pair:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise RowError("invalid_json", "expected a JSON object per line")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise RowError("invalid_messages", f"`messages`: expected a list of objects, found {_json_type(msgs)}")
        for i, m in enumerate(msgs, start=1):
            if not isinstance(m, dict):
                raise RowError("invalid_messages", f"`messages` item {i}: expected an object like "
                                                   f'{{"role": "user", "content": "..."}}, found {_json_type(m)}')
        by_role = {m.get("role"): m for m in msgs}
        if "user" not in by_role or "assistant" not in by_role:
            raise RowError("missing_field", "`messages` needs a user and an assistant message")
        system = next((m.get("content") for m in msgs if m.get("role") in ("system", "developer")), None)
        system = _text_field("the system message's content", system, required=False)
        user = _text_field("the user message's content", by_role["user"].get("content"))
        final = _text_field("the assistant message's content", by_role["assistant"].get("content"))
        analysis = _text_field("the assistant message's thinking", by_role["assistant"].get("thinking"), False)
    else:
        missing = [k for k in ("user", "final") if k not in obj]
        if missing:
            raise RowError("missing_field", f"missing field(s) {', '.join(missing)} (recipe schema: "
                                            "reasoning_language, developer, user, analysis, final, or messages)")
        user, final = _text_field("field user", obj["user"]), _text_field("field final", obj["final"])
        analysis = _text_field("field analysis", obj.get("analysis"), required=False)
        language = _text_field("field reasoning_language", obj.get("reasoning_language"), required=False)
        developer = _text_field("field developer", obj.get("developer"), required=False)
        system = None
        if language:
            system = f"reasoning language: {language}" + (f"\n\n{developer}" if developer else "")
    return Pair(number, user, final, analysis, system)


class LengthCounter:
    def __init__(self, unit: str):
        self.unit = unit
        if unit == "tokens":
            from toolkit.tokenizer import tiktoken_encoding

            self._encode = tiktoken_encoding().encode_ordinary

    def __call__(self, text: str) -> int:
        return len(text) if self.unit == "chars" else len(self._encode(text))


def resolve_length_unit(unit: str) -> str:
    if unit != "auto":
        return unit
    try:
        from toolkit.tokenizer import tiktoken_encoding

        tiktoken_encoding()
        return "tokens"
    except Exception as exc:  # noqa: BLE001 - any failure to build the tokenizer means: count characters
        log.warning("gpt-oss tokenizer unavailable (%s); --max-length counts characters", exc)
        return "chars"


def _in_dev(key: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


class ExampleWriter:
    """Renders pairs as JSONL examples; the system message JSON is built once per direction."""

    def __init__(self, spec: PromptSpec, effort: str):
        self.effort, self.spec = effort, spec
        self._system = {d: json.dumps(spec.for_direction(d).messages("")[0], ensure_ascii=False)
                        for d in ("forward", "reverse")}

    def line(self, split: str, n: int, direction: str, pair: Pair, source: str, target: str,
             analysis: str | None = None, hint: str | None = None) -> str:
        """One JSONL example; `analysis` and `hint` (a glossary's) go to the analysis and the system message."""
        # json.encoder's C string encoder: 4x faster than json.dumps per field, same output
        quote = encode_basestring
        system = self._system[direction] if pair.system is None else (
            f'{{"role": "system", "content": {quote(pair.system)}}}')
        if hint and pair.system is None:
            system = json.dumps(self.spec.for_direction(direction).messages("", hint=hint)[0], ensure_ascii=False)
        thinking = pair.thinking if pair.thinking and direction == "forward" else analysis
        thinking = f', "thinking": {quote(thinking)}' if thinking else ""
        src = quote(source)
        return (
            f'{{"id": "{split}-{n:06d}", "direction": "{direction}", "line": {pair.line}, '
            f'"source": {src}, "target": {quote(target)}, "messages": [{system}, '
            f'{{"role": "user", "content": {src}}}, {{"role": "assistant", "content": {quote(target)}{thinking}}}], '
            f'"reasoning_effort": "{self.effort}"}}\n'
        )


_NO_SPACE_AFTER = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff]$")


def join_texts(texts: list[str], separator: str = "auto") -> str:
    """Sentences joined as one text: `separator` between them, or for "auto" nothing after a CJK character or
    full-width punctuation (Chinese writes no space between sentences) and a space after anything else."""
    if separator != "auto":
        return separator.join(texts)
    out = texts[0]
    for text in texts[1:]:
        out += ("" if _NO_SPACE_AFTER.search(out) else " ") + text
    return out


class PairJoiner:
    """Groups consecutive training pairs, 2..max_pairs at a time (sizes drawn by a seeded RNG), into one pair
    whose source and target are the sentences joined in order, unchanged. A group closes early when the next
    pair would make it longer than `fits` allows. Pairs with their own reasoning or system message are not
    joined (a joined reasoning trace would be nonsense)."""

    def __init__(self, max_pairs: int, separator: str, seed: int, fits) -> None:
        self.max_pairs, self.separator, self.fits = max_pairs, separator, fits
        self.rng = random.Random(seed)
        self.group: list[Pair] = []
        self.size = self._draw()

    def _draw(self) -> int:
        return self.rng.randint(2, self.max_pairs)

    def _join(self, group: list[Pair]) -> Pair:
        return Pair(group[0].line, join_texts([p.source for p in group], self.separator),
                    join_texts([p.target for p in group], self.separator))

    def add(self, pair: Pair) -> Pair | None:
        """Takes the next training pair; returns a joined pair when a group is complete."""
        if pair.thinking is not None or pair.system is not None:
            return None
        joined = None
        if self.group and not self.fits(self._join([*self.group, pair])):
            joined = self.finish()
        self.group.append(pair)
        if len(self.group) >= self.size:
            joined = self.finish()
        return joined

    def finish(self) -> Pair | None:
        """Closes the open group (the end of the corpus); a group of one is not a joined pair."""
        group, self.group, self.size = self.group, [], self._draw()
        return self._join(group) if len(group) >= 2 else None


def _percentiles(values: array) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p95": pick(0.95), "p99": pick(0.99),
            "max": ordered[-1]}


def copy_baseline(sources: list[str], targets: list[str], limit: int = 5000) -> dict[str, Any]:
    """BLEU (tokenize=zh) and chrF of hypothesis = source on (the first `limit` of) the dev split."""
    if not sources:
        return {}
    sources, targets = sources[:limit], targets[:limit]
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(tokenize="zh"), CHRF()
    return {
        "sentences": len(sources),
        "bleu": round(bleu.corpus_score(sources, [targets]).score, 2),
        "chrf": round(chrf.corpus_score(sources, [targets]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def _reader(path: Path):
    return read_jsonl if path.suffix.lower() in (".jsonl", ".json") else read_tsv


def _pair_key(pair: Pair) -> bytes:
    return hashlib.blake2b(f"{pair.source}\t{pair.target}".encode(), digest_size=12).digest()


def prepare(cfg: PrepConfig, corpus: Path, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Run the prep stage; returns the manifest (the existing one when the stage already finished)."""
    corpus, out_dir = Path(corpus), Path(out_dir)
    if not corpus.is_file():
        raise DataError(f"{corpus}: no such file. Pass a TSV with a header (e.g. zh<TAB>nan) or a recipe JSONL.")
    dev_path = Path(cfg.dev_file) if cfg.dev_file else None
    if dev_path is not None and not dev_path.is_file():
        raise DataError(f"{dev_path}: no such dev file. Fix --dev-file or split with --dev-fraction.")
    config = {**asdict(cfg), "corpus": str(corpus)}
    glossaries = [Path(g) for g in cfg.glossary]
    for path in glossaries:
        if not path.is_file():
            raise DataError(f"{path}: no such glossary file. Fix --glossary (a TSV/CSV with the columns "
                            f"{cfg.source_column} and {cfg.target_column}, or the iTaigi / MOE file as it is).")
    inputs = [corpus] + ([dev_path] if dev_path else []) + glossaries
    done = artifacts.check_out_dir(out_dir, stage="prep", config=config, force=force, inputs=inputs)
    if done is not None:
        log.info("prep: %s already finished with this config and input; nothing to do", out_dir)
        return done
    # Built beside OUT and swapped in when complete: a bad corpus (with --force too) leaves OUT as it was.
    with artifacts.building(out_dir) as build:
        manifest = _write(cfg, corpus, dev_path, config, inputs, build)
    stats = manifest["metrics"]
    log.info("prep: %s pairs -> %s train / %s dev examples -> %s", f"{stats['pairs_kept']:,}",
             f"{stats['examples']['train']:,}", f"{stats['examples']['dev']:,}", out_dir)
    return manifest


def _write(cfg: PrepConfig, corpus: Path, dev_path: Path | None, config: dict[str, Any], inputs: list[Path],
           out_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    usage = resources.Usage()

    unit = resolve_length_unit(cfg.length_unit)
    measure = LengthCounter(unit)
    spec = prep_spec(cfg)
    writer = ExampleWriter(spec, cfg.reasoning_effort)
    annotator = lexicon = None
    if cfg.glossary:
        from toolkit import glossary

        lexicon = glossary.load(cfg.glossary, cfg.source_column, cfg.target_column)
        if not lexicon:
            raise DataError(f"{', '.join(cfg.glossary)}: no glossary entry with a form other than its term. Check the "
                            "files' columns.")
        annotator = glossary.Annotator(lexicon, cfg, glossary.analysis_template(cfg.reasoning_language,
                                                                                cfg.analysis_template))
    counts: Counter = Counter()
    seen: set[bytes] = set()
    lengths = {"source": array("I"), "target": array("I")}
    dev_sources: list[str] = []
    dev_targets: list[str] = []
    directions = ["forward", "reverse"] if cfg.direction == "both" else [cfg.direction]
    n = {"train": 0, "dev": 0}
    joiner = None
    if cfg.join_pairs > 1:
        joiner = PairJoiner(cfg.join_pairs, cfg.join_separator, cfg.seed,
                            lambda p: measure(p.source) <= cfg.max_length and measure(p.target) <= cfg.max_length)
    joined_lengths = array("I")

    def keep(pair: Pair) -> bool:
        src_len, tgt_len = measure(pair.source), measure(pair.target)
        if src_len > cfg.max_length or tgt_len > cfg.max_length:
            counts["dropped_too_long"] += 1
            return False
        if cfg.dedupe:
            key = _pair_key(pair)
            if key in seen:
                counts["dropped_duplicate"] += 1
                return False
            seen.add(key)
        lengths["source"].append(src_len)
        lengths["target"].append(tgt_len)
        return True

    def write(fh, split: str, direction: str, pair: Pair, src: str, tgt: str) -> None:
        n[split] += 1
        analysis = hint = None
        if annotator is not None:
            analysis, hint = annotator.annotate(direction, src, tgt, count=split == "train",
                                                has_analysis=bool(pair.thinking) and direction == "forward")
        fh.write(writer.line(split, n[split], direction, pair, src, tgt, analysis, hint))

    def emit(fh, split: str, pair: Pair) -> None:
        for direction in directions:
            src, tgt = (pair.source, pair.target) if direction == "forward" else (pair.target, pair.source)
            write(fh, split, direction, pair, src, tgt)
            if split == "dev":
                dev_sources.append(src)
                dev_targets.append(tgt)
        if split == "train" and joiner is not None:
            emit_joined(fh, joiner.add(pair))

    def emit_joined(fh, joined: Pair | None) -> None:
        if joined is None:
            return
        counts["joined_examples"] += 1
        joined_lengths.append(measure(joined.source))
        for direction in directions:
            src, tgt = (joined.source, joined.target) if direction == "forward" else (joined.target, joined.source)
            write(fh, "train", direction, joined, src, tgt)

    with artifacts.atomic_path(out_dir / "train.jsonl") as train_tmp, \
            artifacts.atomic_path(out_dir / "dev.jsonl") as dev_tmp:
        with open(train_tmp, "w", encoding="utf-8") as train_fh, open(dev_tmp, "w", encoding="utf-8") as dev_fh:
            dev_keys: set[str] = set()
            if dev_path is not None:
                dev_counts: Counter = Counter()
                for pair in _reader(dev_path)(dev_path, cfg, dev_counts):
                    if keep(pair):
                        dev_keys.add(pair.source)
                        emit(dev_fh, "dev", pair)
                counts.update({f"dev_file_{k}": v for k, v in dev_counts.items()})
            bar = tqdm(desc="prep", unit=" rows", unit_scale=True, disable=None, mininterval=0.5)
            for pair in _reader(corpus)(corpus, cfg, counts):
                bar.update()
                if dev_path is not None:
                    if pair.source in dev_keys:
                        counts["dropped_overlaps_dev"] += 1
                        continue
                    if keep(pair):
                        emit(train_fh, "train", pair)
                elif keep(pair):
                    is_dev = _in_dev(pair.source, cfg.seed, cfg.dev_fraction)
                    emit(dev_fh if is_dev else train_fh, "dev" if is_dev else "train", pair)
            if joiner is not None:
                emit_joined(train_fh, joiner.finish())
            bar.close()
        if n["train"] == 0:
            raise DataError(_no_training_pairs(corpus, cfg, counts, n["dev"], unit))

    stats = {
        "corpus": str(corpus),
        "rows_read": counts["rows_read"],
        "pairs_kept": len(lengths["source"]),
        "examples": dict(n),
        "joined_pairs": ({"pairs": counts["joined_examples"], "max_per_example": cfg.join_pairs,
                          "source_length": _percentiles(joined_lengths)} if joiner is not None else None),
        "dropped": {k: v for k, v in sorted(counts.items()) if k.startswith(("dropped_", "bad_"))},
        "normalized": {k: v for k, v in sorted(counts.items()) if k in ("bom_removed", "crlf_normalized")},
        "blank_lines": counts["blank_line"],
        "length_unit": unit,
        "length": {side: _percentiles(values) for side, values in lengths.items()},
        "dev_copy_baseline": copy_baseline(dev_sources, dev_targets),
        "glossary": annotator.stats(cfg.glossary, len(lexicon)) if annotator is not None else None,
    }
    artifacts.atomic_write_json(out_dir / "stats.json", stats)
    return artifacts.write_manifest(
        out_dir, stage="prep", config=config, inputs=inputs, metrics={**stats, "resources": usage.figures()},
        extra={"chat_format": cfg.chat_format, "length_unit": unit},
    )


def _no_training_pairs(corpus: Path, cfg: PrepConfig, counts: Counter, n_dev: int, unit: str) -> str:
    """Why no pair is left for training, with the fix that applies (not a list of every option)."""
    head = f"{corpus}: no usable training pairs"
    if counts["dropped_overlaps_dev"] and not counts["dropped_too_long"]:
        return (f"{head}: the source sentence of each of the {counts['dropped_overlaps_dev']} pairs is also in "
                f"--dev-file {cfg.dev_file}. Use a dev file of other sentences, or split with --dev-fraction.")
    if n_dev and not cfg.dev_file:
        return (f"{head}: --dev-fraction {cfg.dev_fraction:g} put every kept pair into the dev split ({n_dev} dev "
                "examples). Lower it, e.g. --dev-fraction 0.05.")
    fixes = []
    if counts["dropped_too_long"]:
        fixes.append(f"raise --max-length (now {cfg.max_length} {unit})")
    if any(k.startswith("bad_") for k in counts):
        fixes.append("fix the skipped lines")
    if not counts["rows_read"]:
        fixes.append("add rows after the header")
    return (f"{head} ({counts['rows_read']} rows read; dropped: {_drop_summary(counts)}). "
            + ("; ".join(fixes).capitalize() + "." if fixes else ""))


def _drop_summary(counts: Counter) -> str:
    parts = [f"{k}={v}" for k, v in sorted(counts.items()) if k.startswith(("dropped_", "bad_"))]
    return ", ".join(parts) or "none"
