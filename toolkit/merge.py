"""`toolkit merge TRAIN_DIR --out DIR`: fold a LoRA adapter into its base model's weights.

The base named by the train manifest is loaded in 16 bits (float32 on CPU; gpt-oss MXFP4 experts are
dequantized), the adapter (attention and expert LoRA) applied and merged with peft's `merge_and_unload`,
and the result saved as safetensors beside the tokenizer and chat template. Before the manifest is
written the merge is checked on a Harmony prompt built exactly as in training: the merged model's
next-token logits must equal base+adapter within tolerance and differ from the bare base.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from toolkit import artifacts, prompt
from toolkit.config import MergeConfig, as_dict
from toolkit.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
# Largest allowed |merged - (base+adapter)| logit: max(atol, rtol * the adapter's own effect). A 16-bit merge
# rounds every merged weight once; through gpt-oss-20b's 24 layers that moved logits by 1.6-1.8 where the adapter
# moved them by 10.5 (bf16, random full-size weights, bench/results/multi_gpu-2026-11-25-h100x2.md), so 16-bit
# merges are also judged relative to the effect. A lost or mis-scaled adapter misses by about its whole effect.
DEFAULT_ATOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}
DEFAULT_RTOL = {"float32": 0.0, "bfloat16": 0.25, "float16": 0.25}


def find_adapter(train_dir: Path) -> Path:
    """The folder holding adapter_config.json: the train folder itself or its `adapter/` subfolder."""
    for candidate in (train_dir, train_dir / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ArtifactError(
        f"{train_dir}: no {ADAPTER_CONFIG} here or in {train_dir / 'adapter'}. Pass the folder `toolkit train` wrote."
    )


def base_model_of(train_manifest: dict[str, Any], adapter_dir: Path, override: str | None) -> str:
    """The base model: --base-model, else the train manifest's config, else the adapter's own record."""
    if override:
        return override
    name = (train_manifest.get("config") or {}).get("base_model") or train_manifest.get("base_model")
    if not name:
        name = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not name:
        raise ArtifactError(f"{adapter_dir}: no base model recorded. Pass --base-model PATH_OR_ID.")
    return str(name)


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return name, getattr(torch, name)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("merge.device: cuda was asked for but no CUDA device is visible. Use --device cpu.")
    return name


def load_base(base: str, dtype: Any, device: str):
    """The base model in `dtype`; gpt-oss MXFP4 checkpoints are dequantized on load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    kwargs: dict[str, Any] = {"dtype": dtype}
    quant = getattr(config, "quantization_config", None)
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(quant_method).lower().endswith("mxfp4"):
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        log.info("merge: %s is MXFP4; dequantizing to %s", base, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, device_map=device, **kwargs)
    model.eval()
    return model


def next_token_logits(model, input_ids) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits[0, -1].float().cpu()


# Files a fast tokenizer's save_pretrained does not write but llama.cpp's converter reads: without
# tokenizer.model a SentencePiece model (Gemma) is converted through tokenizer.json, which loses the
# byte-fallback token types, and the GGUF then prints "<0xE4>" instead of the byte.
VOCAB_FILES = ("tokenizer.model",)


def copy_vocab_files(base: str, out_dir: Path) -> None:
    """Copy the base model's vocabulary files the merged folder lacks (local bases only)."""
    for name in VOCAB_FILES:
        source = Path(base) / name
        if source.is_file() and not (out_dir / name).exists():
            shutil.copyfile(source, out_dir / name)


def parity_prompt(train_manifest: dict[str, Any], tokenizer, text: str) -> tuple[str, str]:
    """(prompt, where its format came from): the training prompt of the prep manifest upstream."""
    try:
        spec, source = prompt.from_manifest(train_manifest), "prep manifest"
    except ArtifactError:
        log.warning("merge: no prep manifest upstream of the train folder; using the default translation prompt")
        spec, source = prompt.default_spec(), "default"
    return spec.render_prompt(text, tokenizer), source


def check_parity(base_logits, adapted_logits, merged_logits, atol: float, rtol: float = 0.0) -> dict[str, Any]:
    """Figures of the merge check; raises ArtifactError unless merged == base+adapter != bare base.

    merged and base+adapter may differ by max(atol, rtol * the adapter's effect on the logits).
    """
    effect = float((adapted_logits - base_logits).abs().max())
    to_adapted = float((merged_logits - adapted_logits).abs().max())
    to_base = float((merged_logits - base_logits).abs().max())
    allowed = max(atol, rtol * effect)
    figures = {
        "max_abs_diff_merged_vs_adapter": to_adapted,
        "max_abs_diff_merged_vs_base": to_base,
        "max_abs_diff_adapter_vs_base": effect,
        "atol": atol,
        "rtol": rtol,
        "allowed": allowed,
        "top1_merged": int(merged_logits.argmax()),
        "top1_adapter": int(adapted_logits.argmax()),
        "top1_base": int(base_logits.argmax()),
    }
    if effect == 0.0:
        raise ArtifactError(
            "merge check failed: the adapter had no effect (base+adapter logits equal the base's), e.g. an "
            "untrained LoRA. Check that the train folder holds a trained adapter; nothing was written."
        )
    if to_adapted > allowed:
        raise ArtifactError(
            f"merge check failed: merged logits differ from base+adapter by {to_adapted:.3g} (> {allowed:.3g}; the "
            f"adapter itself moves them by {effect:.3g}). The merge is wrong; nothing was written. Re-run with -vv "
            "and report it."
        )
    if to_base <= to_adapted:
        raise ArtifactError(
            f"merge check failed: the merged model is no closer to base+adapter ({to_adapted:.3g}) than to the bare "
            f"base ({to_base:.3g}); the adapter moves logits by only {effect:.3g}, below this dtype's rounding. "
            "Merge in float32 (--dtype float32) to check it; nothing was written."
        )
    return figures


