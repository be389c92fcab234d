"""`toolkit export MERGED_DIR --out DIR`: GGUF files through llama.cpp, verified, plus an Ollama Modelfile.

1. llama.cpp's own `convert_hf_to_gguf.py` (pinned, see `toolkit.llamacpp`) converts the merged folder
   to f32/f16/bf16, in a subprocess; an unknown tokenizer hash needs an explicit `--pre-tokenizer`.
2. llama-cpp-python's `llama_model_quantize` makes the quantized files (Q8_0, Q4_K_M, MXFP4_MOE ...).
3. Every file is loaded with llama-cpp-python and its logits on Harmony prompts (the training prompt
   format, from the manifests) are compared with the merged HF model's: float files by the largest
   next-token logit difference relative to the largest logit, quantized ones by top-1 agreement over
   all prompt positions. The figures go into the manifest; a file that fails stops the export.
4. The Modelfile is rendered from `modelfiles/`, then manifest.json is written last.

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

from toolkit import artifacts, llamacpp, ollama, prompt
from toolkit.config import ExportConfig, as_dict
from toolkit.errors import ArtifactError, ConfigError, ExternalToolError

log = logging.getLogger(__name__)
FLOAT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
QUANT_FTYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "MXFP4_MOE": "LLAMA_FTYPE_MOSTLY_MXFP4_MOE",
}
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


def quantize(src: Path, dst: Path, kind: str, n_threads: int) -> None:
    """One quantized file from the float GGUF, through llama.cpp's quantize API."""
    import llama_cpp

    ftype = getattr(llama_cpp, QUANT_FTYPES[kind], None)
    if ftype is None:
        raise ExternalToolError(f"llama-cpp-python {llama_cpp.__version__} has no {QUANT_FTYPES[kind]}; "
                                f"drop {kind} from --quant.")
    # llama-cpp-python prints llama.cpp's log when its logger is below the message level: keep the
    # per-tensor listing for -vv.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG)
                                                   else logging.WARNING)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    log.info("export: quantizing %s -> %s", src.name, kind)
    with artifacts.atomic_path(dst) as tmp:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise ExternalToolError(f"llama_model_quantize({src.name} -> {kind}) returned {status}; see the log "
                                    "above for llama.cpp's reason.")


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
    """The merged HF model's token ids and logits per prompt: all positions with llama.cpp's RoPE rounding
    (`logits`), and the last position as shipped (`last_as_shipped`, only when the rounding differs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = AutoConfig.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, device_map=device).eval()
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]

    def forward(model: Any, last_only: bool) -> list[Any]:
        with torch.no_grad():
            out = [model(input_ids=torch.tensor([row], device=device)).logits[0] for row in ids]
        return [(x[-1] if last_only else x).float().cpu().numpy() for x in out]

    shipped = None
    if match_llama_cpp_rope(config):
        shipped = forward(model, last_only=True)
        del model
        model = AutoModelForCausalLM.from_pretrained(merged_dir, config=config, dtype=dtype,
                                                     device_map=device).eval()
    ref = {"ids": ids, "logits": forward(model, last_only=False), "last_as_shipped": shipped,
           "dtype": str(dtype).removeprefix("torch."), "rope_rounded": shipped is not None}
    del model
    return ref


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
    """Logit figures of one GGUF against the merged model, and a short greedy sample."""
    import llama_cpp
    import numpy as np

    ids = ref["ids"]
    n_ctx = max(len(row) for row in ids) + 16
    # f32 KV cache: the default f16 cache alone moves logits by ~1e-4 and would hide what we measure.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_gpu_layers=-1,
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


def check_preconditions(cfg: ExportConfig) -> Path:
    """Converter, pre-tokenizer name and llama-cpp-python, checked before any work starts."""
    folder = llamacpp.converter_dir(cfg.llama_cpp)
    if cfg.pre_tokenizer is not None:
        names = llamacpp.pre_tokenizer_names(folder)
        if cfg.pre_tokenizer not in names:
            raise ConfigError(f"--pre-tokenizer {cfg.pre_tokenizer!r}: not a name llama.cpp knows. Known: "
                              f"{', '.join(names)}.")
    if cfg.quants or cfg.verify:
        try:
            import llama_cpp
        except ImportError as exc:
            raise ExternalToolError(
                f"llama-cpp-python is not importable ({exc}); quantizing and verifying need it. Install it with "
                f"`pip install llama-cpp-python=={llamacpp.LLAMA_CPP_PYTHON_VERSION}` (builds from source, minutes), "
                "or pass --quant none --no-verify."
            ) from None
        if llama_cpp.__version__ != llamacpp.LLAMA_CPP_PYTHON_VERSION:
            log.warning("export: llama-cpp-python %s runs files converted by the llama.cpp of %s",
                        llama_cpp.__version__, llamacpp.LLAMA_CPP_PYTHON_VERSION)
    return folder


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
    with artifacts.building(out_dir) as build:
        manifest = _export(cfg, merged_dir, merged, folder, config, inputs, build)
    sizes = ", ".join(f"{f['type']} {f['bytes'] / 1e6:.1f} MB" for f in manifest["metrics"]["files"])
    log.info("export: %d GGUF files (%s) in %.0fs -> %s", len(manifest["metrics"]["files"]), sizes,
             manifest["metrics"]["seconds"], out_dir)
    return manifest


def _export(cfg: ExportConfig, merged_dir: Path, merged: dict[str, Any], folder: Path, config: dict[str, Any],
            inputs: list[Path], out_dir: Path) -> dict[str, Any]:
    started = time.monotonic()
    name = cfg.name or "model"
    paths = {cfg.outtype: out_dir / gguf_name(name, cfg.outtype)}
    substituted = convert(merged_dir, paths[cfg.outtype], cfg.outtype, folder, cfg.pre_tokenizer)
    for kind in cfg.quants:
        paths[kind] = out_dir / gguf_name(name, kind)
        quantize(paths[cfg.outtype], paths[kind], kind, cfg.n_threads)

    spec = prompt.from_manifest(merged)
    files: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}
    if cfg.verify:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        prompts = [spec.render_prompt(text, tokenizer) for text in cfg.verify_texts]
        ref = reference_logits(merged_dir, prompts)
        reference = {"dtype": ref["dtype"], "rope_rounded_like_llama_cpp": ref["rope_rounded"],
                     "prompts": len(prompts), "tokens": [len(row) for row in ref["ids"]]}
        files = [verify(path, kind, prompts, ref, cfg) for kind, path in paths.items()]
        failed = [f for f in files if not f["passed"]]
        if failed:
            raise ArtifactError("export check failed: " + "; ".join(
                f"{f['file']} rel_diff_last {f['rel_diff_last']:.3g}, top-1 {f['top1_agreement']:.3f} "
                f"(needs {f['criterion']})" for f in failed) + ". Nothing was written; the output folder is as it was.")
    else:
        files = [{"file": p.name, "type": k, "bytes": p.stat().st_size, "passed": None} for k, p in paths.items()]

    harmony_model = prompt.find_chat_format(merged) in ("harmony", None)
    if harmony_model:
        values = ollama.modelfile_values(spec, paths[cfg.ollama_file_type()].name, name,
                                         temperature=cfg.temperature, num_ctx=cfg.num_ctx, num_predict=cfg.num_predict)
        ollama.write_modelfile(out_dir, cfg.modelfile_template, values)
    else:  # the shipped Modelfile template is gpt-oss's Harmony one: wrong for any other chat format
        log.warning("export: no Modelfile: the model uses its own chat template, not Harmony; `ollama create` it "
                    "with just `FROM ./%s` (Ollama reads the GGUF's chat template)", paths[cfg.ollama_file_type()].name)
    elapsed = time.monotonic() - started
    metrics = {"files": files, "reference": reference, "seconds": round(elapsed, 1),
               "pre_tokenizer": {"requested": cfg.pre_tokenizer, "substituted": substituted}}
    return artifacts.write_manifest(
        out_dir, stage="export", config=config, inputs=inputs, metrics=metrics, upstream=merged,
        extra={"llama_cpp": {"converter": str(folder), "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON_VERSION,
                             "sdist_sha256": llamacpp.SDIST_SHA256},
               "ollama": {"modelfile": "Modelfile" if harmony_model else None,
                          "gguf": paths[cfg.ollama_file_type()].name, "name": name}},
    )


def gguf_digest(manifest: dict[str, Any], file_name: str) -> str | None:
    """"sha256:..." of an exported file as the manifest recorded it (saves re-hashing a large GGUF)."""
    for record in manifest.get("outputs", []):
        if record["path"] == file_name:
            return f"sha256:{record['sha256']}"
    return None
