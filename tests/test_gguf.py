"""`toolkit export` on the tiny gpt-oss: llama.cpp's converter, quantization, logits parity, Modelfile, Ollama.

The converter is the pinned copy `python -m toolkit.llamacpp fetch` unpacks (fetched from PyPI once and
cached). Tests that load or quantize GGUF files need llama-cpp-python and are marked `llama`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from lora_fixture import make_train_dir
from ollama_standin import StandinOllama, real_ollama_host

from toolkit import artifacts, config, gguf, llamacpp, merge
from toolkit.cli import main
from toolkit.errors import ArtifactError, ConfigError, ExternalToolError

QUANTS = ["Q8_0", "Q4_K_M"]
EXPORT_ARGS = ["--outtype", "f32", "--quant", "Q8_0", "--quant", "Q4_K_M", "--pre-tokenizer", "gpt-4o",
               "--ollama-gguf", "Q4_K_M"]


def export_cfg(**values):
    values = {"outtype": "f32", "quants": QUANTS, "pre_tokenizer": "gpt-4o", "ollama_gguf": "Q4_K_M", **values}
    return config.build("export", None, [], **values)


@pytest.fixture(scope="module")
def converter() -> Path:
    return llamacpp.fetch()


@pytest.fixture(scope="module")
def merged_dir(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-src")
    train = make_train_dir(tiny_model, root / "train")
    merge.run(config.build("merge"), train, root / "merge")
    return root / "merge"


@pytest.fixture(scope="module")
def exported(merged_dir, converter, tmp_path_factory) -> tuple[Path, dict]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    out = tmp_path_factory.mktemp("export") / "export"
    return out, gguf.run(export_cfg(), merged_dir, out)


def _ggufs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix == ".gguf"}


def test_fetch_checks_the_pinned_sha256(tmp_path):
    fake = tmp_path / llamacpp.SDIST_NAME
    fake.write_bytes(b"not the sdist")
    with pytest.raises(ExternalToolError, match="sha256 .* expected the pinned"):
        llamacpp.fetch(tmp_path / "dest", sdist=fake)
    assert not (tmp_path / "dest").exists()


def test_missing_converter_says_how_to_get_it(tmp_path):
    with pytest.raises(ExternalToolError, match="python -m toolkit.llamacpp fetch"):
        llamacpp.converter_dir(tmp_path)


def test_pinned_converter_knows_gpt_oss_and_gpt4o(converter):
    assert "gpt-4o" in llamacpp.pre_tokenizer_names(converter)
    assert '@ModelBase.register("GptOssForCausalLM")' in (converter / "conversion" / "gpt_oss.py").read_text()
    assert "MXFP4" in (converter / "gguf-py" / "gguf" / "constants.py").read_text()


def test_unknown_tokenizer_hash_needs_an_explicit_pre_tokenizer(merged_dir, converter, tmp_path):
    cfg = export_cfg(pre_tokenizer=None, quants=[], verify=False, ollama_gguf="f32")
    with pytest.raises(ExternalToolError, match="pass --pre-tokenizer NAME"):
        gguf.run(cfg, merged_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no half-written GGUF, no manifest, no output folder


def test_pre_tokenizer_must_be_a_llama_cpp_name(merged_dir, converter, tmp_path):
    with pytest.raises(ConfigError, match="not a name llama.cpp knows. Known: .*gpt-4o"):
        gguf.run(export_cfg(pre_tokenizer="gpt-5", verify=False, quants=[], ollama_gguf="f32"), merged_dir, tmp_path)


def test_modelfile_gguf_defaults_and_quant_checks():
    assert export_cfg(ollama_gguf=None).ollama_file_type() == "Q4_K_M"
    assert config.build("export", None, ["export.quants=[]"]).ollama_file_type() == "f16"
    assert config.build("export", "gpt-oss-20b-lora").ollama_file_type() == "MXFP4_MOE"
    with pytest.raises(ConfigError, match="each type once"):
        config.build("export", None, ['export.quants=["Q8_0", "Q8_0"]'])
    with pytest.raises(ConfigError, match="is not made by this export"):
        config.build("export", None, ["export.quants=[]", "export.ollama_gguf=Q8_0"])


@pytest.mark.slow
def test_real_gpt_oss_tokenizer_is_recognised_without_help(tiny_model_real_tokenizer, converter, tmp_path):
    """o200k_harmony hashes to llama.cpp's gpt-4o entry: --pre-tokenizer is never needed (nor applied)."""
    sys.path.insert(0, str(converter / "gguf-py"))  # the vendored reader, newer than the gguf wheel
    try:
        out = tmp_path / "real.gguf"
        assert gguf.convert(tiny_model_real_tokenizer, out, "f32", converter, "gpt-4o") is False
        from gguf import GGUFReader

        field = GGUFReader(out).fields["tokenizer.ggml.pre"]
        assert bytes(field.parts[field.data[0]]).decode() == "gpt-4o"
    finally:
        sys.path.remove(str(converter / "gguf-py"))


