"""`toolkit export MERGED_DIR --out DIR`: GGUF files through llama.cpp, verified, plus an Ollama Modelfile.

1. llama.cpp's own `convert_hf_to_gguf.py` (pinned, see `toolkit.llamacpp`) converts the merged folder
   to f32/f16/bf16, in a subprocess; an unknown tokenizer hash needs an explicit `--pre-tokenizer`.
   A merge in gpt-oss' released MXFP4 layout (`toolkit merge --format mxfp4`) is converted straight to
   an MXFP4_MOE file: the converter passes the expert blocks/scales through bit for bit (it only
   repacks them into ggml's block layout) and writes the other tensors in `outtype`. No float copy of
   the experts is ever written; that file is the one Ollama gets.
2. llama-cpp-python's `llama_model_quantize` makes the quantized files (Q8_0, Q4_K_M, MXFP4_MOE ...)
   from the converted file. From an MXFP4 file that needs llama.cpp's `allow_requantize`: the MXFP4
   values ARE the merged weights, so quantizing them again loses nothing a float source would keep.
3. Every file is loaded with llama-cpp-python (steps 2 and 3 run in a process of their own,
   `toolkit.llama_worker`: a CUDA build crashed beside torch) and its logits on Harmony prompts (the training prompt
   format, from the manifests) are compared with the merged checkpoint's, computed layer by layer
   (`toolkit.layerwise`: one decoder layer's weights in memory at a time, never the whole model):
   float files, and the MXFP4_MOE file of an mxfp4 merge (same weights), by the largest next-token
   logit difference relative to the largest logit; quantized ones by top-1 agreement over all prompt
   positions. The figures go into the manifest; a file that fails stops the export.
4. The Modelfile is rendered from `modelfiles/`, then manifest.json is written last, with the run's
   resources (`toolkit.resources`: peak RSS, the converter's, and the output folder's disk high-water mark).

The export is built in a hidden folder beside OUT that replaces OUT only when complete, so a failed or
interrupted export leaves OUT as it was (and a killed one a hidden folder the next run removes and redoes);
a finished export re-run with the same config and merge folder is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from toolkit import artifacts, llamacpp, ollama, prompt, resources, runs
from toolkit.config import ExportConfig, as_dict
from toolkit.errors import ArtifactError, ConfigError, ExternalToolError
from toolkit.logs import logger_level

log = logging.getLogger(__name__)
FLOAT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
QUANT_FTYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "MXFP4_MOE": "LLAMA_FTYPE_MOSTLY_MXFP4_MOE",
}
MXFP4_KIND = "MXFP4_MOE"  # what llama.cpp calls a file whose MoE experts are MXFP4 (the converter's file type too)
UNKNOWN_HASH = "BPE pre-tokenizer was not recognized"
SUBSTITUTED = "tokenizer hash unknown to llama.cpp"


def gguf_name(name: str, kind: str) -> str:
    return f"{name}-{FLOAT_TYPES.get(kind, kind)}.gguf"


def _tail(text: str, lines: int = 15) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def convert(merged_dir: Path, out_path: Path, outtype: str, folder: Path, pre_tokenizer: str | None) -> bool:
    """Run llama.cpp's converter; returns True when the --pre-tokenizer fallback was used."""
    with artifacts.atomic_path(out_path) as tmp:
        cmd = [sys.executable, "-m", "toolkit.llamacpp", "convert", str(folder), pre_tokenizer or "-", "--",
               str(merged_dir), "--outfile", str(tmp), "--outtype", outtype]
        log.info("export: converting %s to %s with llama.cpp's convert_hf_to_gguf.py", merged_dir, outtype)
        try:
            output = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    check=True).stdout
        except subprocess.CalledProcessError as exc:
            hint = ""
            if UNKNOWN_HASH in exc.stdout:
                hint = (" The converter does not know this tokenizer's hash: pass --pre-tokenizer NAME "
                        "(gpt-4o for gpt-oss-style BPE) if you know which pre-tokenizer it uses.")
            raise ExternalToolError(f"`{' '.join(cmd)}` failed ({exc.returncode}).{hint} Output tail: "
                                    f"{_tail(exc.stdout)}") from None
        log.debug("converter output:\n%s", output)
    substituted = SUBSTITUTED in output
    if substituted:
        log.warning("export: the converter did not know the tokenizer's hash; wrote pre-tokenizer %r as "
                    "--pre-tokenizer says", pre_tokenizer)
    return substituted


