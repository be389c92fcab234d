"""`toolkit prep`: outputs, statistics, the recipe JSONL schema, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit import harmony
from toolkit.config import PrepConfig
from toolkit.corpus import prepare
from toolkit.errors import ArtifactError, DataError

HEADER = "zh\tnan\tnan_tailo\n"
ROWS = [f"句子{i}。\t句仔{i}。\tku-á {i}.\n" for i in range(40)]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def cfg(**kw) -> PrepConfig:
    return PrepConfig(**{"length_unit": "chars", "dev_fraction": 0.2, **kw})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sample_corpus_folder(sample_tsv, tmp_path):
    out = tmp_path / "prep"
    manifest = prepare(PrepConfig(length_unit="chars"), sample_tsv, out)
    assert sorted(p.name for p in out.iterdir()) == ["dev.jsonl", "manifest.json", "stats.json", "train.jsonl"]
    train, dev = read_jsonl(out / "train.jsonl"), read_jsonl(out / "dev.jsonl")
    lines = sample_tsv.read_text(encoding="utf-8").splitlines()[1:]
    assert len(train) + len(dev) == len(lines) == manifest["metrics"]["pairs_kept"]
    # sentences are carried verbatim (CC BY-ND), each row once
    pairs = {tuple(line.split("\t")[:2]) for line in lines}
    assert {(r["source"], r["target"]) for r in train + dev} == pairs
    row = train[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][0]["content"].startswith("reasoning language: English\n\nTranslate the user's text from "
                                                    "Mandarin Chinese (Traditional) into Taiwanese Hokkien")
    assert row["messages"][1]["content"] == row["source"] and row["messages"][2]["content"] == row["target"]
    # what the training stage renders from it is valid Harmony ending in <|return|>
    assert harmony.render(row["messages"], reasoning_effort=row["reasoning_effort"]).endswith(
        f"<|channel|>final<|message|>{row['target']}<|return|>")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_read"] == len(lines) and stats["examples"] == {"train": len(train), "dev": len(dev)}
    assert stats["length"]["source"]["max"] >= stats["length"]["source"]["p50"] > 0
    assert 0 < stats["dev_copy_baseline"]["chrf"] < 100 and "tok:zh" in stats["dev_copy_baseline"]["bleu_signature"]
    assert manifest["stage"] == "prep" and manifest["inputs"][0]["sha256"]
    assert {o["path"] for o in manifest["outputs"]} == {"dev.jsonl", "stats.json", "train.jsonl"}


def test_split_is_deterministic_and_keeps_identical_sources_together(tmp_path):
    rows = ROWS + ["句子1。\t另外一句。\tx\n"]  # same source as row 1, other target
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(rows))
    prepare(cfg(), corpus, tmp_path / "a")
    prepare(cfg(), corpus, tmp_path / "b")
    assert (tmp_path / "a" / "dev.jsonl").read_bytes() == (tmp_path / "b" / "dev.jsonl").read_bytes()
    dev_sources = {r["source"] for r in read_jsonl(tmp_path / "a" / "dev.jsonl")}
    train_sources = {r["source"] for r in read_jsonl(tmp_path / "a" / "train.jsonl")}
    assert dev_sources and not dev_sources & train_sources
    prepare(cfg(seed=7), corpus, tmp_path / "c")
    assert (tmp_path / "c" / "dev.jsonl").read_bytes() != (tmp_path / "a" / "dev.jsonl").read_bytes()


def test_direction_both_and_reverse(tmp_path):
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(ROWS))
    prepare(cfg(direction="both", dev_fraction=0.0), corpus, tmp_path / "both")
    rows = read_jsonl(tmp_path / "both" / "train.jsonl")
    assert len(rows) == 2 * len(ROWS)
    fwd = [r for r in rows if r["direction"] == "forward"]
    rev = [r for r in rows if r["direction"] == "reverse"]
    assert {(r["source"], r["target"]) for r in rev} == {(r["target"], r["source"]) for r in fwd}
    assert "from Taiwanese Hokkien (Han characters) into Mandarin" in rev[0]["messages"][0]["content"]
    prepare(cfg(direction="reverse", dev_fraction=0.0), corpus, tmp_path / "rev")
    assert read_jsonl(tmp_path / "rev" / "train.jsonl")[0]["source"] == "句仔0。"


def test_options_reach_the_prompt(tmp_path):
    corpus = write(tmp_path / "c.tsv", "a\tb\tr\n" + "".join(f"s{i}\tt{i}\tthink {i}\n" for i in range(5)))
    c = cfg(source_column="a", target_column="b", reasoning_column="r", source_name="X", target_name="Y",
            reasoning_language="Français", reasoning_effort="high", instruction="Go {src}->{tgt}.", dev_fraction=0.0)
    prepare(c, corpus, tmp_path / "o")
    row = read_jsonl(tmp_path / "o" / "train.jsonl")[0]
    assert row["messages"][0]["content"] == "reasoning language: Français\n\nGo X->Y."
    assert row["messages"][2] == {"role": "assistant", "content": "t0", "thinking": "think 0"}
    assert row["reasoning_effort"] == "high"


def test_explicit_dev_file_removes_overlap(tmp_path):
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(ROWS))
    dev = write(tmp_path / "d.tsv", HEADER + ROWS[0] + ROWS[1])
    manifest = prepare(cfg(dev_file=str(dev)), corpus, tmp_path / "o")
    assert len(read_jsonl(tmp_path / "o" / "dev.jsonl")) == 2
    assert len(read_jsonl(tmp_path / "o" / "train.jsonl")) == len(ROWS) - 2
    assert manifest["metrics"]["dropped"]["dropped_overlaps_dev"] == 2


def test_length_filter_and_dedupe_are_counted(tmp_path):
    rows = ROWS[:10] + [ROWS[0], ROWS[0], "長" * 300 + "\tx\ty\n"]
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(rows))
    m = prepare(cfg(max_length=50, dev_fraction=0.0), corpus, tmp_path / "o")
    assert m["metrics"]["dropped"] == {"dropped_duplicate": 2, "dropped_too_long": 1}
    assert m["metrics"]["pairs_kept"] == 10
    m = prepare(cfg(max_length=50, dev_fraction=0.0, dedupe=False), corpus, tmp_path / "o2")
    assert m["metrics"]["pairs_kept"] == 12


def test_token_lengths_use_the_gpt_oss_tokenizer(tmp_path):
    pytest.importorskip("tiktoken")
    from toolkit.tokenizer import count_tokens

    corpus = write(tmp_path / "c.tsv", HEADER + "".join(ROWS[:5]))
    m = prepare(cfg(length_unit="tokens", dev_fraction=0.0), corpus, tmp_path / "o")
    assert m["metrics"]["length_unit"] == "tokens"
    assert m["metrics"]["length"]["source"]["max"] == max(count_tokens(r.split("\t")[0]) for r in ROWS[:5])


def test_recipe_jsonl_flat_and_messages(tmp_path):
    flat = {"reasoning_language": "French", "developer": "You are helpful.", "user": "Hi", "analysis": "Salut.",
            "final": "Hello!"}
    msgs = {"messages": [{"role": "system", "content": "reasoning language: German"},
                         {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "thinking": "T"}]}
    corpus = write(tmp_path / "r.jsonl", json.dumps(flat) + "\n" + json.dumps(msgs) + "\n")
    prepare(cfg(dev_fraction=0.0), corpus, tmp_path / "o")
    a, b = read_jsonl(tmp_path / "o" / "train.jsonl")
    assert a["messages"] == [{"role": "system", "content": "reasoning language: French\n\nYou are helpful."},
                             {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!", "thinking": "Salut."}]
    assert b["messages"][0] == {"role": "system", "content": "reasoning language: German"}
    assert b["messages"][2] == {"role": "assistant", "content": "A", "thinking": "T"}


def test_bom_and_crlf_are_format_only(tmp_path):
    text = (HEADER + "".join(ROWS[:5])).replace("\n", "\r\n")
    corpus = write(tmp_path / "c.tsv", b"\xef\xbb\xbf" + text.encode())
    m = prepare(cfg(dev_fraction=0.0), corpus, tmp_path / "o")
    rows = read_jsonl(tmp_path / "o" / "train.jsonl")
    assert [r["source"] for r in rows] == [r.split("\t")[0] for r in ROWS[:5]]
    assert not any("\r" in r["target"] or "\ufeff" in r["source"] for r in rows)
    assert m["metrics"]["normalized"] == {"bom_removed": 1, "crlf_normalized": 6}


BAD = [
    ("wrong column count", HEADER + ROWS[0] + "只有一欄\n", 3, "expected 3 tab-separated columns", "column_count"),
    ("empty field", HEADER + ROWS[0] + "\t空的\tx\n", 3, "column zh is empty", "empty_field"),
    ("invalid utf-8", HEADER.encode() + ROWS[0].encode() + b"\xff\xfe bad\tx\ty\n", 3, "invalid UTF-8",
     "invalid_utf8"),
    ("nul byte", HEADER + ROWS[0] + "a\x00b\tc\td\n", 3, "NUL byte", "nul_byte"),
    ("over-long row", HEADER + ROWS[0] + "x" * (1 << 20) + "\ty\tz\n", 3, "bytes (limit", "line_too_long"),
]


@pytest.mark.parametrize("name,text,line,message,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_line_is_one_clear_error_and_writes_nothing(tmp_path, name, text, line, message, reason):
    corpus = write(tmp_path / "c.tsv", text)
    out = tmp_path / "o"
    with pytest.raises(DataError) as err:
        prepare(cfg(), corpus, out)
    msg = str(err.value)
    assert msg.startswith(f"{corpus}:{line}: ") and message in msg and "\n" not in msg
    # nothing stays behind: no output folder (not even an empty one), no hidden partial build beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tsv"]


@pytest.mark.parametrize("name,text,line,message,reason", BAD, ids=[b[0] for b in BAD])
def test_skip_bad_lines_counts_by_reason(tmp_path, name, text, line, message, reason):
    corpus = write(tmp_path / "c.tsv", text)
    m = prepare(cfg(skip_bad_lines=True, dev_fraction=0.0), corpus, tmp_path / "o")
    assert m["metrics"]["dropped"] == {f"bad_{reason}": 1}
    assert m["metrics"]["pairs_kept"] == 1


def test_missing_header_or_column(tmp_path):
    corpus = write(tmp_path / "c.tsv", "".join(ROWS))
    with pytest.raises(DataError, match=r"c.tsv:1: expected a header naming the column\(s\) zh, nan"):
        prepare(cfg(), corpus, tmp_path / "o")
    corpus = write(tmp_path / "d.tsv", HEADER + ROWS[0])
    with pytest.raises(DataError, match="column\\(s\\) hak.*--src/--tgt"):
        prepare(cfg(target_column="hak"), corpus, tmp_path / "o")


def test_zero_usable_rows(tmp_path):
    corpus = write(tmp_path / "c.tsv", HEADER + "長長長\t長長長長\tx\n")
    with pytest.raises(DataError, match="no usable training pairs .*dropped_too_long=1"):
        prepare(cfg(max_length=2), corpus, tmp_path / "o")
    assert not (tmp_path / "o" / "train.jsonl").exists()
    with pytest.raises(DataError, match="empty file"):
        prepare(cfg(), write(tmp_path / "e.tsv", ""), tmp_path / "o2")


def test_missing_input_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare(cfg(), tmp_path / "nope.tsv", tmp_path / "o")


def test_existing_output_folder(tmp_path):
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(ROWS))
    out = tmp_path / "o"
    first = prepare(cfg(), corpus, out)
    before = (out / "train.jsonl").stat().st_mtime_ns
    assert prepare(cfg(), corpus, out) == first  # finished, same config: a no-op
    assert (out / "train.jsonl").stat().st_mtime_ns == before
    with pytest.raises(ArtifactError, match=r"another config \(prep.seed: 20261125 -> 1\). Pass --force"):
        prepare(cfg(seed=1), corpus, out)
    prepare(cfg(seed=1), corpus, out, force=True)
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not empty and has no manifest.json"):
        prepare(cfg(), corpus, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_join_pairs_adds_long_examples_of_consecutive_training_pairs(tmp_path):
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(ROWS))
    plain = prepare(cfg(), corpus, tmp_path / "plain")
    out = tmp_path / "joined"
    manifest = prepare(cfg(join_pairs=3, direction="both"), corpus, out)
    train, dev = read_jsonl(out / "train.jsonl"), read_jsonl(out / "dev.jsonl")
    single_train = read_jsonl(tmp_path / "plain" / "train.jsonl")
    singles = [r for r in train if r["direction"] == "forward" and r["source"].count("。") == 1]
    joined = [r for r in train if r["direction"] == "forward" and r["source"].count("。") > 1]
    # every single pair is still there, dev is never joined
    assert [(r["source"], r["target"]) for r in singles] == [(r["source"], r["target"]) for r in single_train]
    assert len(dev) == 2 * plain["metrics"]["examples"]["dev"] and all(r["source"].count("。") == 1 for r in dev)
    # each joined example is 2..3 consecutive training pairs, verbatim, joined without a space after "。"
    order = [r["source"] for r in singles]
    covered = []
    for row in joined:
        sources = [s + "。" for s in row["source"].split("。")[:-1]]
        assert 2 <= len(sources) <= 3
        start = order.index(sources[0])
        assert order[start:start + len(sources)] == sources
        assert row["target"] == "".join({r["source"]: r["target"] for r in singles}[s] for s in sources)
        assert row["messages"][1]["content"] == row["source"] and row["messages"][2]["content"] == row["target"]
        covered += sources
    assert covered == order[:len(covered)] and len(order) - len(covered) <= 1  # a lone last pair is not joined
    # both directions of each joined pair, and the statistics say how many
    reverse = {(r["source"], r["target"]) for r in train if r["direction"] == "reverse"}
    assert all((r["target"], r["source"]) in reverse for r in joined)
    stats = manifest["metrics"]
    assert stats["joined_pairs"]["pairs"] == len(joined) and stats["examples"]["train"] == len(train)
    assert stats["joined_pairs"]["source_length"]["max"] <= 3 * max(len(s) for s in order)
    # the same config gives the same groups
    again = prepare(cfg(join_pairs=3, direction="both"), corpus, tmp_path / "again")
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert again["metrics"]["joined_pairs"] == stats["joined_pairs"]


def test_join_pairs_respects_max_length_and_separator(tmp_path):
    rows = [f"sentence {i}.\tphrase {i}.\tx\n" for i in range(30)]
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(rows))
    prepare(cfg(join_pairs=6, max_length=30, dev_fraction=0.0), corpus, tmp_path / "p")
    train = read_jsonl(tmp_path / "p" / "train.jsonl")
    joined = [r for r in train if r["source"].count(".") > 1]
    assert joined and all(len(r["source"]) <= 30 and len(r["target"]) <= 30 for r in joined)
    assert all(" sentence" in r["source"] and "  " not in r["source"] for r in joined)  # a space after "."
    prepare(cfg(join_pairs=2, join_separator=" | ", dev_fraction=0.0), corpus, tmp_path / "s")
    joined = [r for r in read_jsonl(tmp_path / "s" / "train.jsonl") if " | " in r["source"]]
    assert len(joined) == 15 and joined[0]["source"] == "sentence 0. | sentence 1."


def test_join_pairs_must_be_positive():
    assert any("prep.join_pairs" in p for p in cfg(join_pairs=0).problems())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_rerun_with_a_changed_corpus_is_no_no_op(tmp_path):
    """Issue 18, item 1: the no-op check compares the input's sha256 too, not only the config."""
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(ROWS[:20]))
    out = tmp_path / "o"
    first = prepare(cfg(), corpus, out)
    write(corpus, HEADER + "".join(ROWS))  # rows appended, same path, same config
    with pytest.raises(ArtifactError, match=r"from other inputs \(.*c.tsv changed \(sha256 .*Pass --force"):
        prepare(cfg(), corpus, out)
    assert prepare(cfg(), corpus, out, force=True)["metrics"]["pairs_kept"] == 40 != first["metrics"]["pairs_kept"]
    assert prepare(cfg(), corpus, out)["metrics"]["pairs_kept"] == 40  # unchanged again: a no-op


