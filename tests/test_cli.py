"""The command line through click's CliRunner: prep, errors as one line, a light --help."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

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


def _prep_args(tsv, out) -> list[str]:
    return ["prep", str(tsv), "--out", str(out), "--length-unit", "chars"]


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_unwritable_out_is_one_line(sample_tsv, tmp_path, where):
    if where == "under a file":
        (tmp_path / "file.txt").write_text("x", encoding="utf-8")
        out, why = tmp_path / "file.txt" / "out", "a part of the path is a file, not a folder"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this system")
        out, why = Path("/proc/toolkit-test/out"), "no such file or folder, and none can be made there"
    result = CliRunner().invoke(main, _prep_args(sample_tsv, out))
    assert result.exit_code == 2, result.output
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --out {out}: cannot write ") and why in line
    assert line.endswith("Choose an output folder you can write.") and "Traceback" not in result.output


def test_read_only_out_is_one_line(sample_tsv, tmp_path, monkeypatch):
    # a read-only folder (simulated: root, which runs the tests in some containers, may write anywhere)
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.absolute().is_relative_to(tmp_path / "ro"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    out = tmp_path / "ro" / "out"
    monkeypatch.setattr(Path, "mkdir", read_only)
    result = CliRunner().invoke(main, _prep_args(sample_tsv, out))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --out {out}: cannot write {out}: permission denied. Choose an output " \
                                    "folder you can write."
    from toolkit.cli import os_error_line  # a hidden work folder built beside --out is named by --out too

    beside = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / ".prep.partial"))
    assert os_error_line(beside, out, "--out").startswith(f"--out {out}: cannot write {tmp_path}/ro/.prep.partial")
    real_mkdir(tmp_path / "ro")
    monkeypatch.chdir(tmp_path / "ro")  # the default --out, export/RUN/prep, in a read-only working folder
    result = CliRunner().invoke(main, ["prep", str(sample_tsv), "--length-unit", "chars"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: export/sample/prep: permission denied. Pass --out a folder you can "
                                     "write.")


def test_other_os_errors_keep_their_traceback(monkeypatch, sample_tsv, tmp_path):
    from toolkit import corpus

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("no path in this one")

    monkeypatch.setattr(corpus, "prepare", refused)
    result = CliRunner().invoke(main, _prep_args(sample_tsv, tmp_path / "o"))
    assert isinstance(result.exception, ConnectionRefusedError)  # a bug, not a user error: not hidden


def test_set_value_replaced_by_an_option_is_still_checked(sample_tsv, tmp_path):
    result = CliRunner().invoke(main, [*_prep_args(sample_tsv, tmp_path / "o"), "--seed", "5",
                                       "--set", "prep.seed=abc"])
    assert result.exit_code == 2
    assert "prep.seed: expected a whole number, found 'abc' (from --set)" in result.stderr
    assert not (tmp_path / "o").exists()


def test_config_file_that_exists_is_read_whatever_its_suffix(sample_tsv, tmp_path):
    (tmp_path / "tiny.txt").write_text("[prep]\ndev_fraction = 0.5\n", encoding="utf-8")
    result = CliRunner().invoke(main, [*_prep_args(sample_tsv, tmp_path / "o"), "--config",
                                       str(tmp_path / "tiny.txt"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["examples"]["dev"] > 100


@pytest.mark.parametrize("args, message", [
    (["train", "PREP", "--set", "train.learning_rate=nan", "--set", "train.max_grad_norm=-1"],
     "2 config problem(s): train.learning_rate: expected a finite number, found nan"),
    (["train", "PREP", "--set", "train.epochs=inf", "--set", "train.warmup_ratio=nan"],
     "train.warmup_ratio: expected a finite number"),
    (["serve", "x.gguf", "--timeout", "nan"], "serve.request_timeout_s: expected a finite number, found nan"),
])
def test_bad_numbers_stop_before_any_model_loads(tmp_path, args, message):
    args = [str(tmp_path / "prep") if a == "PREP" else a for a in args]
    result = CliRunner().invoke(main, [*args, *(["--out", str(tmp_path / "t")] if args[0] == "train" else [])])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "t").exists()


def test_run_refuses_an_eval_on_an_empty_dev_split_up_front(sample_tsv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(sample_tsv), "--config", "tiny-cpu",
                                       "--set", "prep.dev_fraction=0"])
    assert result.exit_code == 2
    assert "prep.dev_fraction = 0 holds out no dev split" in result.stderr and "--test" in result.stderr
    assert not (tmp_path / "export").exists()


def test_train_after_prep_without_dev_split_trains_without_eval_loss(tiny_model, sample_tsv, tmp_path, caplog):
    """`prep --dev-fraction 0` then `train` (eval_steps set): a note, no eval loss, no crash in TRL."""
    runner = CliRunner()
    prep, small = tmp_path / "prep", tmp_path / "small.tsv"
    small.write_text("".join(sample_tsv.read_text(encoding="utf-8").splitlines(keepends=True)[:9]), encoding="utf-8")
    assert runner.invoke(main, [*_prep_args(small, prep), "--dev-fraction", "0"]).exit_code == 0
    assert (prep / "dev.jsonl").read_text(encoding="utf-8") == ""
    result = runner.invoke(main, ["train", str(prep), "--out", str(tmp_path / "train"), "--config", "tiny-cpu",
                                  "--set", f"train.base_model={json.dumps(str(tiny_model))}", "--max-steps", "2",
                                  "--set", "train.eval_steps=1", "--set", "train.report_to='none'", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["steps"] == 2 and metrics["eval_loss"] is None
    assert "the prep folder has no dev examples, so no eval loss is computed" in caplog.text


def test_stage_options_take_help_type_and_choices_from_the_config():
    import click

    from toolkit import config

    seen = 0
    for command in ("prep", "train", "merge", "export", "eval", "serve"):
        fields = {f.name: f for f in config.dataclasses.fields(config.SECTIONS[command])}
        for param in main.commands[command].params:
            if param.name not in fields or not isinstance(param, click.Option) or param.hidden:
                continue
            if (command, param.name) == ("export", "quants"):  # a list with a `none` value: declared by hand
                continue
            meta = fields[param.name].metadata
            assert param.help.startswith(meta["help"]), (command, param.name)
            if "choices" in meta:
                assert tuple(param.type.choices) == meta["choices"], (command, param.name)
            assert param.default is None  # given values only: the preset and --set stay in force otherwise
            seen += 1
    assert seen > 40
    options = {p.name: p for p in main.commands["eval"].params}
    assert options["source_column"].opts == ["--src"] and options["ollama_host"].opts == ["--ollama-host"]
    assert {"backend", "ollama_host", "max_new_tokens"} <= {p.name for p in main.commands["serve"].params}


def test_eval_host_is_now_ollama_host(monkeypatch, tmp_path, caplog):
    from toolkit import evaluate

    got = {}

    def fake_run(cfg, test_file, out_dir, force=False):
        got["cfg"] = cfg
        return {"metrics": {}}

    monkeypatch.setattr(evaluate, "run", fake_run)
    args = ["eval", "t.tsv", "--backend", "ollama", "--model", "m", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--ollama-host", "http://gpu:11434"])
    assert result.exit_code == 0, result.output
    assert got["cfg"].ollama_host == "http://gpu:11434"
    result = CliRunner().invoke(main, [*args, "--host", "http://old:11434"])  # the old name still works
    assert result.exit_code == 0, result.output
    assert got["cfg"].ollama_host == "http://old:11434" and "eval --host is now --ollama-host" in caplog.text
