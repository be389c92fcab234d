"""bench/copy_bias_domains.py, bench/translate_speed.py, bench/decoding_limits.py and bench/llama_gpu_smoke.py on
the tiny models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import copy_bias_domains as cbd
import decoding_limits as dl
import translate_speed as ts

SHARED = ROOT.parent / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "corpora" / "zh-nan-moe" / "dev.tsv").is_file(),
                                  reason="../shared (news set, MOE corpus) is not beside this checkout")


def test_lexicon_coverage_is_greedy_longest_match():
    words = {"醫院", "看醫生", "醫生"}
    assert cbd.coverage("去看醫生", words) == pytest.approx(3 / 4)  # 看醫生, not 醫生
    assert cbd.coverage("今天", words) == 0.0


@needs_shared
@pytest.mark.llama
def test_copy_bias_domains_on_the_tiny_gguf(tiny_gguf, tmp_path):
    out = cbd.main(["--gguf", str(tiny_gguf), "--biases", "0,50", "--directions", "forward", "--limit", "3",
                    "--max-new-tokens", "8", "--n-bootstrap", "1", "--n-ctx", "512", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "copy_bias_domains.json").read_text(encoding="utf-8"))
    domains = saved["directions"]["forward"]["domains"]
    assert set(domains) == {"news", "moe"} and all(d["sentences"] == 3 for d in domains.values())
    for d in domains.values():
        assert set(d["biases"]) == {"0.0", "50.0"} and d["best_bias"] in (0.0, 50.0)
        assert all(0 <= b["hit_limit"] <= 3 for b in d["biases"].values())
    assert out["directions"]["forward"]["rules"][0]["rule"].startswith("one bias")


@needs_shared
def test_translate_speed_before_and_after_on_the_tiny_model(tiny_model, tmp_path):
    rows = ts.main(["--model", str(tiny_model), "--limit", "6", "--max-new-tokens", "12", "--batch-size", "4",
                    "--device", "cpu", "--out", str(tmp_path)])
    assert [r["name"] for r in rows] == ["transformers before", "transformers after"]
    assert rows[0]["hit_limit"] + rows[0]["stopped_repetition"] <= 6 and rows[0]["tokens"] <= 6 * 12
    assert all(r["sentences"] == 6 and r["sentences_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "translate_speed.json").read_text(encoding="utf-8"))["rows"] == rows


def test_limit_table_counts_references_over_the_limit():
    table = dl.limits_table([(10, 20), (10, 45), (1, 30)])
    assert table["over_limit"]["16+2x"] == 2 and table["over_limit"]["32+2x"] == 0
    assert table["longest_reference"] == 45


@needs_shared
def test_translate_speed_random_model_reads_a_packed_tokenizer(tmp_path, monkeypatch):
    """--tokenizer: the folder bench/gpu_pack.py ships (tokenizer.json gzipped) instead of building one."""
    import gzip
    import shutil

    from toolkit import tokenizer

    tok = tmp_path / "tok"
    tokenizer.build_hf_tokenizer(tok)
    with open(tok / "tokenizer.json", "rb") as src, gzip.open(tok / "tokenizer.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (tok / "tokenizer.json").unlink()

    def no_build(*args, **kwargs):  # the GPU machine cannot build one
        raise AssertionError("--tokenizer given, yet a tokenizer was built")

    monkeypatch.setattr(tokenizer, "build_hf_tokenizer", no_build)
    rows = ts.main(["--random", "tiny", "--tokenizer", str(tok), "--modes", "after", "--limit", "3",
                    "--max-new-tokens", "4", "--device", "cpu", "--profile-tokens", "2", "--batch-size", "2",
                    "--out", str(tmp_path / "out")])
    assert [r["name"] for r in rows] == ["transformers after"] and rows[0]["sentences"] == 3
    profile = (tmp_path / "out" / "profile-after.txt").read_text(encoding="utf-8")
    assert profile.startswith("# profile: 2 sentences, 2 decoding steps") and "aten::" in profile
    assert 0 < rows[0]["tokens"] <= 3 * 4
    assert not (tok / "tokenizer.json").exists()  # unpacked into a temporary folder, the pack left as it was


@pytest.mark.llama
def test_llama_smoke_cases_run_in_their_own_processes(tiny_gguf):
    """Each case in a child process: a crashing case is reported as failed with its exit code, the next still runs
    (on the CPU build here every case but torch-verify passes; torch-verify needs CUDA)."""
    import subprocess

    script = ROOT / "bench" / "llama_gpu_smoke.py"
    cases = ["torch-verify", "eval", "verify", "verify-f16kv", "verify-nooffload", "verify-cpu", "toolkit-verify"]
    proc = subprocess.run([sys.executable, str(script), str(tiny_gguf), "--cases", ",".join(cases)],
                          capture_output=True, text=True, check=False, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[:2] for line in lines] == [["torch-verify", "failed"]] + [[c, "ok:"] for c in cases[1:]]
    assert "tokens generated" in lines[1] and all("finite: True" in line for line in lines[2:-1])
    assert lines[-1].endswith("torch loaded: False")  # export's check, as its worker runs it, without torch
    crash = subprocess.run([sys.executable, str(script), str(tiny_gguf) + ".missing", "--cases", "eval"],
                           capture_output=True, text=True, check=False, timeout=300)
    assert crash.returncode == 1 and crash.stdout.startswith("eval failed (exit ")


def test_translate_speed_random_model_from_a_config_folder_and_its_budget(tmp_path):
    """--random gemma3-270m: the shapes of the config.json beside the tokenizer; --budget-s stops a row early."""
    from transformers import Gemma3TextConfig

    from toolkit import tokenizer
    from toolkit.evaluate import SORT_BATCHES

    folder = tmp_path / "gemma"
    tokenizer.build_hf_tokenizer(folder)
    Gemma3TextConfig(vocab_size=201088, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16).save_pretrained(folder)
    test = tmp_path / "test.tsv"
    test.write_text("zh\tnan\n" + "".join(f"第{i}句話。\t第{i}句話。\n" for i in range(6)), encoding="utf-8")
    rows = ts.main(["--random", "gemma3-270m", "--tokenizer", str(folder), "--test", str(test), "--modes", "after",
                    "--limit", "6", "--batch-size", "1", "--max-new-tokens", "3", "--no-loop-stop",
                    "--budget-s", "1e-9", "--profile-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rows[0]["sentences"] == SORT_BATCHES  # one chunk of batch-size x SORT_BATCHES, then the budget
    assert rows[0]["stopped_repetition"] == 0 and rows[0]["tokens"] <= SORT_BATCHES * 3
    profile = (tmp_path / "out" / "profile-after.txt").read_text(encoding="utf-8")
    assert profile.startswith("# profile: 1 sentences, 2 decoding steps") and "aten::" in profile
