"""`toolkit merge TRAIN_DIR --out DIR [--format bf16|mxfp4]`: fold a LoRA adapter into its base model's weights.

The base checkpoint named by the train manifest is streamed tensor by tensor (`toolkit.checkpoint`; MXFP4
expert stacks dequantized one expert at a time), the adapter's delta added in float32 (`toolkit.adapter`:
attention LoRA, expert LoRA through peft's `target_parameters`), the sum cast and written straight into the
output shards (`toolkit.merge_plan`). No GPU; host memory holds about one tensor, never the model.
`--format mxfp4` writes the expert stacks back as MXFP4 in gpt-oss' released layout, the rest in bf16.

The merge is checked on a Harmony prompt built exactly as in training, by three layer-by-layer forwards
(`toolkit.layerwise`, one decoder layer in memory at a time): the bare base, base+adapter (the float32
delta added to the base as it is read) and the written folder. The merged next-token logits must equal
base+adapter within tolerance and differ from the bare base, and the manifest records how much of the
adapter's effect on all prompt positions the merged weights keep. The output is written into a hidden
staging folder and moved in only when the check passed: a failed merge leaves no weights and no manifest.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from toolkit import artifacts, checkpoint, layerwise, mxfp4, prompt, resources, runs
from toolkit.adapter import Adapter
from toolkit.checkpoint import Checkpoint
from toolkit.config import MergeConfig, as_dict
from toolkit.errors import ArtifactError
from toolkit.merge_plan import MergePlan

log = logging.getLogger(__name__)
BASE_FILES = ("generation_config.json",)  # copied beside the merged weights when the base has them
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
# The check has two references, both float32 forwards of the base checkpoint, layer by layer:
# - "expected": base + the float32 LoRA delta, each changed tensor then rounded as the output stores it (cast to
#   merge.dtype, or MXFP4 round trip). The written folder must give these logits: the weights are the same values,
#   so only float32 noise is allowed (DEFAULT_ATOL, plus DEFAULT_RTOL of the adapter's effect). A lost, doubled or
#   misplaced delta misses by about its whole effect.
# - "exact": base + the float32 delta, unrounded. How far the written model is from it is what storing the merge
#   costs (`effect_kept`, `effect_cosine`, `top1_agreement` in the manifest): reported, and warned about below
#   LOW_EFFECT_KEPT. A small adapter on 16-bit weights loses a visible share to rounding: on the random full-size
#   gpt-oss-20b, 20 qlora steps (the adapter moves the logits by 6.4) rounded to bf16 missed by 3.5.
DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 0.01
LOW_EFFECT_KEPT = 0.5


def local_folder(base: str) -> Path:
    """The base checkpoint's folder: a local path, else its files in the Hugging Face cache (downloaded if missing)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 (offline, unknown repo, gated: all mean the same to the user)
        raise ArtifactError(f"{base}: not a local folder, and the hub gave no copy ({type(exc).__name__}). "
                            "Pass --base-model PATH to a downloaded checkpoint.") from None


def resolve_dtype(name: str, base: Checkpoint) -> str:
    """merge.dtype; auto is the base's own dtype (bfloat16 for gpt-oss' MXFP4 release: its dense tensors)."""
    if name != "auto":
        return name
    stored = base.config.get("dtype") or base.config.get("torch_dtype")
    return stored if stored in ("bfloat16", "float16", "float32") else "bfloat16"


def output_config(base: Checkpoint, fmt: str, dtype_name: str, dense_modules: list[str] = ()) -> dict[str, Any]:
    """The base's config.json for the merged weights: mxfp4 keeps (or gains) the MXFP4 quantization_config, whose
    `modules_to_not_convert` also names the experts modules kept dense."""
    data = dict(base.config)
    if fmt == "mxfp4":
        quant = dict(data.get("quantization_config") if base.is_mxfp4 else mxfp4.quantization_config())
        keep = list(quant.get("modules_to_not_convert") or [])
        quant["modules_to_not_convert"] = keep + [m for m in dense_modules if m not in keep]
        data["quantization_config"] = quant
    else:
        data.pop("quantization_config", None)
    data["dtype"] = dtype_name
    if "torch_dtype" in data:
        data["torch_dtype"] = dtype_name
    return data


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