def saved_tensor_names(model: Any) -> set[str]:
    """The tensor names `save_pretrained` writes: a tied weight (e.g. Gemma's lm_head = embeddings) is saved once."""
    names, seen = set(), set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen or tensor.numel() == 0:
            names.add(name)
            seen.add(key)
    return names


def check_saved_keys(out_dir: Path, expected: set[str]) -> None:
    """The saved checkpoint holds exactly the base model's tensor names (no LoRA or base_layer leftovers)."""
    from safetensors import safe_open

    found: set[str] = set()
    for shard in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            found |= set(fh.keys())
    if found != expected:
        extra, missing = sorted(found - expected)[:5], sorted(expected - found)[:5]
        raise ArtifactError(f"{out_dir}: saved tensors differ from the base model's (extra {extra}, missing {missing}).")


def run(cfg: MergeConfig, train_dir: Path, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Merge the adapter of `train_dir` into its base and write the merged model to `out_dir`."""
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    train_manifest = artifacts.read_manifest(train_dir, stage="train")
    adapter_dir = find_adapter(train_dir)
    base = base_model_of(train_manifest, adapter_dir, cfg.base_model)
    config = {**as_dict(cfg), "base_model": base}
    inputs = [train_dir / artifacts.MANIFEST]  # the train run, by its manifest's path and sha256
    done = artifacts.check_out_dir(out_dir, stage="merge", config=config, force=force, inputs=inputs)
    if done is not None:
        log.info("merge: %s already holds this merge; nothing to do (--force redoes it)", out_dir)
        return done
    # Built beside OUT and swapped in when complete: a failed or killed merge (--force too) leaves OUT as it was.
    with artifacts.building(out_dir) as build:
        manifest = _merge(cfg, train_manifest, adapter_dir, base, config, inputs, build)
    metrics = manifest["metrics"]
    log.info("merge: adapter folded into %s in %.0fs, %.1f MB, logits diff vs base+adapter %.2g -> %s", base,
             metrics["seconds"], metrics["weights_bytes"] / 1e6, metrics["parity"]["max_abs_diff_merged_vs_adapter"],
             out_dir)
    return manifest


def _merge(cfg: MergeConfig, train_manifest: dict[str, Any], adapter_dir: Path, base: str, config: dict[str, Any],
           inputs: list[Path], out_dir: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    started = time.monotonic()
    device = resolve_device(cfg.device)
    dtype_name, dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file()
                                              else base)
    text, prompt_source = parity_prompt(train_manifest, tokenizer, cfg.parity_text)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)

    log.info("merge: loading %s (%s on %s)", base, dtype_name, device)
    model = load_base(base, dtype, device)
    expected_keys = saved_tensor_names(model)
    base_logits = next_token_logits(model, input_ids)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    adapted_logits = next_token_logits(model, input_ids)
    log.info("merge: folding the adapter into the base weights")
    model = model.merge_and_unload()
    merged_logits = next_token_logits(model, input_ids)
    atol = cfg.parity_atol if cfg.parity_atol is not None else DEFAULT_ATOL[dtype_name]
    rtol = cfg.parity_rtol if cfg.parity_rtol is not None else DEFAULT_RTOL[dtype_name]
    figures = check_parity(base_logits, adapted_logits, merged_logits, atol, rtol)
    figures.update(prompt_tokens=int(input_ids.shape[1]), prompt_source=prompt_source, dtype=dtype_name)

    if getattr(model.config, "quantization_config", None) is not None:  # weights are plain 16-bit now
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=cfg.max_shard_size)
    tokenizer.save_pretrained(out_dir)
    copy_vocab_files(base, out_dir)
    check_saved_keys(out_dir, expected_keys)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    elapsed = time.monotonic() - started
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return artifacts.write_manifest(
        out_dir, stage="merge", config=config, inputs=inputs, metrics={"parity": figures, "seconds": round(elapsed, 1),
                                                                       "weights_bytes": size},
        upstream=train_manifest, extra={"base_model": base, "adapter": str(adapter_dir)},
    )
