"""Stage folders (issue 18): what a re-run compares, what --force keeps until it succeeds, what is redacted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from toolkit import artifacts
from toolkit.errors import ArtifactError


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_only_real_secrets_are_redacted(tmp_path):
    """Item 3: keys are secrets by exact name; max_new_tokens and pre_tokenizer are config values."""
    config = {"max_new_tokens": 256, "pre_tokenizer": "gpt-4o", "api_key_env": "TOOLKIT_API_KEY",
              "api_key": "sk-123", "nested": [{"hf_token": "hf_abc", "Token": "t", "tokenizer": "o200k"}]}
    assert artifacts.redact(config) == {
        "max_new_tokens": 256, "pre_tokenizer": "gpt-4o", "api_key_env": "TOOLKIT_API_KEY", "api_key": "***",
        "nested": [{"hf_token": "***", "Token": "***", "tokenizer": "o200k"}]}
    artifacts.write_manifest(tmp_path, stage="eval", config={"max_new_tokens": 256, "backend": "llama-cpp"})
    assert json.loads((tmp_path / artifacts.MANIFEST).read_text())["config"]["max_new_tokens"] == 256
    # a changed max_new_tokens is no silent no-op any more
    assert artifacts.prepare_out_dir(tmp_path, stage="eval", config={"max_new_tokens": 256, "backend": "llama-cpp"},
                                     force=False) is not None
    with pytest.raises(ArtifactError, match="another config"):
        artifacts.prepare_out_dir(tmp_path, stage="eval", config={"max_new_tokens": 512, "backend": "llama-cpp"},
                                  force=False)


def test_the_no_op_compares_input_paths_and_sha256(tmp_path):
    """Item 1: same config, but the input file changed, or another upstream folder: refused, saying what."""
    up_a, up_b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder in (up_a, up_b):
        folder.mkdir()
        (folder / "train.jsonl").write_text("{}\n")
        artifacts.write_manifest(folder, stage="prep", config={})
    inputs = [up_a / "train.jsonl", up_a / artifacts.MANIFEST]
    out.mkdir()
    artifacts.write_manifest(out, stage="train", config={"lr": 1}, inputs=inputs)
    assert artifacts.check_out_dir(out, stage="train", config={"lr": 1}, force=False, inputs=inputs) is not None
    with pytest.raises(ArtifactError, match=rf"from other inputs \({up_b / 'train.jsonl'} instead of "
                                            rf"{up_a / 'train.jsonl'}; {up_b / 'manifest.json'} instead of"):
        artifacts.check_out_dir(out, stage="train", config={"lr": 1}, force=False,
                                inputs=[up_b / "train.jsonl", up_b / artifacts.MANIFEST])
    (up_a / "train.jsonl").write_text("{}\n{}\n")
    with pytest.raises(ArtifactError, match=r"another config \(train.lr: 1 -> 2\) and from other inputs "
                                            r"\(.*train.jsonl changed \(sha256 [0-9a-f]{12}… -> [0-9a-f]{12}…\)\)"):
        artifacts.check_out_dir(out, stage="train", config={"lr": 2}, force=False, inputs=inputs)
    assert artifacts.check_out_dir(out, stage="train", config={"lr": 2}, force=True, inputs=inputs) is None
    # a stage whose config identifies its input (eval: the test file's sha256) passes none: not compared
    assert artifacts.check_out_dir(out, stage="train", config={"lr": 1}, force=False) is not None


def test_a_manifest_from_before_upstream_inputs_matches_by_its_upstream_record(tmp_path):
    up, out = tmp_path / "merge", tmp_path / "export"
    up.mkdir()
    upstream = artifacts.write_manifest(up, stage="merge", config={})
    out.mkdir()
    artifacts.write_manifest(out, stage="export", config={}, upstream=upstream)  # no inputs recorded
    assert artifacts.check_out_dir(out, stage="export", config={}, force=False, inputs=[up / artifacts.MANIFEST])
    artifacts.write_manifest(up, stage="merge", config={"dtype": "bfloat16"})  # the merge was redone since
    with pytest.raises(ArtifactError, match="manifest.json is a new input"):
        artifacts.check_out_dir(out, stage="export", config={}, force=False, inputs=[up / artifacts.MANIFEST])


def test_building_replaces_the_folder_only_when_complete(tmp_path):
    """Item 2: what is built beside D replaces D on success; a failure leaves D and nothing else."""
    out = tmp_path / "runs" / "r1" / "stage"
    with pytest.raises(RuntimeError), artifacts.building(out) as build:
        (build / "half.bin").write_bytes(b"half")
        raise RuntimeError("validation failed")
    assert list(tmp_path.iterdir()) == []  # no D, no partial build, not even the parents it made
    with artifacts.building(out) as build:
        (build / "a.txt").write_text("first")
    assert _tree(out) == {"a.txt": b"first"} and sorted(os.listdir(out.parent)) == ["stage"]
    with pytest.raises(KeyboardInterrupt), artifacts.building(out) as build:
        (build / "b.txt").write_text("second")
        raise KeyboardInterrupt
    assert _tree(out) == {"a.txt": b"first"} and sorted(os.listdir(out.parent)) == ["stage"]
    with artifacts.building(out) as build:
        (build / "b.txt").write_text("second")
    assert _tree(out) == {"b.txt": b"second"} and sorted(os.listdir(out.parent)) == ["stage"]


def test_an_output_folder_that_cannot_be_made_is_named_in_the_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "out"
    with pytest.raises(NotADirectoryError) as err, artifacts.building(out):
        pass
    assert err.value.filename == str(out)  # not the hidden build folder beside it


def test_building_removes_what_a_killed_run_left(tmp_path):
    """A SIGKILL runs no cleanup: its partial build (and a swap's old folder) are removed by the next run."""
    out = tmp_path / "export"
    killed = artifacts.partial_dir(out)
    killed.mkdir()
    (killed / "model-F32.gguf").write_bytes(b"GGUF complete")
    (killed / ".model-Q8_0.gguf.x1y2.tmp").write_bytes(b"GGUF half")
    (tmp_path / ".export.old").mkdir()
    with artifacts.building(out) as build:
        assert list(build.iterdir()) == []
        (build / "manifest.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["export"] and _tree(out) == {"manifest.json": b"{}"}


def test_run_discovery_skips_folders_without_a_finished_stage(tmp_path):
    """Item 4: a folder a failed stage left under export/ is not "the latest run"."""
    (tmp_path / "good" / "prep").mkdir(parents=True)
    artifacts.write_manifest(tmp_path / "good" / "prep", stage="prep", config={})
    (tmp_path / "failed" / "prep").mkdir(parents=True)
    (tmp_path / "half" / "train").mkdir(parents=True)
    (tmp_path / "half" / "train" / "train_config.json").write_text("{}")
    assert artifacts.finished_runs(tmp_path) == [tmp_path / "good"]
    assert artifacts.finished_runs(tmp_path / "none") == []
