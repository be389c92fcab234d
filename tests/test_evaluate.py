"""`toolkit eval`: output files, counts, resume, no-op re-run, copy baseline, --compare, the CLI, and the
tiny gpt-oss end to end through transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit import backends, evaluate
from toolkit.cli import main
from toolkit.config import EvalConfig
from toolkit.errors import ArtifactError, DataError

FILES = {"predictions.jsonl", "scores.json", "report.md", "scores.png", "manifest.json"}
PAIRS = [("一朵花", "一蕊花"), ("形容人多嘴雜。", "十喙九尻川。"), ("今天天氣很好。", "今仔日天氣真好。"),
         ("他們要來。", "𪜶欲來。"), ("這是一本書。", "這是一本冊。"), ("我不知道。", "我毋知。"), ("謝謝你。", "多謝你。")]


@pytest.fixture
def tsv(tmp_path) -> Path:
    path = tmp_path / "test.tsv"
    path.write_text("zh\tnan\n" + "".join(f"{a}\t{b}\n" for a, b in PAIRS), encoding="utf-8")
    return path


class Scripted:
    """A translator that answers in Harmony: English analysis, then the source copied as the final,
    except for sentences with 花 (analysis only: no final) and 雜 (a Chinese analysis)."""

    name = "scripted"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.specs = []
        self.fail_after = fail_after

    def reply(self, text: str) -> str:
        if "花" in text:
            return "<|channel|>analysis<|message|>Thinking about flowers<|end|>"
        thought = "使用者要翻譯" if "雜" in text else "The user wants Taigi."
        return f"<|channel|>analysis<|message|>{thought}<|end|><|start|>assistant<|channel|>final<|message|>{text}<|return|>"

    def translate(self, texts, spec, *, max_new_tokens=256):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # killed mid-run
        self.calls.append(list(texts))
        self.specs.append(spec)
        return [backends.to_translation(self.reply(t), harmony_model=True, stopped=True, tokens=5, latency_s=0.01)
                for t in texts]

    def health(self) -> bool:
        return True


def cfg(**kw) -> EvalConfig:
    return EvalConfig(**{"batch_size": 2, "n_bootstrap": 50, **kw})


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_outputs_counts_and_scores(tsv, tmp_path):
    out = tmp_path / "eval"
    fake = Scripted()
    manifest = evaluate.run(cfg(), tsv, out, translator=fake)
    assert {p.name for p in out.iterdir()} == FILES | {"manifest.json"}
    assert {o["path"] for o in manifest["outputs"]} == FILES - {"manifest.json"}
    assert manifest["stage"] == "eval" and manifest["inputs"][0]["path"] == str(tsv)
    assert [len(c) for c in fake.calls] == [2, 2, 2, 1]

    rows = read_rows(out)
    assert [r["source"] for r in rows] == [a for a, _ in PAIRS]
    assert [r["reference"] for r in rows] == [b for _, b in PAIRS]
    assert rows[0]["hypothesis"] == "" and rows[0]["analysis"] == "Thinking about flowers" and not rows[0]["complete"]
    assert rows[1]["hypothesis"] == PAIRS[1][0] and rows[1]["analysis"] == "使用者要翻譯"
    assert {"line", "tokens", "latency_s", "raw"} <= rows[2].keys() and rows[2]["line"] == 4

    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    system = "transformers:scripted"
    assert list(scores["systems"]) == ["copy source", system]
    counts = scores["outputs"][system]
    assert (counts["sentences"], counts["empty_final"], counts["incomplete"], counts["with_analysis"]) == (7, 1, 1, 7)
    assert counts["reasoning_language"]["checked"] == 7
    assert counts["reasoning_language"]["compliant"] == 6  # the Chinese analysis is not English
    # Copying the source for 6 of 7 sentences scores just under the copy baseline.
    copy, ours = scores["systems"]["copy source"], scores["systems"][system]
    assert ours["chrf"]["score"] < copy["chrf"]["score"]
    assert scores["paired_vs_copy"][system]["chrf"]["delta"] == pytest.approx(
        ours["chrf"]["score"] - copy["chrf"]["score"])
    assert "bs:50" in ours["bleu"]["signature"]

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| copy source |" in report and f"| {system} |" in report and "tok:zh" in report
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["metrics"][system]["bleu"] == round(ours["bleu"]["score"], 2)


def test_rerun_is_a_noop_and_other_config_is_refused(tsv, tmp_path):
    out = tmp_path / "eval"
    first = evaluate.run(cfg(), tsv, out, translator=Scripted())
    again = Scripted()
    assert evaluate.run(cfg(), tsv, out, translator=again) == first
    assert again.calls == []
    with pytest.raises(ArtifactError, match="another config"):
        evaluate.run(cfg(limit=3), tsv, out, translator=Scripted())
    redone = Scripted()
    evaluate.run(cfg(limit=3), tsv, out, translator=redone, force=True)
    assert len(read_rows(out)) == 3 and sum(map(len, redone.calls)) == 3


def test_interrupted_eval_resumes(tsv, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(cfg(), tsv, out, translator=Scripted(fail_after=2))
    assert len(read_rows(out)) == 4 and not (out / "manifest.json").exists()
    # A kill while writing leaves a torn line: it is dropped and translated again.
    with (out / "predictions.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"line": 6, "source": "這是')
    resumed = Scripted()
    evaluate.run(cfg(), tsv, out, translator=resumed)
    assert resumed.calls == [[PAIRS[4][0], PAIRS[5][0]], [PAIRS[6][0]]]
    full = tmp_path / "full"
    evaluate.run(cfg(), tsv, full, translator=Scripted())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]
    assert strip(read_rows(out)) == strip(read_rows(full))
    assert (out / "manifest.json").is_file() and not (out / ".eval-state.json").exists()


def test_unfinished_folder_of_another_eval_is_refused(tsv, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(cfg(), tsv, out, translator=Scripted(fail_after=1))
    with pytest.raises(ArtifactError, match="not empty"):
        evaluate.run(cfg(max_new_tokens=9), tsv, out, translator=Scripted())
    # Same config but the predictions are for other sentences (the TSV changed in between).
    tsv.write_text("zh\tnan\n" + "".join(f"{b}\t{a}\n" for a, b in PAIRS), encoding="utf-8")
    (out / ".eval-state.json").unlink()
    with pytest.raises(ArtifactError, match="not empty"):
        evaluate.run(cfg(), tsv, out, translator=Scripted())


def test_direction_reverse_limit_and_columns(tsv, tmp_path):
    fake = Scripted()
    evaluate.run(cfg(direction="reverse", limit=3), tsv, tmp_path / "rev", translator=fake)
    rows = read_rows(tmp_path / "rev")
    assert [r["source"] for r in rows] == [b for _, b in PAIRS[:3]]
    assert [r["reference"] for r in rows] == [a for a, _ in PAIRS[:3]]
    assert fake.specs[0].source_name.startswith("Taiwanese") and fake.specs[0].target_name.startswith("Mandarin")
    with pytest.raises(DataError, match=r"test.tsv:1: expected a header naming the column\(s\) tl"):
        evaluate.run(cfg(target_column="tl"), tsv, tmp_path / "bad", translator=Scripted())
    with pytest.raises(DataError, match="no such file"):
        evaluate.run(cfg(), tmp_path / "nope.tsv", tmp_path / "bad", translator=Scripted())


def test_report_names_the_languages_of_the_run(tsv, tmp_path):
    from toolkit.prompt import PromptSpec

    spec = PromptSpec("Dutch", "West Frisian", "Translate {src} into {tgt}.", "English")
    evaluate.run(cfg(), tsv, tmp_path / "nl", translator=Scripted(), spec=spec)
    report = (tmp_path / "nl" / "report.md").read_text(encoding="utf-8")
    assert "how much Dutch and West Frisian text share" in report and "Mandarin" not in report
    evaluate.run(cfg(direction="reverse"), tsv, tmp_path / "fy", translator=Scripted(), spec=spec)
    assert "West Frisian and Dutch" in (tmp_path / "fy" / "report.md").read_text(encoding="utf-8")
    evaluate.baseline(cfg(), tsv, tmp_path / "copy")  # no model, no prompt: the test set's columns
    assert "how much zh and nan text share" in (tmp_path / "copy" / "report.md").read_text(encoding="utf-8")
    evaluate.compare([tmp_path / "copy", tmp_path / "nl"], tmp_path / "cmp", n_bootstrap=10)
    assert "Dutch and West Frisian" in (tmp_path / "cmp" / "report.md").read_text(encoding="utf-8")


def test_compare_runs(tsv, tmp_path):
    evaluate.run(cfg(), tsv, tmp_path / "a" / "eval", translator=Scripted())
    evaluate.baseline(cfg(), tsv, tmp_path / "copy")
    other = Scripted()
    other.reply = lambda text: f"<|channel|>final<|message|>{text[::-1]}<|return|>"
    evaluate.run(cfg(), tsv, tmp_path / "b" / "eval", translator=other)
    out = tmp_path / "cmp"
    manifest = evaluate.compare([tmp_path / "a" / "eval", tmp_path / "copy", tmp_path / "b" / "eval"], out,
                                n_bootstrap=50)
    assert {p.name for p in out.iterdir()} == FILES
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert list(scores["systems"]) == ["copy source", "a/eval", "b/eval"]
    assert list(scores["paired_vs_first"]) == ["b/eval"]
    side = read_rows(out)
    assert side[1]["hypotheses"] == {"a/eval": PAIRS[1][0], "b/eval": PAIRS[1][0][::-1]}
    assert scores["outputs"]["a/eval"]["empty_final"] == 1
    assert "Difference from the first run (a/eval)" in (out / "report.md").read_text(encoding="utf-8")
    assert manifest["config"]["compare"][0] == str(tmp_path / "a" / "eval")
    # Runs of different sentences cannot be compared.
    evaluate.run(cfg(limit=3), tsv, tmp_path / "short", translator=Scripted())
    with pytest.raises(DataError, match="other sentences"):
        evaluate.compare([tmp_path / "a" / "eval", tmp_path / "short"], tmp_path / "cmp2")
    with pytest.raises(ArtifactError, match="a comparison, not an eval run"):
        evaluate.compare([out, tmp_path / "a" / "eval"], tmp_path / "cmp3")


def test_cli_copy_baseline_reproduces_heldout(tmp_path, heldout):
    out = tmp_path / "copy"
    result = CliRunner().invoke(main, ["eval", "--baseline", "copy", str(heldout), "--out", str(out),
                                       "--n-bootstrap", "100", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["out"] == str(out)
    assert printed["metrics"]["copy source"]["bleu"] == pytest.approx(66.2, abs=0.05)
    assert printed["metrics"]["copy source"]["chrf"] == pytest.approx(59.2, abs=0.05)
    rows = read_rows(out)
    assert len(rows) == 2000 and all(r["hypothesis"] == r["source"] for r in rows)
    assert "| copy source | 66.2 ± " in (out / "report.md").read_text(encoding="utf-8")


def test_cli_usage_errors(tsv, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(tsv), str(tsv), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "expected one test TSV" in result.output
    result = runner.invoke(main, ["eval", "--compare", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--compare needs" in result.output
    result = runner.invoke(main, ["eval", str(tsv), "--backend", "ollama", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "needs --model NAME" in result.output
    result = runner.invoke(main, ["eval", str(tsv), "--model", "m", "--set", "eval.limit=-1", "--out", "x"])
    assert result.exit_code == 2 and "eval.limit" in result.output


def test_cli_end_to_end_tiny_gpt_oss_transformers(tiny_model, tsv, tmp_path):
    out = tmp_path / "tiny-eval"
    result = CliRunner().invoke(main, ["eval", str(tsv), "--model", str(tiny_model), "--limit", "4",
                                       "--max-new-tokens", "6", "--batch-size", "4", "--n-bootstrap", "20",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert {p.name for p in out.iterdir()} == FILES
    rows = read_rows(out)
    assert len(rows) == 4 and all(1 <= r["tokens"] <= 6 for r in rows)
    # The random model rarely closes a Harmony final in 6 tokens; whatever it did is counted, never a crash.
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    counts = scores["outputs"][f"transformers:{tiny_model.name}"]
    assert counts["sentences"] == 4
    assert counts["empty_final"] == sum(1 for r in rows if r["hypothesis"] == "")
    assert counts["incomplete"] == sum(1 for r in rows if not r["complete"])
    assert scores["prompt"]["reasoning_language"] == "English"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["model"] == str(tiny_model) and manifest["config"]["backend"] == "transformers"


@pytest.mark.llama
def test_cli_end_to_end_tiny_gguf_llama_cpp(tiny_gguf, tsv, tmp_path):
    out = tmp_path / "gguf-eval"
    result = CliRunner().invoke(main, ["eval", str(tsv), "--model", str(tiny_gguf), "--limit", "3",
                                       "--max-new-tokens", "6", "--n-bootstrap", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == FILES
    rows = read_rows(out)
    assert len(rows) == 3 and all(1 <= r["tokens"] <= 6 for r in rows)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["backend"] == "llama-cpp"  # chosen from the .gguf suffix
    counts = json.loads((out / "scores.json").read_text(encoding="utf-8"))["outputs"][f"llama-cpp:{tiny_gguf.name}"]
    assert counts["empty_final"] == sum(1 for r in rows if r["hypothesis"] == "")


def test_cli_copy_bias_reaches_the_backend_and_the_report(tiny_gguf, tsv, tmp_path):
    args = ["eval", str(tsv), "--model", str(tiny_gguf), "--limit", "2", "--max-new-tokens", "6",
            "--n-bootstrap", "20"]
    plain = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "plain")])
    biased = CliRunner().invoke(main, [*args, "--set", "eval.copy_bias=50", "--out", str(tmp_path / "biased")])
    assert plain.exit_code == 0 and biased.exit_code == 0, plain.output + biased.output
    manifest = json.loads((tmp_path / "biased" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["copy_bias"] == 50.0
    name = f"llama-cpp:{tiny_gguf.name} (copy_bias 50)"
    assert name in json.loads((tmp_path / "biased" / "scores.json").read_text(encoding="utf-8"))["systems"]
    assert name in (tmp_path / "biased" / "report.md").read_text(encoding="utf-8")
    assert [r["hypothesis"] for r in read_rows(tmp_path / "plain")] != [
        r["hypothesis"] for r in read_rows(tmp_path / "biased")]


def test_prep_split_as_test_set(sample_tsv, tmp_path):
    from toolkit import config, corpus

    prep = tmp_path / "prep"
    corpus.prepare(config.build("prep", None, [], direction="both", dev_fraction=0.1), sample_tsv, prep)
    dev = [json.loads(line) for line in (prep / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    for direction in ("forward", "reverse"):
        fake = Scripted()
        evaluate.run(cfg(direction=direction), prep / "dev.jsonl", tmp_path / direction, translator=fake)
        rows = read_rows(tmp_path / direction)
        wanted = [r for r in dev if r["direction"] == direction]
        assert [(r["source"], r["reference"]) for r in rows] == [(r["source"], r["target"]) for r in wanted]
        assert fake.specs[0].source_name.startswith("Mandarin" if direction == "forward" else "Taiwanese")


def test_failed_model_load_leaves_no_folder(tsv, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(ArtifactError, match="no such GGUF file"):
        evaluate.run(cfg(backend="llama-cpp", model=str(tmp_path / "missing.gguf")), tsv, out)
    assert not out.exists()
    evaluate.run(cfg(limit=2), tsv, out, translator=Scripted())  # a corrected command is not refused
    assert len(read_rows(out)) == 2


def test_bad_test_set_line_advises_no_option_eval_lacks(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("zh\tnan\n一\t二\t三\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["eval", "--baseline", "copy", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {bad}:2: expected 2 tab-separated columns (zh, nan), found 3. Fix the "
                                     "line: eval scores every row of a test set, so it skips none.")
    assert "--skip-bad-lines" not in result.output
    (tmp_path / "dev.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file \\(prep --dev-fraction 0 writes an empty dev.jsonl\\)"):
        evaluate.read_test_set(tmp_path / "dev.jsonl", "zh", "nan", "forward")


def test_a_sentence_beyond_the_context_window_names_its_line(tsv, tmp_path):
    class TooLong(Scripted):
        def translate(self, texts, spec, *, max_new_tokens=256):
            if "他們要來。" in texts:
                raise backends.PromptTooLong(texts.index("他們要來。"), 300, 256, "n_ctx")
            return super().translate(texts, spec, max_new_tokens=max_new_tokens)

    with pytest.raises(DataError, match=r"test.tsv:5: its prompt is 300 tokens, and the context window \(n_ctx\) "
                                        r"holds 256 tokens, the reply included: shorten the text, or raise n_ctx."):
        evaluate.run(cfg(model="m"), tsv, tmp_path / "o", translator=TooLong())


# ---- glossaries: hints in the prompt, term accuracy ------------------------------------------------

GLOSSARY = "zh\tnan\n今天\t今仔日\n很\t真\n不知道\t毋知\n謝謝\t多謝\n他們\t𪜶\n"


class FollowsHints:
    """A chat-template model that writes its source with every hinted term replaced by the term's first form."""

    name = "hints"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def translate(self, texts, spec, *, max_new_tokens=256):
        out = []
        for text in texts:
            self.prompts.append(spec.render_prompt(text))
            for term, forms in spec.hint_entries(text):
                text = text.replace(term, forms[0])
            out.append(backends.to_translation(f"<think>\nok\n</think>\n\n{text}", harmony_model=False, stopped=True,
                                               tokens=1, latency_s=0.0))
        return out

    def health(self) -> bool:
        return True


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_glossary_hints_reach_the_prompt_and_terms_are_scored(tsv, tmp_path, direction):
    lexicon = tmp_path / "g.tsv"
    lexicon.write_text(GLOSSARY, encoding="utf-8")
    fake = FollowsHints()
    evaluate.run(cfg(glossary=[str(lexicon)], direction=direction), tsv, tmp_path / "hinted", translator=fake)
    hint = "今天 → 今仔日; 很 → 真" if direction == "forward" else "今仔日 → 今天; 真 → 很"
    assert f"Glossary (use an entry where it fits the text): {hint}<|end|>" in fake.prompts[2]
    assert read_rows(tmp_path / "hinted")[2]["hint"] == f"Glossary (use an entry where it fits the text): {hint}"
    scores = json.loads((tmp_path / "hinted" / "scores.json").read_text(encoding="utf-8"))
    system, copy = scores["terms"]["transformers:hints"], scores["terms"][evaluate.COPY]
    assert (system["reference_terms"], system["reference_terms_produced"]) == (5, 5)
    assert (system["hinted"], system["hint_accuracy"], system["right_hint_accuracy"]) == (5, 1.0, 1.0)
    assert (copy["reference_terms"], copy["reference_terms_produced"]) == (5, 0) and "hinted" not in copy
    assert scores["outputs"]["transformers:hints"]["with_analysis"] == len(PAIRS)  # the <think> block, split off
    assert "Term accuracy" in (tmp_path / "hinted" / "report.md").read_text(encoding="utf-8")

    plain = FollowsHints()
    evaluate.run(cfg(glossary=[str(lexicon)], glossary_hints=False, direction=direction), tsv, tmp_path / "plain",
                 translator=plain)
    assert not any("Glossary" in p for p in plain.prompts)
    unhinted = json.loads((tmp_path / "plain" / "scores.json").read_text(encoding="utf-8"))["terms"]
    assert unhinted["transformers:hints"]["reference_terms_produced"] == 0 and "hinted" not in unhinted[
        "transformers:hints"]
    evaluate.compare([tmp_path / "hinted", tmp_path / "plain"], tmp_path / "cmp", n_bootstrap=1)
    compared = json.loads((tmp_path / "cmp" / "scores.json").read_text(encoding="utf-8"))["terms"]
    names = [n for n in compared if n != evaluate.COPY]
    assert compared[evaluate.COPY]["reference_terms"] == 5
    assert [compared[n].get("hint_accuracy") for n in names] == [1.0, None]


class Stopping(Scripted):
    """Scripted, with the first sentence at its token limit and the second cut for repeating."""

    def translate(self, texts, spec, *, max_new_tokens=256):
        self.calls.append(list(texts))
        why = {PAIRS[0][0]: "length", PAIRS[1][0]: "repetition"}
        return [backends.to_translation(t, harmony_model=False, stopped=t not in why, tokens=5, latency_s=0.01,
                                        stop=why.get(t), limit=9) for t in texts]


def test_outputs_at_their_limit_and_cut_loops_are_counted(tsv, tmp_path):
    out = tmp_path / "eval"
    evaluate.run(cfg(), tsv, out, translator=Stopping())
    rows = read_rows(out)
    assert [r["stop"] for r in rows[:3]] == ["length", "repetition", "end"] and rows[0]["limit"] == 9
    counts = json.loads((out / "scores.json").read_text(encoding="utf-8"))["outputs"]["transformers:scripted"]
    assert (counts["hit_limit"], counts["stopped_repetition"], counts["incomplete"]) == (1, 1, 2)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Hit token limit | Loop cut |" in report and "| 2 | 1 | 1 |" in report