def quantize(src: Path, dst: Path, kind: str, n_threads: int, allow_requantize: bool = False) -> None:
    """One quantized file from the converted GGUF, through llama.cpp's quantize API.

    allow_requantize: the source holds quantized tensors (the MXFP4 experts of an mxfp4 merge) that `kind`
    stores differently; llama.cpp refuses those unless told. A tensor already of the target type is copied.
    """
    import llama_cpp

    ftype = getattr(llama_cpp, QUANT_FTYPES[kind], None)
    if ftype is None:
        raise ExternalToolError(f"llama-cpp-python {llama_cpp.__version__} has no {QUANT_FTYPES[kind]}; "
                                f"drop {kind} from --quant.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    log.info("export: quantizing %s -> %s%s", src.name, kind, " (requantizing its MXFP4 experts)"
             if allow_requantize and kind != MXFP4_KIND else "")
    # llama-cpp-python prints llama.cpp's log when its logger is below the message level: keep the
    # per-tensor listing for -vv.
    level = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    with artifacts.atomic_path(dst) as tmp, logger_level("llama-cpp-python", level):
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise ExternalToolError(f"llama_model_quantize({src.name} -> {kind}) returned {status}; see the log "
                                    "above for llama.cpp's reason.")


def _llama(cfg: ExportConfig, step: str, *args: Any) -> Any:
    """`quantize` or `verify` where `export.llama_process` says: a fresh process of its own (`toolkit.llama_worker`:
    llama.cpp never shares a process with torch) or this one."""
    if cfg.llama_process == "same":
        return {"quantize": quantize, "verify": verify}[step](*args)
    from toolkit import llama_worker

    return llama_worker.run(step, *args)


def _failed_check_fix(failed: list[dict[str, Any]], files: list[dict[str, Any]]) -> str:
    """What to do about files that failed the check: export the ones that passed, or accept the loss knowingly."""
    quantized = [f["type"] for f in failed if f["type"] in QUANT_FTYPES]
    passed = [f["type"] for f in files if f["passed"]]
    fix = []
    if quantized:
        fix.append(f"leave {', '.join(quantized)} out of --quant (a model this sensitive to rounding loses more in "
                   f"them{'; ' + ', '.join(passed) + ' passed' if passed else ''}), or accept it with "
                   f"--set export.min_top1=LOWER")
    if len(quantized) < len(failed):
        fix.append("for a float file, look at the merge (its own check) or accept it with "
                   "--set export.float_rtol=HIGHER")
    return "Fix: " + "; ".join(fix) + "; --no-verify skips the check."


def match_llama_cpp_rope(config: Any) -> bool:
    """Round the YaRN correction range as llama.cpp always does; True when that changed the config.

    gpt-oss ships `truncate: false` (OpenAI's reference keeps the range fractional); llama.cpp's
    `ggml_rope_yarn_corr_dims` floors/ceils it, so its logits drift from HF's with position (about 1e-2
    relative at 300 tokens on the tiny model). Comparing against HF with the same rounding isolates the
    conversion; the drift from HF as shipped is reported separately. Same gap in vLLM: vllm#27722.
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        rope["truncate"] = True
        return True
    return False


def reference_logits(merged_dir: Path, prompts: list[str]) -> dict[str, Any]:
    """The merged checkpoint's token ids and float32 logits per prompt: all positions with llama.cpp's RoPE
    rounding (`logits`), and the last position as shipped (`last_as_shipped`, only when the rounding differs).

    Layer by layer (`toolkit.layerwise`): host memory holds one decoder layer's weights, never the model;
    MXFP4 experts are dequantized exactly. The as-shipped figure costs a second pass over the weights.
    """
    from transformers import AutoConfig, AutoTokenizer

    from toolkit import layerwise

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    config = AutoConfig.from_pretrained(merged_dir)
    rounded = match_llama_cpp_rope(config)
    log.info("export: reference logits of %s, one layer at a time%s", merged_dir,
             " (twice: with llama.cpp's RoPE rounding and as shipped)" if rounded else "")
    logits = [x.numpy() for x in layerwise.logits(merged_dir, ids, config=config)]
    shipped = None
    if rounded:
        shipped = [x[-1].numpy() for x in layerwise.logits(merged_dir, ids, config=AutoConfig.from_pretrained(
            merged_dir))]
    return {"ids": ids, "logits": logits, "last_as_shipped": shipped, "dtype": "float32", "rope_rounded": rounded}


def _new_positions(ids: list[list[int]]) -> list[range]:
    """For each prompt, the positions not shared with an earlier prompt's prefix (shared ones score once)."""
    out = []
    for k, row in enumerate(ids):
        start = 0
        for prev in ids[:k]:
            common = next((i for i, (a, b) in enumerate(zip(row, prev)) if a != b), min(len(row), len(prev)))
            start = max(start, common)
        out.append(range(start, len(row)))
    return out


