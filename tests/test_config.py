"""Config loading: defaults, presets, overrides, and every problem reported at once."""

from __future__ import annotations

import pytest

from toolkit import config
from toolkit.errors import ConfigError


def test_defaults_and_overrides():
    cfg = config.build("prep", None, ["prep.max_length=12", "prep.direction=both", "prep.dev_fraction=0"])
    assert (cfg.max_length, cfg.direction, cfg.dev_fraction) == (12, "both", 0.0)
    assert config.build("prep", None, [], seed=5, dev_file=None).seed == 5  # None means "not given"


def test_all_problems_in_one_message(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[prep]\nmax_length = "long"\ncolour = 1\n[nosuch]\nx = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        config.build("prep", path, ["prep.seed=x"])
    msg = str(err.value)
    assert msg.startswith("4 config problem(s)")
    for part in ("prep.max_length: expected", "prep.colour: unknown key", "unknown section [nosuch]", "prep.seed"):
        assert part in msg


def test_value_checks():
    with pytest.raises(ConfigError, match="prep.direction: expected forward, reverse or both.*dev_fraction"):
        config.build("prep", None, ["prep.direction=up", "prep.dev_fraction=1.5"])


def test_choices_are_checked_from_the_field():
    with pytest.raises(ConfigError) as err:
        config.build("train", None, ["train.mode=full", "merge.format=gguf"])
    assert "train.mode: expected lora or qlora, found 'full'" in str(err.value)
    with pytest.raises(ConfigError, match="merge.format: expected bf16 or mxfp4, found 'gguf'"):
        config.build("merge", None, ["merge.format=gguf"])
    assert config.build("eval", None, ["eval.dtype=float16"]).dtype == "float16"
    with pytest.raises(ConfigError, match="serve.dtype: expected auto, bfloat16, float16 or float32"):
        config.build("serve", None, ["serve.dtype=int8"])


def test_eval_and_serve_share_the_backend_settings():
    shared = {f.name for f in config.dataclasses.fields(config.BackendConfig)}
    assert {"backend", "ollama_host", "n_ctx", "n_threads", "device", "dtype", "copy_bias"} <= shared
    for section in ("eval", "serve"):
        cfg = config.build(section, None, [f"{section}.n_threads=3", f"{section}.ollama_host=http://gpu:11434"])
        assert (cfg.n_threads, cfg.ollama_host) == (3, "http://gpu:11434")
        assert cfg.translator_options("llama-cpp")["n_threads"] == 3
        assert cfg.translator_options("ollama")["host"] == "http://gpu:11434"
        assert cfg.translator_options("llama-cpp")["decoding"] == cfg.translator_options("ollama")["decoding"]
    assert config.ServeConfig().host == "127.0.0.1"  # serve's host is the address it binds, nothing else
    # eval decodes eval.batch_size rows at a time; serve a whole joint call of waiting requests (batch_max_texts)
    assert config.build("eval", None, ["eval.batch_size=7"]).translator_options("transformers")["batch_size"] == 7
    assert config.build("serve", None, ["serve.batch_max_texts=9"]).translator_options("transformers")[
        "batch_size"] == 9


def test_a_renamed_key_names_the_new_one():
    with pytest.raises(ConfigError, match="eval.host: renamed eval.ollama_host; write that instead"):
        config.build("eval", None, ["eval.host=http://gpu:11434"])


def test_one_default_ollama_host(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert config.ollama_host() == config.DEFAULT_OLLAMA_HOST == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "http://box:11434")
    assert config.ollama_host() == "http://box:11434" and config.ollama_host("http://x:1") == "http://x:1"


def test_bad_toml_and_unknown_preset(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[prep\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.build("prep", path)
    with pytest.raises(ConfigError, match="no shipped preset of that name"):
        config.build("prep", "no-such-preset")


def test_every_shipped_preset_loads():
    presets = config.list_presets()
    for name in presets:
        path = config.preset_path(name)
        assert path.read_text(encoding="utf-8").startswith("#"), f"{name}: must start with the command that uses it"
        for section in config.SECTIONS:
            config.build(section, name)


def test_gpu_memory_cap_is_checked():
    from toolkit.config import build
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="gpu_memory_gib: expected 0 or more"):
        build("train", "tiny-cpu", ["train.gpu_memory_gib=-1"])
    with pytest.raises(ConfigError, match="gpu_memory_gib: a GPU memory cap on the CPU"):
        build("train", "tiny-cpu", ["train.gpu_memory_gib=24"])
    assert build("train", "gpt-oss-20b-qlora", ["train.gpu_memory_gib=24"]).gpu_memory_gib == 24


def test_gpu_memory_cap_without_a_gpu_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this checks the message on a machine without CUDA")
    from toolkit.errors import ConfigError
    from toolkit.memory import cap_gpu_memory

    with pytest.raises(ConfigError, match="no CUDA GPU to cap"):
        cap_gpu_memory(24)


def test_type_errors_do_not_hide_value_errors():
    with pytest.raises(ConfigError) as err:
        config.build("prep", None, ["prep.seed=abc", "prep.dev_fraction=2", "prep.max_length=0"])
    msg = str(err.value)
    assert msg.startswith("3 config problem(s)")
    assert "prep.seed: expected a whole number, found 'abc'" in msg
    assert "prep.dev_fraction: expected 0 <= x < 1, found 2" in msg and "prep.max_length: expected a positive" in msg


def test_a_rejected_value_hides_no_check_that_reads_it():
    # target_column=1 is refused; the default it falls back to must not add "must differ" against source "nan"
    with pytest.raises(ConfigError) as err:
        config.build("prep", None, ["prep.target_column=1", "prep.source_column='nan'"])
    assert str(err.value).startswith("1 config problem(s): prep.target_column: expected text, found 1")


@pytest.mark.parametrize("setting, message", [
    ("train.learning_rate=nan", "train.learning_rate: expected a finite number, found nan"),
    ("train.epochs=inf", "train.epochs: expected a finite number, found inf"),
    ("train.warmup_ratio=nan", "train.warmup_ratio: expected a finite number, found nan"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio: expected a share of the steps"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: expected 0 (no clipping) or more, found -1"),
    ("serve.request_timeout_s=nan", "serve.request_timeout_s: expected a finite number, found nan"),
    ("serve.copy_bias=-inf", "serve.copy_bias: expected a finite number, found -inf"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(setting, message):
    with pytest.raises(ConfigError, match="1 config problem") as err:
        config.build(setting.split(".")[0], None, [setting])
    assert message in str(err.value)


def test_nan_in_a_toml_file_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlearning_rate = nan\nepochs = inf\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="2 config problem") as err:
        config.build("train", path)
    assert f"train.learning_rate: expected a finite number, found nan (from {path})" in str(err.value)


def test_toml_that_is_not_utf8_is_one_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[prep]\nsource_name = "Fran\xe7ais"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml:2: not UTF-8 \(byte 0xe7\). Save the file as UTF-8."):
        config.build("prep", path)


def test_config_file_with_any_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text("[prep]\nseed = 3\n", encoding="utf-8")
    assert config.build("prep", "tiny.txt").seed == 3
    with pytest.raises(ConfigError, match="'other.txt': no such file. Check the path") as err:
        config.build("prep", "other.txt")
    assert "no shipped preset" not in str(err.value)
    (tmp_path / "tiny-cpu").write_text("[prep]\nseed = 4\n", encoding="utf-8")
    assert config.build("prep", "tiny-cpu").seed != 4  # a bare name is the shipped preset
    assert config.build("prep", "./tiny-cpu").seed == 4


def test_a_bad_set_value_is_reported_even_when_an_option_replaces_it(caplog):
    with pytest.raises(ConfigError, match="prep.seed: expected a whole number, found 'abc'"):
        config.build("prep", None, ["prep.seed=abc"], seed=5)
    assert config.build("prep", None, ["prep.seed=7"], seed=5).seed == 5
    assert "prep.seed: the command line's 5 replaces --set prep.seed=7" in caplog.text
