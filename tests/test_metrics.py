"""Metric plumbing against sacrebleu's own CLI, the copy baseline on the held-out set, and the
reasoning-language check."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from toolkit import metrics

# Fixed strings: Han with an Extension B character (𪜶), Latin in Han, an empty hypothesis.
REFS = ["今仔日天氣真好。", "伊講𪜶欲來。", "我來矣。", "Cheney宣佈了後，全體參眾議員徛起來拍噗仔致敬。", "這是一本冊。"]
HYPS = ["今天天氣很好。", "伊講𪜶欲來。", "", "錢尼宣佈之後，全體參眾議員起立鼓掌致敬。", "這是一本書。"]
OTHER = ["今仔日天氣好。", "伊講𪜶beh來。", "我來。", "Cheney宣佈了後，全體議員徛起來致敬。", "這是冊。"]

CLI_ARGS = {
    "bleu": ["-m", "bleu", "-tok", "zh"],
    "bleu_char": ["-m", "bleu", "-tok", "char"],
    "chrf": ["-m", "chrf"],
    "chrf_pp": ["-m", "chrf", "--chrf-word-order", "2"],
    "ter": ["-m", "ter", "--ter-normalized", "--ter-asian-support"],
}


def sacrebleu_cli(tmp_path: Path, hyps: list[str], refs: list[str], *args: str) -> list | dict:
    ref_file, hyp_file = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref_file.write_text("\n".join(refs) + "\n", encoding="utf-8")
    hyp_file.write_text("\n".join(hyps) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(hyp_file), "-f", "json", "-w", "6", *args],
        capture_output=True, text=True, check=True, env={"SACREBLEU_SEED": "12345", "PATH": "/usr/bin:/bin"},
    )
    return json.loads(proc.stdout)


@pytest.mark.parametrize("key", metrics.METRIC_KEYS)
def test_scores_and_signatures_match_sacrebleu_cli(tmp_path, key):
    ours = metrics.score(HYPS, REFS, n_bootstrap=1)[key]
    cli = sacrebleu_cli(tmp_path, HYPS, REFS, *CLI_ARGS[key])
    assert ours["score"] == pytest.approx(cli["score"], abs=1e-6)
    assert ours["signature"] == cli["signature"]
    assert ours["ci"] is None


@pytest.mark.parametrize("key", ["bleu", "chrf", "ter"])
def test_bootstrap_confidence_matches_sacrebleu_cli(tmp_path, key):
    ours = metrics.score(HYPS, REFS, n_bootstrap=1000)[key]
    cli = sacrebleu_cli(tmp_path, HYPS, REFS, *CLI_ARGS[key], "--confidence")
    assert ours["signature"] == cli["signature"]
    assert "bs:1000|seed:12345" in ours["signature"]
    assert ours["mean"] == pytest.approx(cli["confidence_mean"], abs=1e-6)
    assert ours["ci"] == pytest.approx(cli["confidence_var"], abs=1e-6)


def test_char_bleu_sees_extension_b_where_zh_tokenizer_does_not():
    # The zh tokenizer glues 𪜶 to its Latin/unknown neighbours; char-level BLEU splits every character.
    ref, hyp = ["𪜶𪜶𪜶𪜶𪜶 欲來"], ["𪜶𪜶𪜶𪜶 欲來"]
    scores = metrics.score(hyp, ref, n_bootstrap=1)
    assert scores["bleu_char"]["score"] > scores["bleu"]["score"]


def test_paired_bootstrap_matches_sacrebleu_cli(tmp_path):
    refs, base, system = REFS * 8, HYPS * 8, OTHER * 8
    ours = metrics.paired(base, system, refs)["bleu"]
    ref_file, b_file, s_file = tmp_path / "ref.txt", tmp_path / "baseline.txt", tmp_path / "system.txt"
    for path, lines in ((ref_file, refs), (b_file, base), (s_file, system)):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(b_file), str(s_file), "-m", "bleu",
         "-tok", "zh", "--paired-bs", "-f", "json"],
        capture_output=True, text=True, check=True, env={"SACREBLEU_SEED": "12345", "PATH": "/usr/bin:/bin"},
    )
    cli_base, cli_sys = json.loads(proc.stdout)
    assert ours["baseline"] == pytest.approx(cli_base["BLEU"]["score"])
    assert ours["system"] == pytest.approx(cli_sys["BLEU"]["score"])
    assert ours["p_value"] == pytest.approx(cli_sys["BLEU"]["p_value"])
    assert ours["ci"] == pytest.approx(cli_sys["BLEU"]["ci"])
    assert ours["delta"] == pytest.approx(ours["system"] - ours["baseline"])
    assert "bs:1000" in ours["signature"] and "tok:zh" in ours["signature"]


def test_paired_many_gives_each_system_its_pairwise_result():
    refs, base = REFS * 6, HYPS * 6
    systems = {"other": OTHER * 6, "same": HYPS * 6, "refs": REFS * 6}
    many = metrics.paired_many(base, systems, refs, n_samples=300)
    assert list(many) == ["other", "same", "refs"]
    for name, hyps in systems.items():
        assert many[name] == metrics.paired(base, hyps, refs, n_samples=300), name
    assert many["refs"]["chrf"]["delta"] > 0 and many["same"]["chrf"]["p_value"] == 1.0
    assert metrics.paired_many(base, {}, refs) == {}


def test_sentence_statistics_are_computed_once_per_system(monkeypatch):
    refs, base, system = REFS * 5, HYPS * 5, OTHER * 5
    calls = []
    extract = sacrebleu.TER._extract_corpus_statistics

    def counting(self, hypotheses, references):
        calls.append(tuple(hypotheses))
        return extract(self, hypotheses, references)

    monkeypatch.setattr(sacrebleu.TER, "_extract_corpus_statistics", counting)
    metrics._STATS_CACHE.clear()
    first = metrics.score(system, refs, n_bootstrap=100)["ter"]
    paired = metrics.paired(base, system, refs, n_samples=100)["ter"]
    again = metrics.paired_many(system, {"base": base}, refs, n_samples=100)["base"]["ter"]
    assert sorted(calls) == sorted([tuple(system), tuple(base)])  # each once, though used three times
    assert paired["system"] == first["score"] and again["baseline"] == first["score"]
    assert "nrefs:1" in paired["signature"] and "nrefs:1" in again["signature"]  # set on a cache hit too


def test_paired_identical_systems_are_not_significant():
    result = metrics.paired(HYPS * 4, HYPS * 4, REFS * 4, n_samples=200)
    for key in metrics.METRIC_KEYS:
        assert result[key]["delta"] == 0
        assert result[key]["p_value"] == 1.0


def test_copy_baseline_reproduces_heldout_numbers(heldout):
    with heldout.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 2000
    hyps = metrics.copy_hypotheses([r["zh"] for r in rows])
    scores = metrics.score(hyps, [r["nan"] for r in rows], n_bootstrap=1, keys=("bleu", "chrf"))
    assert round(scores["bleu"]["score"], 1) == 66.2
    assert round(scores["chrf"]["score"], 1) == 59.2
    assert "tok:zh" in scores["bleu"]["signature"]


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("The user wants a Taiwanese translation of 天氣.", "English", True),
        ("使用者要翻譯成台語，𪜶是他們。", "English", False),
        ("使用者要翻譯成台語，𪜶是他們。", "Chinese", True),
        ("使用者要翻譯成台語", "Mandarin Chinese (Traditional)", True),
        ("The user wants", "Chinese", False),
        ("これは翻訳です", "Japanese", True),
        ("12345 ... !!", "English", None),  # no letters: not checkable
        ("whatever", "Klingon", None),  # no script known for the language
    ],
)
def test_in_language(text, language, expected):
    assert metrics.in_language(text, language) is expected


def test_reasoning_compliance_counts():
    analyses = ["We translate the sentence.", "翻譯這句話。", None, "", "Short answer."]
    result = metrics.reasoning_compliance(analyses, "English")
    assert result["with_analysis"] == 3
    assert result["checked"] == 3
    assert result["compliant"] == 2
    assert result["share"] == pytest.approx(2 / 3)
    assert metrics.reasoning_compliance([None, ""], "English")["share"] is None


def test_bootstrap_survives_zero_bleu_resamples():
    # Resamples scoring chrF 0 (a plain float among numpy float32s) made sacrebleu 2.6.0's own
    # corpus_score(n_bootstrap=...) raise TypeError in statistics.mean.
    refs, hyps = ["今仔日天氣真好。"] * 3 + ["伊講𪜶欲來。"], ["x"] * 3 + ["伊講𪜶欲來。"]
    for key, result in metrics.score(hyps, refs, n_bootstrap=200).items():
        assert 0.0 <= result["mean"] <= 100.0, key
        assert result["ci"] >= 0.0, key


def test_scoring_leaves_sacrebleu_as_it_found_it(monkeypatch):
    import logging

    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    logger = logging.getLogger("sacrebleu")
    monkeypatch.setattr(logger, "level", logging.DEBUG)  # a program's own choice
    extract = sacrebleu.CHRF._extract_corpus_statistics
    seen, corpus_score = [], metrics._corpus_score

    def recording(*args):
        seen.append((os.environ.get("SACREBLEU_SEED"), logger.level))
        return corpus_score(*args)

    monkeypatch.setattr(metrics, "_corpus_score", recording)
    metrics.score(HYPS, REFS, keys=("chrf",))
    assert seen == [(str(metrics.SEED), logging.WARNING)]  # pinned and quiet while scoring
    result = metrics.paired(HYPS, HYPS[::-1], REFS, n_samples=20)
    assert result["chrf"]["p_value"] <= 1
    assert "SACREBLEU_SEED" not in os.environ and logger.level == logging.DEBUG
    assert sacrebleu.CHRF._extract_corpus_statistics is extract  # the statistics cache sits on our objects only
    assert "_extract_corpus_statistics" not in vars(sacrebleu.CHRF())
    monkeypatch.setenv("SACREBLEU_SEED", "7")  # a user's seed wins, and stays
    seen.clear()
    metrics.score(HYPS, REFS, keys=("chrf",))
    assert seen == [("7", logging.WARNING)] and os.environ["SACREBLEU_SEED"] == "7"


def test_compliance_leaves_quoted_term_pairs_out():
    english = "Words that change: 東西 → 物件; 便宜 → 俗; 今仔日 → 今天; 歹勢 → 不好意思."
    mandarin = "要換的詞：東西 → 物件; 便宜 → 俗。"
    assert metrics.in_language(english, "English") is False  # the terms alone outnumber the English words
    assert metrics.reasoning_compliance([english, mandarin], "English")["compliant"] == 1
    assert metrics.reasoning_compliance([english, mandarin], "Mandarin")["compliant"] == 1
