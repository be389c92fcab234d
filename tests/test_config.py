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