def check_parity(base_logits, expected_logits, merged_logits, atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """Figures of the merge check; raises ArtifactError unless merged == expected != bare base.

    `expected` is base+adapter with the changed tensors rounded as stored: merged may differ from it by
    max(atol, rtol * the stored adapter's effect on the logits).
    """
    effect = float((expected_logits - base_logits).abs().max())
    to_expected = float((merged_logits - expected_logits).abs().max())
    to_base = float((merged_logits - base_logits).abs().max())
    allowed = max(atol, rtol * effect)
    figures = {
        "max_abs_diff_merged_vs_expected": to_expected,
        "max_abs_diff_merged_vs_base": to_base,
        "max_abs_diff_expected_vs_base": effect,
        "atol": atol,
        "rtol": rtol,
        "allowed": allowed,
        "top1_merged": int(merged_logits.argmax()),
        "top1_expected": int(expected_logits.argmax()),
        "top1_base": int(base_logits.argmax()),
    }
    if effect == 0.0:
        raise ArtifactError(
            "merge check failed: stored this way the adapter has no effect (the logits equal the base's): an untrained "
            "LoRA, or deltas below the output format's rounding (try --dtype float32, or --format bf16 instead of "
            "merge.requantize_adapted). Nothing was written."
        )
    if to_expected > allowed:
        raise ArtifactError(
            f"merge check failed: the written model's logits differ by {to_expected:.3g} (> {allowed:.3g}) from "
            f"base+adapter computed with the same rounding (the adapter moves them by {effect:.3g}). The merge is "
            "wrong; nothing was written. Re-run with -vv and report it."
        )
    return figures


def effect_figures(base, adapted, merged) -> dict[str, Any]:
    """How much of the adapter's effect on the logits (all prompt positions) the merged weights keep."""
    import torch

    effect, miss = adapted - base, merged - adapted
    cosine = torch.nn.functional.cosine_similarity((merged - base).flatten(), effect.flatten(), dim=0)
    return {
        "positions": int(base.shape[0]),
        "effect_kept": 1.0 - float(miss.norm() / effect.norm()),  # 1 - |merged - adapted| / |adapted - base|
        "effect_cosine": float(cosine),  # of (merged - base) with (adapted - base)
        "norm_merged_vs_base": float((merged - base).norm()),
        "norm_adapter_vs_base": float(effect.norm()),
        "top1_agreement": float((merged.argmax(-1) == adapted.argmax(-1)).float().mean()),  # merged vs base+adapter
        "top1_agreement_base": float((base.argmax(-1) == adapted.argmax(-1)).float().mean()),  # what the adapter left
    }


def check_saved_params(folder: Path, base: Checkpoint, plan: MergePlan) -> None:
    """The written checkpoint holds exactly the planned tensors, i.e. the base model's parameters."""
    written = Checkpoint(folder)
    if set(written.weight_map) != {e.name for e in plan.entries} or set(written.param_names()) != set(
            base.param_names()):
        extra = sorted(set(written.param_names()) - set(base.param_names()))[:5]
        missing = sorted(set(base.param_names()) - set(written.param_names()))[:5]
        raise ArtifactError(f"{folder}: saved tensors differ from the base model's (extra {extra}, missing {missing}).")


def _write(out: Path, base: Checkpoint, plan: MergePlan, cfg: MergeConfig, dtype_name: str) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(plan.entries), desc="merge", unit="tensor", disable=None)
    checkpoint.write_shards(out, plan.entries, plan.produce, max_shard_bytes=checkpoint.parse_size(cfg.max_shard_size),
                            progress=lambda entry: bar.update())
    bar.close()
    artifacts.atomic_write_json(out / "config.json", output_config(base, cfg.format, dtype_name, plan.dense_modules))
    for name in BASE_FILES:
        if (base.folder / name).is_file():
            shutil.copyfile(base.folder / name, out / name)