def verify(path: Path, kind: str, prompts: list[str], ref: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    """Logit figures of one GGUF against the merged model, and a short greedy sample.

    A float file (f32/f16/bf16) is held to the float criterion (relative logit difference); a quantized file to
    top-1 agreement, and so is the MXFP4_MOE file of an mxfp4 merge although its weights are the merged ones
    unchanged: llama.cpp multiplies MXFP4 experts by 8-bit (Q8_0) activations, which moves the logits of a
    24-layer model by a few percent of their range (rel_diff_last is recorded either way).
    """
    import llama_cpp
    import numpy as np

    ids = ref["ids"]
    n_ctx = max(len(row) for row in ids) + 16
    # f32 KV cache: the default f16 cache alone moves logits by ~1e-4 and would hide what we measure.
    # n_gpu_layers 0: llama.cpp computes on the CPU alone (op_offload off: else a GPU build moves large batches of
    # a CPU layer to the GPU all the same)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                          n_gpu_layers=cfg.n_gpu_layers, **({"op_offload": False} if cfg.n_gpu_layers == 0 else {}),
                          seed=0, n_threads=cfg.n_threads or None, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    same_tokens, agree, total = True, 0, 0
    last_diff = last_scale = shipped_diff = 0.0
    for k, (text, row, want, fresh) in enumerate(zip(prompts, ids, ref["logits"], _new_positions(ids))):
        same_tokens &= llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == row
        llm.reset()
        llm.eval(row)
        got = np.asarray(llm.scores[: len(row)], dtype=np.float32)[:, : want.shape[1]]
        last_diff = max(last_diff, float(np.abs(got[-1] - want[-1]).max()))
        last_scale = max(last_scale, float(np.abs(want[-1]).max()))
        if ref["last_as_shipped"] is not None:
            shipped_diff = max(shipped_diff, float(np.abs(got[-1] - ref["last_as_shipped"][k]).max()))
        agree += int((got[fresh.start:].argmax(-1) == want[fresh.start:].argmax(-1)).sum())
        total += len(fresh)
    llm.reset()
    completion = llm.create_completion(prompts[0], max_tokens=8, temperature=0.0)
    architecture = llm.metadata.get("general.architecture")  # Ollama parses Harmony for "gpt-oss"
    llm.close()
    scale = max(last_scale, 1e-9)
    figures = {
        "file": path.name, "type": kind, "bytes": path.stat().st_size, "tokenizer_match": same_tokens,
        "architecture": architecture,
        "max_abs_diff_last": last_diff, "rel_diff_last": last_diff / scale,
        "rel_diff_last_hf_rope": (shipped_diff if ref["rope_rounded"] else last_diff) / scale,
        "top1_agreement": agree / max(total, 1), "positions": total, "sample": completion["choices"][0]["text"],
        "completion_tokens": completion["usage"]["completion_tokens"],
        "tensor_types": tensor_types(path),
    }
    if kind in FLOAT_TYPES:
        figures["passed"] = figures["rel_diff_last"] <= cfg.float_rtol
        figures["criterion"] = f"rel_diff_last <= {cfg.float_rtol}"
    else:
        figures["passed"] = figures["top1_agreement"] >= cfg.min_top1
        figures["criterion"] = f"top1_agreement >= {cfg.min_top1}"
    log.info("export: %s: logits diff %.3g (rel %.2g), top-1 agreement %.3f over %d positions, tokens %s",
             path.name, last_diff, figures["rel_diff_last"], figures["top1_agreement"], total,
             "match" if same_tokens else "DIFFER")
    return figures


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the GGUF holds, e.g. {"MXFP4": 72, "BF16": 98, "F32": 121}."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def is_mxfp4_checkpoint(merged_dir: Path) -> bool:
    """The merged folder is in gpt-oss' released MXFP4 layout (quantization_config in config.json)."""
    import json

    from toolkit import mxfp4

    path = Path(merged_dir) / "config.json"
    return path.is_file() and mxfp4.is_mxfp4(json.loads(path.read_text(encoding="utf-8")))


def check_preconditions(cfg: ExportConfig) -> Path:
    """Converter, pre-tokenizer name and llama-cpp-python, checked before any work starts."""
    folder = llamacpp.converter_dir(cfg.llama_cpp)
    if cfg.pre_tokenizer is not None:
        names = llamacpp.pre_tokenizer_names(folder)
        if cfg.pre_tokenizer not in names:
            raise ConfigError(f"--pre-tokenizer {cfg.pre_tokenizer!r}: not a name llama.cpp knows. Known: "
                              f"{', '.join(names)}.")
    if cfg.quants or cfg.verify:
        version = llama_cpp_version()
        if version is None:
            raise ExternalToolError(
                "llama-cpp-python is not installed; quantizing and verifying need it. Install it with "
                f"`pip install llama-cpp-python=={llamacpp.LLAMA_CPP_PYTHON_VERSION}` (builds from source, minutes), "
                "or pass --quant none --no-verify.")
        if version != llamacpp.LLAMA_CPP_PYTHON_VERSION:
            log.warning("export: llama-cpp-python %s runs files converted by the llama.cpp of %s",
                        version, llamacpp.LLAMA_CPP_PYTHON_VERSION)
    return folder


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version from its metadata, None when it is not installed: without importing it.

    Importing it loads llama.cpp's shared libraries into this process, and with `export.llama_process=child` the
    export's own process must never hold them beside torch: on the H200 (2026-12-03) a CUDA build imported here
    for this check alone made torch segfault later in the same process (importing torch.quantization) while the
    worker process did its part. A package that is installed but fails to load fails in the worker, as one error.
    """
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:  # importable from a folder on the path without metadata
        return "unknown"


def run(cfg: ExportConfig, merged_dir: Path, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Convert, quantize, verify and write the Modelfile; returns the export manifest."""
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    merged = artifacts.read_manifest(merged_dir, stage="merge")
    folder = check_preconditions(cfg)
    config = as_dict(cfg)
    inputs = [merged_dir / artifacts.MANIFEST]  # the merge run, by its manifest's path and sha256
    done = artifacts.check_out_dir(out_dir, stage="export", config=config, force=force, inputs=inputs)
    if done is not None:
        log.info("export: %s already holds this export; nothing to do (--force redoes it)", out_dir)
        return done
    # Built beside OUT and swapped in when complete. A failed export (--force too) leaves OUT as it was; a killed
    # one leaves only the hidden build folder (complete GGUFs, .tmp files), which the next run removes and redoes.
    with artifacts.building(out_dir) as build, resources.Usage(watch=build) as usage:
        manifest = _export(cfg, merged_dir, merged, folder, config, inputs, build, usage)
    files = manifest["metrics"]["files"]
    sizes = ", ".join(f"{f['type']} {f['bytes'] / 1e6:.1f} MB" for f in files)
    log.info("export: %d GGUF files (%s) in %.0fs, %s -> %s", len(files), sizes, manifest["metrics"]["seconds"],
             resources.summary(manifest["metrics"]["resources"]), out_dir)
    return manifest


def _export(cfg: ExportConfig, merged_dir: Path, merged: dict[str, Any], folder: Path, config: dict[str, Any],
            inputs: list[Path], out_dir: Path, usage: resources.Usage) -> dict[str, Any]:
    started = time.monotonic()
    name = cfg.name or "model"
    mxfp4_merge = is_mxfp4_checkpoint(merged_dir)
    # The converted file: for an MXFP4 merge its experts stay MXFP4 (only the other tensors take outtype).
    source = MXFP4_KIND if mxfp4_merge else cfg.outtype
    if mxfp4_merge:
        log.info("export: %s holds MXFP4 experts: converting straight to %s (experts passed through, the other "
                 "tensors %s); no float GGUF of the experts is written", merged_dir, MXFP4_KIND, cfg.outtype)
    paths = {source: out_dir / gguf_name(name, source)}
    substituted = convert(merged_dir, paths[source], cfg.outtype, folder, cfg.pre_tokenizer)
    for kind in cfg.quants:
        if kind == source:
            continue  # the converted file is already this type
        paths[kind] = out_dir / gguf_name(name, kind)
        _llama(cfg, "quantize", paths[source], paths[kind], kind, cfg.n_threads, mxfp4_merge)
    ollama_kind = cfg.ollama_file_type()
    if ollama_kind == cfg.outtype:
        ollama_kind = source

    spec = prompt.from_manifest(merged)
    files: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}
    if cfg.verify:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        prompts = [spec.render_prompt(text, tokenizer) for text in cfg.verify_texts]
        ref = reference_logits(merged_dir, prompts)
        reference = {"dtype": ref["dtype"], "rope_rounded_like_llama_cpp": ref["rope_rounded"],
                     "prompts": len(prompts), "tokens": [len(row) for row in ref["ids"]], "method": "layerwise"}
        files = [_llama(cfg, "verify", path, kind, prompts, ref, cfg) for kind, path in paths.items()]
        failed = [f for f in files if not f["passed"]]
        if failed:
            raise ArtifactError("export check failed: " + "; ".join(
                f"{f['file']} rel_diff_last {f['rel_diff_last']:.3g}, top-1 {f['top1_agreement']:.3f} "
                f"(needs {f['criterion']})" for f in failed) + ". Nothing was written; the output folder is as it was. "
                + _failed_check_fix(failed, files))
    else:
        files = [{"file": p.name, "type": k, "bytes": p.stat().st_size, "passed": None, "tensor_types": tensor_types(p)}
                 for k, p in paths.items()]

    harmony_model = runs.chat_format(merged) in ("harmony", None)
    if harmony_model:
        values = ollama.modelfile_values(spec, paths[ollama_kind].name, name,
                                         temperature=cfg.temperature, num_ctx=cfg.num_ctx, num_predict=cfg.num_predict)
        ollama.write_modelfile(out_dir, cfg.modelfile_template, values)
    else:  # the shipped Modelfile template is gpt-oss's Harmony one: wrong for any other chat format
        log.warning("export: no Modelfile: the model uses its own chat template, not Harmony; `ollama create` it "
                    "with just `FROM ./%s` (Ollama reads the GGUF's chat template)", paths[ollama_kind].name)
    elapsed = time.monotonic() - started
    metrics = {"files": files, "reference": reference, "seconds": round(elapsed, 1),
               "converted": {"file": paths[source].name, "type": source,
                             "experts": "MXFP4 (passed through)" if mxfp4_merge else cfg.outtype,
                             "other_tensors": cfg.outtype},
               "pre_tokenizer": {"requested": cfg.pre_tokenizer, "substituted": substituted},
               "resources": usage.figures()}
    return artifacts.write_manifest(
        out_dir, stage="export", config=config, inputs=inputs, metrics=metrics, upstream=merged,
        extra={"llama_cpp": {"converter": str(folder), "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON_VERSION,
                             "sdist_sha256": llamacpp.SDIST_SHA256},
               "ollama": {"modelfile": "Modelfile" if harmony_model else None,
                          "gguf": paths[ollama_kind].name, "name": name}},
    )


def gguf_digest(manifest: dict[str, Any], file_name: str) -> str | None:
    """"sha256:..." of an exported file as the manifest recorded it (saves re-hashing a large GGUF)."""
    for record in manifest.get("outputs", []):
        if record["path"] == file_name:
            return f"sha256:{record['sha256']}"
    return None