def test_force_with_a_bad_corpus_keeps_the_finished_output(tmp_path):
    """Issue 18, item 2: `prep bad.tsv --out D --force` validates and builds beside D; D is kept on failure."""
    good = write(tmp_path / "good.tsv", HEADER + "".join(ROWS))
    bad = write(tmp_path / "bad.tsv", HEADER + ROWS[0] + "只有一欄\n")
    out = tmp_path / "o"
    prepare(cfg(), good, out)
    before = _files(out)
    with pytest.raises(DataError, match="expected 3 tab-separated columns"):
        prepare(cfg(), bad, out, force=True)
    assert _files(out) == before  # every file, the manifest included, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "good.tsv", "o"]  # no partial build left
    replaced = prepare(cfg(seed=3), good, out, force=True)  # a good forced run replaces D
    assert json.loads((out / "manifest.json").read_text())["created"] == replaced["created"]
    assert replaced["config"]["seed"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.tsv", "good.tsv", "o"]


BAD_JSONL = [
    ("messages not a list", {"messages": "hi"}, "`messages`: expected a list of objects, found a string",
     "invalid_messages"),
    ("messages holding non-objects", {"messages": [{"role": "user", "content": "Q"}, "A", 3]},
     "`messages` item 2: expected an object", "invalid_messages"),
    ("a number as the user text", {"user": 123, "final": "x"}, "field user: expected a string, found the number 123",
     "invalid_field"),
    ("a list as the message content", {"messages": [{"role": "user", "content": ["Q"]},
                                                    {"role": "assistant", "content": "A"}]},
     "the user message's content: expected a string, found a list", "invalid_field"),
    ("analysis not text", {"user": "Q", "final": "A", "analysis": {"x": 1}},
     "field analysis: expected a string, found an object", "invalid_field"),
    ("lone surrogate", {"user": "a\ud800b", "final": "A"}, "field user holds a lone surrogate", "invalid_text"),
    ("blank text", {"user": "  ", "final": "A"}, "field user is empty", "empty_field"),
]


@pytest.mark.parametrize("name,row,message,reason", BAD_JSONL, ids=[b[0] for b in BAD_JSONL])
def test_bad_recipe_rows_are_named_by_what_is_wrong(tmp_path, name, row, message, reason):
    good = json.dumps({"user": "Hi", "final": "Hello"})
    corpus = write(tmp_path / "r.jsonl", good + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        prepare(cfg(), corpus, tmp_path / "o")
    assert str(err.value).startswith(f"{corpus}:2: {message}")
    assert str(err.value).endswith("Fix the line or pass --skip-bad-lines.")
    m = prepare(cfg(skip_bad_lines=True, dev_fraction=0.0), corpus, tmp_path / "skipped")
    assert m["metrics"]["dropped"] == {f"bad_{reason}": 1} and m["metrics"]["pairs_kept"] == 1


def test_lone_cr_line_ends_are_named(tmp_path):
    corpus = write(tmp_path / "mac.tsv", (HEADER + "".join(ROWS[:3])).replace("\n", "\r"))
    with pytest.raises(DataError, match=r"mac.tsv:1: holds a carriage return \(CR\).*classic Mac line ends") as err:
        prepare(cfg(), corpus, tmp_path / "o")
    assert "header" not in str(err.value)
    # a CRLF file whose last line lacks the LF is fine
    corpus = write(tmp_path / "crlf.tsv", (HEADER + "".join(ROWS[:3])).replace("\n", "\r\n")[:-1])
    assert prepare(cfg(dev_fraction=0.0), corpus, tmp_path / "o2")["metrics"]["pairs_kept"] == 3


def test_no_training_pairs_names_the_cause(tmp_path):
    corpus = write(tmp_path / "c.tsv", HEADER + "".join(ROWS))
    with pytest.raises(DataError) as err:
        prepare(cfg(dev_fraction=0.999999), corpus, tmp_path / "o")
    msg = str(err.value)
    assert "--dev-fraction 0.999999 put every kept pair into the dev split (40 dev examples)" in msg
    assert "--max-length" not in msg and "--skip-bad-lines" not in msg and "--src" not in msg
    dev = write(tmp_path / "dev.tsv", HEADER + "".join(ROWS))
    with pytest.raises(DataError, match="each of the 40 pairs is also in --dev-file"):
        prepare(cfg(dev_file=str(dev)), corpus, tmp_path / "o2")