@pytest.mark.llama
def test_export_files_sizes_and_logit_parity(exported):
    out, manifest = exported
    assert {p.name for p in out.iterdir()} == {"model-F32.gguf", "model-Q8_0.gguf", "model-Q4_K_M.gguf",
                                               "Modelfile", "manifest.json"}
    files = {f["type"]: f for f in manifest["metrics"]["files"]}
    assert set(files) == {"f32", *QUANTS}
    assert all(f["passed"] and f["tokenizer_match"] and f["architecture"] == "gpt-oss" for f in files.values())
    # Same weights, same maths (HF with llama.cpp's YaRN rounding): only summation order differs.
    assert files["f32"]["rel_diff_last"] < 1e-5
    assert files["f32"]["top1_agreement"] == 1.0
    # Against HF as shipped (fractional YaRN range), llama.cpp drifts with position: reported, not hidden.
    assert manifest["metrics"]["reference"]["rope_rounded_like_llama_cpp"] is True
    assert files["f32"]["rel_diff_last_hf_rope"] > 10 * files["f32"]["rel_diff_last"]
    for kind in QUANTS:
        assert files[kind]["top1_agreement"] >= 0.7 and files[kind]["completion_tokens"] > 0
    assert files["Q4_K_M"]["bytes"] < files["Q8_0"]["bytes"] < files["f32"]["bytes"]
    assert {f["bytes"] for f in files.values()} == {(out / f["file"]).stat().st_size for f in files.values()}
    assert manifest["metrics"]["pre_tokenizer"] == {"requested": "gpt-4o", "substituted": True}
    assert manifest["llama_cpp"]["sdist_sha256"] == llamacpp.SDIST_SHA256
    assert manifest["upstream"]["stage"] == "merge"
    assert "FROM ./model-Q4_K_M.gguf\n" in (out / "Modelfile").read_text()


@pytest.mark.llama
def test_export_rerun_is_a_noop(exported, merged_dir):
    out, manifest = exported
    assert gguf.run(export_cfg(), merged_dir, out)["created"] == manifest["created"]


def _reuse_conversion(monkeypatch, exported) -> None:
    """Make `convert` copy the fixture's F32 file: these tests are about what happens after conversion."""
    import shutil

    def copy(merged_dir, out_path, outtype, folder, pre_tokenizer):
        with artifacts.atomic_path(out_path) as tmp:
            shutil.copyfile(exported[0] / "model-F32.gguf", tmp)
        return True

    monkeypatch.setattr(gguf, "convert", copy)


@pytest.mark.llama
def test_interrupted_quantization_leaves_no_half_file(exported, merged_dir, tmp_path, monkeypatch):
    import llama_cpp

    def interrupted(src, dst, params):
        Path(dst.decode()).write_bytes(b"GGUF half a file")
        raise KeyboardInterrupt

    _reuse_conversion(monkeypatch, exported)
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        gguf.run(export_cfg(verify=False), merged_dir, out)
    assert list(tmp_path.iterdir()) == []  # the export was built beside OUT: no half file, no folder, no manifest


KILLED_EXPORT = """
import os, shutil, signal, sys
from pathlib import Path
import llama_cpp
from toolkit import artifacts, config, gguf

f32, merged, out = sys.argv[1:]
def convert(merged_dir, out_path, outtype, folder, pre_tokenizer):
    with artifacts.atomic_path(out_path) as tmp:
        shutil.copyfile(f32, tmp)
    return True
def killed(src, dst, params):  # SIGKILL half way through writing the quantized file: no cleanup runs
    Path(dst.decode()).write_bytes(b"GGUF half a file")
    os.kill(os.getpid(), signal.SIGKILL)
gguf.convert, llama_cpp.llama_model_quantize = convert, killed
cfg = config.build("export", None, [], outtype="f32", quants=["Q8_0"], pre_tokenizer="gpt-4o", ollama_gguf="Q8_0",
                   verify=False)
gguf.run(cfg, Path(merged), Path(out))
"""


@pytest.mark.llama
def test_a_killed_export_is_cleaned_up_and_redone(exported, merged_dir, tmp_path, monkeypatch):
    """Issue 18, item 9: SIGKILL during quantization leaves only a hidden build folder beside OUT (a complete
    F32 file and a hidden .tmp file); the same command again removes it and redoes the export."""
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(exported[0] / "model-F32.gguf"), str(merged_dir),
                           str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == [".out.partial"]  # no OUT: nothing looks finished
    left = sorted(p.name for p in (tmp_path / ".out.partial").iterdir())
    assert left[0].startswith(".model-Q8_0.gguf.") and left[0].endswith(".tmp") and left[1:] == ["model-F32.gguf"]
    _reuse_conversion(monkeypatch, exported)
    cfg = export_cfg(quants=["Q8_0"], ollama_gguf="Q8_0", verify=False)
    manifest = gguf.run(cfg, merged_dir, out)  # no --force needed
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "manifest.json", "model-F32.gguf", "model-Q8_0.gguf"]
    assert {o["path"] for o in manifest["outputs"]} == {"Modelfile", "model-F32.gguf", "model-Q8_0.gguf"}