def run(cfg: MergeConfig, train_dir: Path, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Merge the adapter of `train_dir` into its base, tensor by tensor, and write the merged model to `out_dir`."""
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    train_manifest = artifacts.read_manifest(train_dir, stage="train")
    adapter_dir = runs.find_adapter(train_dir)
    base = runs.base_model_of(train_manifest, adapter_dir, cfg.base_model)
    config = {**as_dict(cfg), "base_model": base}
    inputs = [train_dir / artifacts.MANIFEST]  # the train run, by its manifest's path and sha256
    done = artifacts.check_out_dir(out_dir, stage="merge", config=config, force=force, inputs=inputs)
    if done is not None:
        log.info("merge: %s already holds this merge; nothing to do (--force redoes it)", out_dir)
        return done
    # Built beside OUT and swapped in when complete: a failed or killed merge (--force too) leaves OUT as it was.
    with artifacts.building(out_dir) as build, resources.Usage(watch=build) as usage:
        manifest = _merge(cfg, train_manifest, adapter_dir, base, config, inputs, build, usage)
    metrics, figures = manifest["metrics"], manifest["metrics"]["parity"]
    log.info("merge: adapter folded into %s in %.0fs, %.1f MB %s, logits: %.0f%% of the adapter's effect kept, "
             "top-1 %.0f%% as base+adapter, %s -> %s", base, metrics["seconds"], metrics["weights_bytes"] / 1e6,
             cfg.format, 100 * figures["effect_kept"], 100 * figures["top1_agreement"],
             resources.summary(metrics["resources"]), out_dir)
    return manifest


def _merge(cfg: MergeConfig, train_manifest: dict[str, Any], adapter_dir: Path, base: str, config: dict[str, Any],
           inputs: list[Path], out_dir: Path, usage: resources.Usage) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    started = time.monotonic()
    base_dir = local_folder(base)
    ckpt = Checkpoint(base_dir)
    dtype_name = resolve_dtype(cfg.dtype, ckpt)
    model_config = AutoConfig.from_pretrained(base_dir)
    if getattr(model_config, "quantization_config", None) is not None:
        del model_config.quantization_config  # the architecture only: weights come from the checkpoint reader
    adapter = Adapter(adapter_dir, model_config)
    plan = MergePlan(ckpt, adapter, cfg.format, getattr(torch, dtype_name), cfg.requantize_adapted)
    if plan.dense_modules:
        log.info("merge: %d experts modules the adapter changes stay dense %s (merge.requantize_adapted=false)",
                 len(plan.dense_modules), dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file()
                                              else base_dir)
    text, prompt_source = parity_prompt(train_manifest, tokenizer, cfg.parity_text)
    ids = tokenizer(text, add_special_tokens=False).input_ids

    log.info("merge: reference logits of %s, of base+adapter and of base+adapter as stored, layer by layer (%d "
             "prompt tokens)", base, len(ids))
    base_logits = layerwise.logits(base_dir, [ids], config=model_config)[0]
    adapted_logits = layerwise.logits(base_dir, [ids], config=model_config, transform=adapter.transform)[0]
    if torch.equal(base_logits, adapted_logits):
        check_parity(base_logits[-1], adapted_logits[-1], adapted_logits[-1])  # raises "no effect"
    expected_logits = layerwise.logits(base_dir, [ids], config=model_config, transform=plan.as_stored)[0]

    log.info("merge: folding %d LoRA tensors into %s (%s, %s) tensor by tensor", len(adapter.targets), base,
             cfg.format, dtype_name)
    try:  # out_dir is the stage's build folder (artifacts.building): on any error it is removed whole
        adapter.applied.clear()
        _write(out_dir, ckpt, plan, cfg, dtype_name)
        adapter.check_all_applied()
        tokenizer.save_pretrained(out_dir)
        copy_vocab_files(str(base_dir), out_dir)
        check_saved_params(out_dir, ckpt, plan)
        merged_logits = layerwise.logits(out_dir, [ids])[0]
        atol = cfg.parity_atol if cfg.parity_atol is not None else DEFAULT_ATOL
        rtol = cfg.parity_rtol if cfg.parity_rtol is not None else DEFAULT_RTOL
        figures = check_parity(base_logits[-1], expected_logits[-1], merged_logits[-1], atol, rtol)
        figures.update(effect_figures(base_logits, adapted_logits, merged_logits), prompt_tokens=len(ids),
                       prompt_source=prompt_source, dtype=dtype_name, format=cfg.format,
                       dense_expert_modules=plan.dense_modules, requantized_experts=plan.requantized)
    finally:
        adapter.close()
    if figures["effect_kept"] < LOW_EFFECT_KEPT:
        log.warning("merge: stored as %s %s, the merged weights keep %.0f%% of the adapter's effect on the logits "
                    "(top-1 as base+adapter at %.0f%% of the prompt's positions): rounding the changed tensors "
                    "erases small LoRA deltas. --dtype float32 keeps them exactly.", cfg.format, dtype_name,
                    100 * figures["effect_kept"], 100 * figures["top1_agreement"])

    elapsed = time.monotonic() - started
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return artifacts.write_manifest(
        out_dir, stage="merge", config=config, inputs=inputs, metrics={"parity": figures, "seconds": round(elapsed, 1),
                                                                       "weights_bytes": size,
                                                                       "resources": usage.figures()},
        upstream=train_manifest, extra={"base_model": base, "adapter": str(adapter_dir)},
    )
