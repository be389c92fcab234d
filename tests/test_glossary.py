"""Glossaries: reading the three formats, longest-first matching without overlaps, the analysis and hint texts,
prep's annotation of examples, and term accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit import glossary
from toolkit.config import PrepConfig
from toolkit.errors import DataError
from toolkit.glossary import Glossary

ITAIGI_HEADER = '"DictWordID","PojUnicode","PojInput","KipUnicode","KipInput","HanLoTaibunPoj","HanLoTaibunKip",' \
                '"HoaBun","DataProvidedBy"\n'
MOE_HEADER = "序號,方言差編碼,詞目,鹿港,三峽,臺北,宜蘭,臺南,高雄,金門,馬公,新竹,臺中\n"


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_reads_a_tsv_with_named_columns_and_merges_rows(tmp_path):
    g = glossary.read(write(tmp_path / "g.tsv", "note\tzh\tnan\nx\t東西\t物件\ny\t東西\t物\nz\t電腦\t電腦\n"))
    assert g.entries == {"東西": ["物件", "物"]}  # 電腦 → 電腦 teaches nothing: dropped


def test_reads_a_csv_with_source_and_target_columns(tmp_path):
    g = glossary.read(write(tmp_path / "g.csv", 'source,target\n"便宜","俗"\n'))
    assert g.entries == {"便宜": ["俗"]}


def test_reads_itaigi_as_it_ships(tmp_path):
    text = ITAIGI_HEADER + '"1","","","","","𤺪呢","𤺪呢","討厭","x"\n"2","","","","","","馬仔英九/馬英九","馬英九","x"\n'
    g = glossary.read(write(tmp_path / "itaigi.csv", text, bom=True))
    assert g.entries == {"討厭": ["𤺪呢"], "馬英九": ["馬仔英九"]}  # a/b cells are two forms; identical dropped


def test_reads_the_moe_table_as_it_ships_most_common_form_first(tmp_path):
    places = ['"病院\u3000pīnn-īnn, 醫生館\u3000i-sing-kuán"'] * 2 + ['"醫生館\u3000i-sing-kuán, 病院\u3000pīnn-īnn"'] * 3 \
        + ["醫院\u3000i-īnn"] + ["醫生館\u3000i-sing-kuán"] * 4
    g = glossary.read(write(tmp_path / "moe.csv", MOE_HEADER + "1,[方1]0001,醫院," + ",".join(places) + "\n"))
    assert g.entries == {"醫院": ["醫生館", "病院"]}


def test_shipped_lexicons_read_the_other_way_for_nan_to_zh_columns(tmp_path):
    path = write(tmp_path / "itaigi.csv", ITAIGI_HEADER + '"1","","","","","物件","物件","東西","x"\n')
    assert glossary.read(path, "nan", "zh").entries == {"物件": ["東西"]}


@pytest.mark.parametrize("text, message", [
    ("a\tb\n東西\t物件\n", "expected a header naming the columns zh and nan"),
    ("zh\tnan\n東西\n", "g.tsv:2: expected 2 columns"),
    ("", "empty glossary file"),
])
def test_bad_glossary_files_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        glossary.read(write(tmp_path / "g.tsv", text))


def test_missing_or_non_utf8_file(tmp_path):
    with pytest.raises(DataError, match="no such glossary file"):
        glossary.read(tmp_path / "nope.tsv")
    (tmp_path / "latin1.tsv").write_bytes("zh\tnan\n\xe9\t\xe8\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        glossary.read(tmp_path / "latin1.tsv")


def test_the_shipped_lexicons_load_when_present():
    root = Path(__file__).resolve().parents[1].parent / "shared" / "lexicons"
    paths = [root / "itaigi" / "ChhoeTaigi_iTaigiHoataiTuichiautian.csv", root / "moe-dialect-words" / "詞彙方言差.csv"]
    if not all(p.is_file() for p in paths):
        pytest.skip("../shared/lexicons is not on this machine")
    g = glossary.load(paths)
    assert len(g) > 10_000 and "物件" in g.entries["東西"] and "病院" in g.entries["醫院"]


# ---- matching -----------------------------------------------------------------------------------

G = Glossary({"東西": ["物件", "物"], "便宜": ["俗"], "便": ["利"], "買東西": ["買物件"], "很": ["真"], "他": ["伊"]})


def test_attested_is_longest_first_without_overlaps():
    assert G.attested("他買東西很便宜", "伊買物件真俗") == [("他", "伊"), ("買東西", "買物件"), ("很", "真"),
                                                            ("便宜", "俗")]
    # 東西 alone: its longest form first; 便 is inside 便宜, already taken
    assert G.attested("東西便宜", "物件俗") == [("東西", "物件"), ("便宜", "俗")]


def test_attested_needs_the_form_in_the_target():
    assert G.attested("這東西很便宜", "這个物件誠俗") == [("東西", "物件"), ("便宜", "俗")]
    assert G.attested("這東西", "這个") == []


def test_target_spans_do_not_overlap_either():
    g = Glossary({"甲乙": ["物件"], "丙": ["物"]})
    assert g.attested("甲乙丙", "物件") == [("甲乙", "物件")]  # 物 is inside the 物件 already used
    assert g.attested("甲乙丙", "物件物") == [("甲乙", "物件"), ("丙", "物")]


def test_entries_in_text_and_the_reverse_direction():
    assert G.entries_in("買東西很便宜") == [("買東西", ["買物件"]), ("很", ["真"]), ("便宜", ["俗"])]
    assert G.reversed().attested("伊真俗", "他很便宜") == [("伊", "他"), ("真", "很"), ("俗", "便宜")]
    assert G.reversed().reversed() is G


def test_merged_keeps_the_first_glossary_forms_first():
    mine = Glossary({"東西": ["貨"]})
    assert mine.merged(G).entries["東西"] == ["貨", "物件", "物"] and len(mine.merged(G)) == len(G)


def test_analysis_and_hint_texts():
    pairs = G.attested("東西便宜", "物件俗")
    assert glossary.analysis_text(pairs, glossary.analysis_template("English")) == "Words that change: 東西 → 物件; 便宜 → 俗."
    assert glossary.analysis_template("Mandarin Chinese (Traditional)") == "要換的詞：{terms}。"
    assert glossary.analysis_template("Klingon") is None
    assert glossary.hint_text(G.entries_in("東西"), "G: {terms}") == "G: 東西 → 物件 / 物"
    assert glossary.hint_text([], "G: {terms}") is None


# ---- prep annotation ----------------------------------------------------------------------------

def annotator(**overrides) -> glossary.Annotator:
    cfg = PrepConfig(glossary=["x"], **overrides)
    return glossary.Annotator(G, cfg, glossary.analysis_template(cfg.reasoning_language))


def test_annotator_writes_longest_terms_up_to_the_limit_in_source_order():
    a = annotator(glossary_max_terms=2)
    analysis, hint = a.annotate("forward", "他買東西很便宜", "伊買物件真俗")
    assert analysis == "Words that change: 買東西 → 買物件; 便宜 → 俗." and hint is None
    analysis, _ = a.annotate("reverse", "伊買物件真俗", "他買東西很便宜")
    assert analysis == "Words that change: 伊 → 他; 買物件 → 買東西."  # ties in length: the first in the source
    stats = a.stats(["x"], len(G))
    assert stats["examples"] == 2 and stats["share_with_terms"] == 1.0 and stats["terms_per_example"] == 4.0
    assert ["他 → 伊", 1] in stats["top_terms"] and stats["with_analysis"] == 2


def test_annotator_hints_attested_entries_and_distractors_that_are_not():
    a = annotator(glossary_analysis_share=0.0, glossary_hint_share=1.0, glossary_hint_distractors=1)
    analysis, hint = a.annotate("forward", "他很便宜", "伊誠俗")  # 很 → 真 is in the source, not in the target
    assert analysis is None
    assert hint == "Glossary (use an entry where it fits the text): 他 → 伊; 很 → 真; 便宜 → 俗"
    _, no_distractor = annotator(glossary_analysis_share=0.0, glossary_hint_share=1.0,
                                 glossary_hint_distractors=0).annotate("forward", "他很便宜", "伊誠俗")
    assert "很" not in no_distractor


def test_a_hint_always_shows_the_attested_form():
    g = Glossary({"甲": ["一", "二", "三", "四", "五"]})
    cfg = PrepConfig(glossary=["x"], glossary_hint_share=1.0)
    _, hint = glossary.Annotator(g, cfg, None).annotate("forward", "甲", "五")
    assert hint.endswith("甲 → 一 / 二 / 三 / 五")


def test_annotator_shares_are_seeded_and_respected():
    def run(seed):
        a = annotator(glossary_analysis_share=0.5, seed=seed)
        return [a.annotate("forward", "東西", "物件")[0] is not None for _ in range(400)]

    assert run(1) == run(1) and run(1) != run(2)
    assert 150 < sum(run(1)) < 250


def test_term_scores():
    hyps = ["伊買物件真俗", "他買東西"]
    scores = glossary.term_scores(G, ["他買東西很便宜", "東西"], ["伊買物件真俗", "物件"], hyps,
                                  hints=[G.entries_in("他買東西很便宜"), G.entries_in("東西")])
    assert (scores["reference_terms"], scores["reference_terms_produced"]) == (5, 4)
    assert scores["reference_term_accuracy"] == 0.8
    assert (scores["hinted"], scores["hinted_produced"], scores["hint_accuracy"]) == (5, 4, 0.8)
    assert json.dumps(scores)  # JSON as it is


# ---- prep, train and the backends: the analysis reaches the model in both chat formats ----------

def _prep(tmp_path, **overrides) -> Path:
    from toolkit.corpus import prepare

    corpus = write(tmp_path / "c.tsv", "zh\tnan\n" + "".join(f"這東西很便宜{i}。\t這物件真俗{i}。\n" for i in range(30)))
    lex = write(tmp_path / "g.tsv", "zh\tnan\n東西\t物件\n便宜\t俗\n很\t真\n他\t伊\n")
    cfg = PrepConfig(length_unit="chars", dev_fraction=0.0, direction="both", glossary=[str(lex)], **overrides)
    prepare(cfg, corpus, tmp_path / "prep")
    return tmp_path / "prep"


def test_prep_writes_the_analysis_and_stats(tmp_path):
    prep = _prep(tmp_path)
    rows = [json.loads(line) for line in (prep / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    fwd, rev = rows[0], rows[1]
    assert fwd["messages"][-1]["thinking"] == "Words that change: 東西 → 物件; 很 → 真; 便宜 → 俗."
    assert rev["messages"][-1]["thinking"] == "Words that change: 物件 → 東西; 真 → 很; 俗 → 便宜."
    assert "Glossary" not in fwd["messages"][0]["content"]  # hint share 0 by default
    stats = json.loads((prep / "stats.json").read_text(encoding="utf-8"))["glossary"]
    assert stats["examples"] == 60 and stats["share_with_terms"] == 1.0 and stats["terms_per_example"] == 3.0
    assert stats["with_analysis"] == 60 and stats["top_terms"][0][1] == 30
    manifest = json.loads((prep / "manifest.json").read_text(encoding="utf-8"))
    assert any(i["path"].endswith("g.tsv") for i in manifest["inputs"])  # a changed glossary is a new prep


def test_prep_hints_go_into_the_system_message_in_the_mandarin_template(tmp_path):
    prep = _prep(tmp_path, reasoning_language="Mandarin", glossary_hint_share=1.0, glossary_analysis_share=1.0)
    row = json.loads((prep / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert row["messages"][0]["content"].endswith(
        "\n\nGlossary (use an entry where it fits the text): 東西 → 物件; 很 → 真; 便宜 → 俗")
    assert row["messages"][-1]["thinking"] == "要換的詞：東西 → 物件; 很 → 真; 便宜 → 俗。"


def test_analysis_reaches_chat_template_models_and_comes_back_apart(tmp_path):
    from toolkit import backends, harmony, train

    prep = _prep(tmp_path)
    rows = train.read_examples(prep / "train.jsonl", limit=1)
    (pair,) = train.to_pairs(rows, "template", {})
    answer = pair["completion"][0]["content"]
    assert answer == "<think>\nWords that change: 東西 → 物件; 很 → 真; 便宜 → 俗.\n</think>\n\n這物件真俗0。"
    out = backends.to_translation(answer, harmony_model=False, stopped=True, tokens=9, latency_s=0.0)
    analysis = "Words that change: 東西 → 物件; 很 → 真; 便宜 → 俗."
    assert (out.text, out.analysis, out.complete) == ("這物件真俗0。", analysis, True)
    cut = backends.to_translation("<think>\nWords", harmony_model=False, stopped=False, tokens=3, latency_s=0.0)
    assert (cut.text, cut.complete) == ("", False)
    (harmony_pair,) = train.to_pairs(rows, "harmony", {})
    assert harmony_pair["completion"].startswith("<|channel|>analysis<|message|>Words that change: 東西 → 物件")
    assert harmony.parse(harmony_pair["completion"]).final == "這物件真俗0。"


def test_prep_refuses_an_unknown_reasoning_language_without_a_template():
    from toolkit import config

    with pytest.raises(Exception, match="prep.analysis_template: no shipped analysis template"):
        config.build("prep", overrides=["prep.glossary=['g.tsv']", "prep.reasoning_language=Klingon"])
    assert config.build("prep", overrides=["prep.glossary=['g.tsv']", "prep.reasoning_language=Klingon",
                                           "prep.glossary_analysis_share=0"]).glossary == ["g.tsv"]


def test_cli_glossary_option_is_repeatable_and_checked(tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    corpus = write(tmp_path / "c.tsv", "zh\tnan\n這東西很便宜。\t這物件真俗。\n他來了。\t伊來矣。\n")
    lex = write(tmp_path / "g.tsv", "zh\tnan\n東西\t物件\n")
    more = write(tmp_path / "h.csv", "source,target\n他,伊\n")
    runner = CliRunner()
    missing = runner.invoke(main, ["prep", str(corpus), "--glossary", str(tmp_path / "nope.tsv"), "--out",
                                   str(tmp_path / "bad")])
    assert missing.exit_code == 2 and "nope.tsv: no such glossary file" in missing.output
    ok = runner.invoke(main, ["prep", str(corpus), "--glossary", str(lex), "--glossary", str(more), "--length-unit",
                              "chars", "--dev-fraction", "0", "--out", str(tmp_path / "prep")])
    assert ok.exit_code == 0, ok.output
    stats = json.loads((tmp_path / "prep" / "stats.json").read_text(encoding="utf-8"))["glossary"]
    assert stats["terms"] == 2 and stats["examples"] == 2 and stats["share_with_terms"] == 1.0
