"""toolkit.runs: run folders, the model a command uses, and what a model's manifest chain records."""

from __future__ import annotations

import json

import pytest

from toolkit import artifacts, runs
from toolkit.errors import ArtifactError, ConfigError


def finished(folder, stage, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    return artifacts.write_manifest(folder, stage=stage, config={}, **kw)


def test_default_run_is_the_corpus_stem_or_the_latest_finished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runs.default_run(tmp_path / "zh-nan.tsv") == "zh-nan"
    with pytest.raises(ArtifactError, match="no run with a finished stage under export/"):
        runs.default_run()
    (tmp_path / "export" / "broken" / "train").mkdir(parents=True)  # no manifest: a failed stage, not a run
    finished(tmp_path / "export" / "r1" / "prep", "prep")
    assert runs.default_run() == "r1"
    assert runs.stage_dir("r1", "train") == runs.EXPORT_ROOT / "r1" / "train"
    assert runs.run_of("export/r1/merge") == "r1" and runs.run_of(tmp_path / "elsewhere") is None
    assert runs.run_of("export") is None


def test_export_gguf_is_the_one_the_modelfile_names(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for name in ("r1-Q5_K_M.gguf", "r1-Q8_0.gguf"):
        (export / name).write_bytes(b"GGUF")
    finished(export, "export", extra={"ollama": {"gguf": "r1-Q8_0.gguf", "name": "r1"}})
    assert runs.export_gguf(export) == export / "r1-Q8_0.gguf"  # not the first by name
    assert runs.latest_model(tmp_path) == ("llama-cpp", export / "r1-Q8_0.gguf")
    assert runs.resolve(export, None).model == str(export / "r1-Q8_0.gguf")


def test_eval_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merge = tmp_path / "export" / "r1" / "merge"
    finished(merge, "merge")
    # No model: the latest run's latest stage, written to that run's eval folder.
    assert runs.eval_target(None, None, None, None) == ("transformers", str(runs.EXPORT_ROOT / "r1" / "merge"),
                                                        runs.EXPORT_ROOT / "r1" / "eval")
    # A model inside export/RUN/ writes export/RUN/eval; the backend follows the file.
    gguf = tmp_path / "export" / "r1" / "export" / "r1-Q4_K_M.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert runs.eval_target(str(gguf), None, None, None) == ("llama-cpp", str(gguf), runs.EXPORT_ROOT / "r1" / "eval")
    assert runs.eval_target(str(gguf), "transformers", "r2", tmp_path / "o") == ("transformers", str(gguf),
                                                                                  tmp_path / "o")
    with pytest.raises(ConfigError, match="pass --out DIR"):
        runs.eval_target("gpt-oss:20b", "ollama", None, None)
    with pytest.raises(ConfigError, match="needs --model NAME"):
        runs.eval_target(None, "ollama", "r1", None)
    with pytest.raises(ArtifactError, match="no finished export stage"):
        runs.eval_target(None, "llama-cpp", "r1", None)
    # An export folder means the GGUF its Modelfile names, through llama-cpp (as serve takes it).
    finished(gguf.parent, "export", extra={"ollama": {"gguf": gguf.name, "name": "r1"}})
    assert runs.eval_target(str(gguf.parent), None, None, None) == ("llama-cpp", str(gguf),
                                                                     runs.EXPORT_ROOT / "r1" / "eval")


def test_serve_target_defaults_to_the_latest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finished(tmp_path / "export" / "r1" / "train", "train")
    model = runs.serve_target(None, None, None)
    assert model == ("transformers", str(runs.EXPORT_ROOT / "r1" / "train"), runs.EXPORT_ROOT / "r1" / "train")
    with pytest.raises(ConfigError, match="needs MODEL"):
        runs.serve_target(None, "ollama", None)


def test_nearest_manifest_and_the_upstream_chain(tmp_path):
    prep = finished(tmp_path / "prep", "prep")
    train = finished(tmp_path / "train", "train", upstream=prep)
    checkpoint = tmp_path / "train" / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    assert runs.nearest_manifest(checkpoint)["stage"] == "train"  # two folders up
    assert runs.nearest_manifest(tmp_path / "nothing") is None and runs.nearest_manifest(None) is None
    assert runs.upstream(train, "prep")["stage"] == "prep" and runs.upstream(train, "merge") is None
    assert runs.prep_manifest(train)["stage"] == "prep"
    with pytest.raises(ArtifactError, match="not made by `toolkit prep`"):
        runs.prep_manifest({"stage": "merge", "upstream": None})


def test_adapter_and_base_model_of_a_train_folder(tmp_path):
    train = tmp_path / "train"
    with pytest.raises(ArtifactError, match="no adapter_config.json"):
        runs.find_adapter(train)
    (train / "adapter").mkdir(parents=True)
    (train / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "from-adapter"}))
    adapter = runs.find_adapter(train)
    assert adapter == train / "adapter"
    assert runs.base_model_of({"config": {"base_model": "from-manifest"}}, adapter, None) == "from-manifest"
    assert runs.base_model_of({}, adapter, None) == "from-adapter"
    assert runs.base_model_of({}, adapter, "given") == "given"