@pytest.mark.llama
def test_another_merge_folder_is_no_no_op(exported, merged_dir, tmp_path):
    """Issue 18, item 1: `export OTHER_MERGE --out FINISHED` is refused, not answered with the old files."""
    import shutil

    out, manifest = exported
    other = tmp_path / "merge"
    shutil.copytree(merged_dir, other)
    with pytest.raises(ArtifactError, match=rf"from other inputs \({other / 'manifest.json'} instead of"):
        gguf.run(export_cfg(), other, out)
    assert gguf.run(export_cfg(), merged_dir, out)["created"] == manifest["created"]


@pytest.mark.llama
def test_failed_check_writes_no_manifest(exported, merged_dir, tmp_path, monkeypatch):
    _reuse_conversion(monkeypatch, exported)
    cfg = export_cfg(quants=[], ollama_gguf="f32", float_rtol=1e-12, verify_texts=["你好"])
    with pytest.raises(ArtifactError, match="export check failed: model-F32.gguf rel_diff_last"):
        gguf.run(cfg, merged_dir, tmp_path / "out")
    assert not (tmp_path / "out" / artifacts.MANIFEST).exists()


@pytest.mark.llama
def test_cli_export_registers_with_standin(exported, merged_dir):
    """`toolkit export ... --register` against the stand-in Ollama (see tests/ollama_standin.py)."""
    out, manifest = exported
    with StandinOllama() as server:
        args = ["export", str(merged_dir), "--out", str(out), *EXPORT_ARGS, "--register", "--ollama-host", server.url]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [str(out), "ollama run model"]
        digest = gguf.gguf_digest(manifest, "model-Q4_K_M.gguf")
        assert server.models["model:latest"]["files"] == {"model-Q4_K_M.gguf": digest}
        assert server.blobs[digest] == (out / "model-Q4_K_M.gguf").read_bytes()


@pytest.mark.llama
def test_cli_export_register_without_server(exported, merged_dir):
    out, _ = exported
    args = ["export", str(merged_dir), "--out", str(out), *EXPORT_ARGS, "--register", "--ollama-host",
            "http://127.0.0.1:9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: no Ollama server answers at http://127.0.0.1:9")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.ollama
@pytest.mark.llama
def test_register_export_with_real_server(exported):
    """The registration path of the stand-in tests against a real Ollama at $OLLAMA_HOST."""
    import uuid

    import ollama as client_lib

    from toolkit import ollama

    host = real_ollama_host()
    if host is None:
        pytest.skip("no Ollama server answers at $OLLAMA_HOST")
    out, _ = exported
    name = f"toolkit-test-{uuid.uuid4().hex[:8]}"
    try:
        assert ollama.register(out / "Modelfile", name, host=host)["status"] == "created"
        assert ollama.register(out / "Modelfile", name, host=host)["status"] == "unchanged"
        shown = client_lib.Client(host=host).show(name)
        assert "<|start|>" in shown.template and shown.details.family in ("gptoss", "gpt-oss")
    finally:
        client_lib.Client(host=host).delete(name)


@pytest.mark.slow
@pytest.mark.llama
def test_pipeline_prep_train_merge_export_register(tiny_model, sample_tsv, converter, tmp_path):
    """The whole chain with the real stages: a few training steps (tiny-cpu preset), merge, export, Ollama."""
    from toolkit import corpus, train

    prep = tmp_path / "prep"
    corpus.prepare(config.build("prep"), sample_tsv, prep)
    overrides = [f"train.base_model={tiny_model}", "train.max_steps=4", "train.eval_steps=0", "train.save_steps=0"]
    train.run(config.build("train", "tiny-cpu", overrides), prep, tmp_path / "train")
    merged = merge.run(config.build("merge"), tmp_path / "train", tmp_path / "merge")
    assert merged["metrics"]["parity"]["max_abs_diff_merged_vs_adapter"] < 1e-4
    assert merged["metrics"]["parity"]["max_abs_diff_merged_vs_base"] > 1e-4  # training moved the weights

    exported = gguf.run(export_cfg(name="zh-nan-tiny"), tmp_path / "merge", tmp_path / "export")
    files = {f["type"]: f for f in exported["metrics"]["files"]}
    assert files["f32"]["rel_diff_last"] < 1e-5 and all(f["passed"] for f in files.values())
    modelfile = (tmp_path / "export" / "Modelfile").read_text()
    assert "FROM ./zh-nan-tiny-Q4_K_M.gguf" in modelfile
    assert 'SYSTEM """reasoning language: English\n\nTranslate the user' in modelfile
    with StandinOllama() as server:
        from toolkit import ollama

        result = ollama.register(tmp_path / "export" / "Modelfile", "zh-nan-tiny", host=server.url)
        assert result["status"] == "created" and "zh-nan-tiny:latest" in server.models
