"""The command line through click's CliRunner: prep, errors as one line, a light --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolkit.cli import main


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from toolkit.cli import main; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for stage in ("prep", "train", "merge", "export", "eval", "serve"):
        assert f"toolkit {stage}" in result.output


def test_prep_writes_run_folder_and_prints_path(sample_tsv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["prep", str(sample_tsv), "--length-unit", "chars"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "export/sample/prep"
    assert (tmp_path / "export" / "sample" / "prep" / "manifest.json").is_file()
    again = runner.invoke(main, ["prep", str(sample_tsv), "--length-unit", "chars"])
    assert again.exit_code == 0 and again.stdout.strip() == "export/sample/prep"


def test_prep_options_and_json(sample_tsv, tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(main, [
        "prep", str(sample_tsv), "--out", str(out), "--direction", "both", "--reasoning-language", "中文",
        "--length-unit", "chars", "--set", "prep.dev_fraction=0.5", "--json",
    ])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["out"] == str(out)
    assert info["metrics"]["examples"]["train"] + info["metrics"]["examples"]["dev"] == 2 * 303
    assert 100 < info["metrics"]["examples"]["dev"] < 500  # a real 50% split, not 5%
    row = json.loads((out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert row["messages"][0]["content"].startswith("reasoning language: 中文\n\n")


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("zh\tnan\n一\t二\t三\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["prep", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:2: expected 2 tab-separated columns (zh, nan), found 3. Fix the line or pass --skip-bad-lines."
    ]
    assert "Traceback" not in result.output


def test_config_problems_are_reported_together(sample_tsv, tmp_path):
    result = CliRunner().invoke(main, ["prep", str(sample_tsv), "--out", str(tmp_path / "o"),
                                       "--set", "prep.nope=1", "--set", "prep.seed=abc", "--set", "bad"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("error: 3 config problem(s):")
    assert "prep.nope: unknown key" in line and "prep.seed: expected" in line and "--set 'bad'" in line


def test_failed_prep_leaves_no_run_folder_and_is_no_latest_run(sample_tsv, tmp_path, monkeypatch):
    """Issue 18, item 4: a failed prep with the default --out leaves nothing under export/, and an argument-less
    later stage never picks a folder without a finished stage as the latest run."""
    import os

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.tsv"
    bad.write_text("zh\tnan\n一\t二\t三\n", encoding="utf-8")
    assert CliRunner().invoke(main, ["prep", str(sample_tsv), "--length-unit", "chars"]).exit_code == 0
    result = CliRunner().invoke(main, ["prep", str(bad)])
    assert result.exit_code == 2 and "bad.tsv:2: expected 2 tab-separated columns" in result.stderr
    assert os.listdir(tmp_path / "export") == ["sample"]
    (tmp_path / "export" / "crashed" / "train").mkdir(parents=True)  # e.g. a stage killed before any file
    os.utime(tmp_path / "export" / "crashed", (2e9, 2e9))  # the newest folder under export/
    result = CliRunner().invoke(main, ["merge"])
    assert result.exit_code == 2 and "export/sample/train: no such folder" in result.stderr


@pytest.mark.slow
@pytest.mark.llama
def test_run_chains_every_stage_and_is_a_no_op_when_finished(tiny_model, sample_tsv, tmp_path, monkeypatch):
    """`toolkit run` on the tiny gpt-oss: prep -> train -> merge -> export -> eval in export/RUN/."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by the [export] extra")
    monkeypatch.chdir(tmp_path)
    args = ["run", str(sample_tsv), "--run", "demo", "--config", "tiny-cpu",
            "--set", f"train.base_model={json.dumps(str(tiny_model))}", "--set", "train.max_steps=2",
            "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8", "--set", "eval.n_bootstrap=1",
            "--set", "export.quants=['Q8_0']", "--set", "export.ollama_gguf='Q8_0'"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:5] == [f"{s}\texport/demo/{s}" for s in ("prep", "train", "merge", "export", "eval")]
    assert any(line.startswith("eval: llama-cpp:demo-Q8_0.gguf: BLEU") and "(copy " in line for line in lines)
    for stage in ("prep", "train", "merge", "export", "eval"):
        assert (tmp_path / "export" / "demo" / stage / "manifest.json").is_file()
    preds = (tmp_path / "export" / "demo" / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(preds) == 4
    stamp = (tmp_path / "export" / "demo" / "train" / "manifest.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (tmp_path / "export" / "demo" / "train" / "manifest.json").stat().st_mtime_ns == stamp