def test_latest_model(tmp_path):
    run = tmp_path / "r1"
    with pytest.raises(ArtifactError, match="no finished export, merge or train"):
        runs.latest_model(run)
    for stage in ("train", "merge", "export"):
        (run / stage).mkdir(parents=True)
    artifacts.write_manifest(run / "train", stage="train", config={})
    assert runs.latest_model(run) == ("transformers", run / "train")
    artifacts.write_manifest(run / "merge", stage="merge", config={})
    assert runs.latest_model(run) == ("transformers", run / "merge")
    for name in ("r1-f16.gguf", "r1-Q4_K_M.gguf"):
        (run / "export" / name).write_bytes(b"GGUF")
    artifacts.write_manifest(run / "export", stage="export", config={"ollama_gguf": "Q4_K_M"})
    assert runs.latest_model(run) == ("llama-cpp", run / "export" / "r1-Q4_K_M.gguf")
    assert runs.latest_model(run, "transformers") == ("transformers", run / "merge")


def test_resolve_targets(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert runs.resolve(gguf, None) == ("llama-cpp", str(gguf), tmp_path)
    export = tmp_path / "export"
    export.mkdir()
    (export / "r1-Q4_K_M.gguf").write_bytes(b"GGUF")
    artifacts.write_manifest(export, stage="export", config={},
                             extra={"ollama": {"gguf": "r1-Q4_K_M.gguf", "name": "r1", "modelfile": "Modelfile"}})
    assert runs.resolve(export, None) == ("llama-cpp", str(export / "r1-Q4_K_M.gguf"), export)
    assert runs.resolve(export, "ollama") == ("ollama", "r1", export)
    merged = tmp_path / "merge"
    merged.mkdir()
    assert runs.resolve(merged, None) == ("transformers", str(merged), merged)
    assert runs.resolve("gpt-oss:20b", "ollama") == ("ollama", "gpt-oss:20b", None)
    with pytest.raises(ArtifactError, match="no such file"):
        runs.resolve(tmp_path / "nope", None)
    with pytest.raises(ConfigError):
        runs.resolve(gguf, "transformers")
    old_export = tmp_path / "old"
    old_export.mkdir()
    artifacts.write_manifest(old_export, stage="export", config={})
    with pytest.raises(ArtifactError, match="names no GGUF"):
        runs.resolve(old_export, None)


def test_prep_columns_come_from_the_prep_manifest():
    prep = {"stage": "prep", "config": {"source_column": "cmn", "target_column": "nan-TW"}}
    assert runs.prep_columns({"stage": "merge", "upstream": prep}) == ("cmn", "nan-TW")
    assert runs.prep_columns(None) == ("zh", "nan")
