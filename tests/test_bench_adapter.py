"""bench/full_size_adapter.py: a random adapter of a preset's shapes, which `toolkit merge` takes as a train run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

from toolkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import full_size_adapter


def test_random_adapter_has_the_presets_targets_and_merges(tiny_mxfp4, tmp_path):
    prep = tmp_path / "prep"
    result = CliRunner().invoke(main, ["prep", str(ROOT / "corpora/zh-nan-moe-sample/sample.tsv"), "--config",
                                       "gpt-oss-20b-qlora", "--set", f'train.base_model="{tiny_mxfp4}"',
                                       "--out", str(prep)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "adapter"
    manifest = full_size_adapter.main([str(prep), str(out), "--model", str(tiny_mxfp4),
                                       "--set", "train.expert_layers=[1]"])
    assert manifest["metrics"]["synthetic"] is True
    assert manifest["config"]["mode"] == "qlora"  # the preset's config, as its train run would record it
    lora = manifest["lora"]
    assert lora["r"] == 8 and len(lora["target_modules"]) == 4 * 2  # q/k/v/o of both layers
    assert lora["target_parameters"] == ["model.layers.1.mlp.experts.down_proj",
                                         "model.layers.1.mlp.experts.gate_up_proj"]

    merged = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(out), "--out", str(merged), "--format", "bf16"])
    assert result.exit_code == 0, result.output
    written = json.loads((merged / "manifest.json").read_text())
    parity = written["metrics"]["parity"]
    assert parity["max_abs_diff_merged_vs_expected"] == 0.0
    assert parity["max_abs_diff_merged_vs_base"] > 0.01  # B is not zero: the adapter changes the model
    assert written["upstream"]["metrics"]["synthetic"] is True  # no figure of it passes for a trained adapter's
