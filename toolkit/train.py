"""`toolkit train [PREP_DIR] --config PRESET --out DIR`: LoRA / QLoRA with TRL's SFTTrainer.

Reads the prep folder (train.jsonl, dev.jsonl, manifest.json). Each example becomes a prompt-completion
pair so that only the assistant's answer is supervised:
- gpt-oss (Harmony): `harmony.split_example` text; the completion is the channels, the answer and
  `<|return|>` (TRL's EOS is set to `<|return|>`, so nothing else is appended).
- other chat models: conversational pairs; TRL renders both with the tokenizer's chat template and
  supervises what the answer adds, template end-of-turn tokens included (what inference stops on). Such
  templates have no analysis channel: an example's analysis opens the answer as a `<think>` block
  (`prompt.answer_with_analysis`), which the backends split off again at inference.

Writes OUT/: adapter_model.safetensors + adapter_config.json, the tokenizer (with its chat template),
train_config.json (resolved config), metrics.jsonl, loss.png, tensorboard/, and manifest.json last.
Checkpoints go to OUT/checkpoints/ while training, each written whole or not at all (`toolkit.checkpoints`;
`--resume` continues from the newest complete one), and are deleted at the end unless `train.keep_checkpoints`.
`--force` over an existing run trains beside it and replaces it only when done. Multi-GPU:
`accelerate launch -m toolkit train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit import artifacts, checkpoints, harmony
from toolkit.config import TrainConfig, as_dict
from toolkit.devices import resolve_device
from toolkit.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
ADAPTER_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes
FLEX_RECOMPILE_LIMIT = 64  # dynamo recompiles of flex attention allowed while training (its default: 8)


def read_examples(path: Path, limit: int = 0) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}). Re-run `toolkit prep --force`.") from exc
            messages = row.get("messages") if isinstance(row, dict) else None
            if not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{path}:{n}: expected a `messages` list ending with the assistant's answer. "
                                "Re-run `toolkit prep --force`.")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def to_pairs(rows: list[dict[str, Any]], fmt: str, prep_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Prompt-completion records in the model's chat format (see the module docstring)."""
    from toolkit.prompt import answer_with_analysis, template_messages

    pairs = []
    for row in rows:
        messages = row["messages"]
        if fmt == "harmony":
            prompt, completion = harmony.split_example(
                messages, reasoning_effort=row.get("reasoning_effort", prep_config.get("reasoning_effort", "low")),
                date=prep_config.get("date", harmony.DEFAULT_DATE),
            )
        else:
            prompt = template_messages(messages[:-1])
            answer = messages[-1]
            completion = [{"role": "assistant", "content": answer_with_analysis(answer.get("thinking"),
                                                                                answer["content"])}]
        pairs.append({"prompt": prompt, "completion": completion})
    return pairs


def load_datasets(cfg: TrainConfig, data_dir: Path, fmt: str):
    """(train, dev or None) `datasets.Dataset`s of prompt-completion pairs, and the prep manifest."""
    from datasets import Dataset

    prep = artifacts.read_manifest(data_dir, "prep")
    train_path, dev_path = Path(data_dir) / "train.jsonl", Path(data_dir) / "dev.jsonl"
    if not train_path.is_file():
        raise ArtifactError(f"{train_path}: missing from a finished prep folder. Re-run `toolkit prep --force`.")
    train_rows = read_examples(train_path, cfg.max_train_examples)
    if not train_rows:
        raise DataError(f"{train_path}: no examples. Check the corpus given to `toolkit prep`.")
    dev_rows = read_examples(dev_path, cfg.max_eval_examples) if dev_path.is_file() else []
    train = Dataset.from_list(to_pairs(train_rows, fmt, prep["config"]))
    dev = Dataset.from_list(to_pairs(dev_rows, fmt, prep["config"])) if dev_rows else None
    return train, dev, prep


def check_prep_format(prep: dict[str, Any], fmt: str) -> None:
    """Warn when prep wrote its examples for another chat format than the model's: the prompt then stays as prep
    wrote it (train, eval and serve agree), but a model without a reasoning channel echoes a `reasoning
    language` line, and a Harmony model trained without one loses the option."""
    written = prep["config"].get("chat_format", "harmony")  # older prep manifests: the Harmony system message
    if written != fmt:
        log.warning("train: the prep examples were written for chat format %s (%s), the model uses %s. Re-run "
                    "`toolkit prep` with --set prep.chat_format=%s.", written,
                    "with a `reasoning language` line" if written == "harmony" else "no reasoning line", fmt, fmt)


def checkpointing_kwargs(cfg: TrainConfig) -> dict[str, Any] | None:
    """activation_checkpointing_kwargs: non-reentrant, and every n-th layer only when asked (selective)."""
    if not cfg.gradient_checkpointing:
        return None
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if cfg.checkpoint_every_n_layers > 1:
        kwargs["every_n_layers"] = cfg.checkpoint_every_n_layers
    return kwargs


def training_args(cfg: TrainConfig, out_dir: Path, fmt: str):
    from trl import SFTConfig

    padding_free_only = cfg.padding_free and not cfg.packing
    return SFTConfig(
        output_dir=str(Path(out_dir) / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_rate} if cfg.lr_scheduler == "cosine_with_min_lr" else None,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs=checkpointing_kwargs(cfg),
        use_liger_kernel=cfg.liger_kernel,
        activation_offloading=cfg.activation_offloading,
        bf16=cfg.dtype == "bfloat16",
        fp16=cfg.dtype == "float16",
        use_cpu=resolve_device(cfg.device) == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit or None,
        report_to="none",  # TensorBoard is added as a callback writing to OUT/tensorboard
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",
        max_length=None if padding_free_only else cfg.max_length,
        packing=cfg.packing,
        padding_free=cfg.padding_free,
        completion_only_loss=True,
        eos_token="<|return|>" if fmt == "harmony" else None,
        router_aux_loss_coef=0.0,  # plain cross-entropy, as the public gpt-oss recipe trains (router frozen)
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


@contextlib.contextmanager
def recompile_limit(cfg: TrainConfig, at_least: int = FLEX_RECOMPILE_LIMIT) -> Iterator[None]:
    """With flex attention, dynamo's recompile limit raised to `at_least` inside the block, restored after; with
    `train.compile_layers`, the compiled layers' dynamo settings too.

    Each new padded length, mask and train/eval switch can recompile flex attention; past dynamo's default
    limit (8) it silently falls back to a slow unfused form. Other attention kernels: nothing changes.
    """
    with contextlib.ExitStack() as stack:
        if cfg.compile_layers != "off":  # compiled decoder layers: their dynamo settings (toolkit.regional_compile)
            from toolkit.regional_compile import dynamo_settings

            stack.enter_context(dynamo_settings())
        if cfg.attn_implementation == "flex_attention":
            import torch._dynamo

            stack.enter_context(torch._dynamo.config.patch(
                recompile_limit=max(torch._dynamo.config.recompile_limit, at_least)))
        yield


def build_trainer(cfg: TrainConfig, model: Any, tokenizer: Any, fmt: str, train_ds: Any, eval_ds: Any,
                  out_dir: Path, callbacks: list[Any] | tuple[Any, ...] = ()):
    """An SFTTrainer for a model that already carries its LoRA (see `toolkit.lora.load_model`)."""
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTTrainer

    from toolkit.tracking import MetricsCallback, QuietProgressCallback, tensorboard_callback

    if cfg.padding_free and not cfg.packing:
        log.warning("padding_free without packing: max_length is not enforced (prep bounds the lengths)")
    if cfg.packing or cfg.padding_free:
        from toolkit.packing import mask_packed_examples

        mask_packed_examples(model)  # gpt-oss builds its masks without position_ids: packed examples would mix
    if eval_ds is None and cfg.eval_steps:  # e.g. prep --dev-fraction 0: TRL refuses eval steps without a dev set
        log.warning("train: the prep folder has no dev examples, so no eval loss is computed")
        cfg = dataclasses.replace(cfg, eval_steps=0)
    args = training_args(cfg, out_dir, fmt)

    class Trainer(checkpoints.AtomicCheckpoints, SFTTrainer):
        def train(self, *args, **kwargs):
            with recompile_limit(cfg):
                return super().train(*args, **kwargs)

        def evaluate(self, *args, **kwargs):
            with recompile_limit(cfg):
                return super().evaluate(*args, **kwargs)

    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressCallback())
    trainer.add_callback(MetricsCallback(Path(out_dir) / METRICS_FILE))
    if cfg.report_to == "tensorboard":
        trainer.add_callback(tensorboard_callback(Path(out_dir) / "tensorboard"))
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def _check_resume(out_dir: Path, config: dict[str, Any], prep_sha256: str, main: bool = True) -> str | None:
    """The newest complete checkpoint to resume from; the folder's config and prep folder must be this run's."""
    saved_path = out_dir / CONFIG_FILE
    if saved_path.is_file():
        saved_file = json.loads(saved_path.read_text(encoding="utf-8"))
        saved = saved_file["train"]
        diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if diff:
            changes = ", ".join(f"train.{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise ConfigError(f"{out_dir}: --resume with another config ({changes}). Resume with the same "
                              "--config/--set, or pass --force to start over.")
        if saved_file.get("prep_manifest_sha256", prep_sha256) != prep_sha256:
            raise ConfigError(f"{out_dir}: --resume with another prep folder than the interrupted run's "
                              f"({saved_file.get('data_dir')}, since redone or changed). Pass --force to start over.")
    last = checkpoints.last_complete(out_dir / CHECKPOINTS, clean=main)
    if last is None and saved_path.is_file():
        log.warning("%s: no complete checkpoint to resume from; training starts at step 0", out_dir)
    return last


def _tokens_seen_at(checkpoint: str | None) -> int:
    """Input tokens already counted by the checkpoint a run resumes from (0 for a fresh run)."""
    path = Path(checkpoint) / "trainer_state.json" if checkpoint else None
    if path is None or not path.is_file():
        return 0
    return int(json.loads(path.read_text(encoding="utf-8")).get("num_input_tokens_seen", 0))


def _final_eval(trainer: Any, cfg: TrainConfig) -> dict[str, float]:
    """The dev loss after the last step (evaluated again only if the last step was not an eval step)."""
    step = trainer.state.global_step
    if cfg.eval_steps and step % cfg.eval_steps == 0:
        for record in reversed(trainer.state.log_history):
            if "eval_loss" in record and record.get("step") == step:
                return record
    return trainer.evaluate()


def _parallelism(trainer: Any, processes: int) -> str:
    if trainer.is_fsdp_enabled:
        return f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', '')}"
    if trainer.is_deepspeed_enabled:
        return f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if processes > 1 else "single"


def steady_tokens_per_second(history: list[dict[str, Any]], resumed_from: int | None = None) -> float | None:
    """Input tokens/s over the last three quarters of the logged steps: the first quarter (at least one
    logging interval) holds kernel compilation and allocator warm-up. None with fewer than three logs.

    A resumed run's history holds one part per `train()` call (its clock, `train_runtime`, restarts at 0):
    each part loses its own warm-up, and the parts' tokens and seconds are added up."""
    points = [(e.get("step", 0), e["num_input_tokens_seen"], e["train_runtime"]) for e in history
              if "loss" in e and "num_input_tokens_seen" in e and "train_runtime" in e]
    if len(points) < 3:
        return None
    parts: list[list[tuple[int, int, float]]] = [[]]
    for point in points:
        previous = parts[-1][-1] if parts[-1] else None
        if previous and (point[2] < previous[2] or (resumed_from and previous[0] <= resumed_from < point[0])):
            parts.append([])
        parts[-1].append(point)
    tokens = seconds = 0.0
    for part in (p for p in parts if len(p) >= 2):
        (_, tokens0, time0), (_, tokens1, time1) = part[max(1, len(part) // 4) - 1], part[-1]
        tokens, seconds = tokens + tokens1 - tokens0, seconds + time1 - time0
    return round(tokens / seconds, 1) if seconds > 0 else None


def manifest_extra(cfg: TrainConfig, fmt: str, targets: dict[str, list[str]]) -> dict[str, Any]:
    """What a train manifest says of its adapter beside the config: base, chat format, file, LoRA placement."""
    return {
        "base_model": cfg.base_model,
        "chat_format": fmt,
        "adapter": ADAPTER_FILE,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                 "target_modules": targets["modules"], "target_parameters": targets["parameters"]},
    }


def peak_gpu_memory_gib() -> dict[str, list[float]] | None:
    """Peak GPU memory (allocated, reserved) of every process in rank order, in GiB; None without CUDA.

    Collective under several processes: every rank must call it.
    """
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    from accelerate.utils import gather_object

    mine = [(torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)]
    peaks = gather_object(mine)
    return {"allocated": [round(a, 2) for a, _ in peaks], "reserved": [round(r, 2) for _, r in peaks]}


def _human(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run(cfg: TrainConfig, data_dir: Path, out_dir: Path, *, force: bool = False, resume: bool = False,
        callbacks: list[Any] | tuple[Any, ...] = ()) -> dict[str, Any]:
    """Train a LoRA adapter on the prep folder `data_dir`; write `out_dir` and return its manifest.

    `callbacks` are extra transformers TrainerCallbacks (benchmarks, tests).
    """
    from accelerate import PartialState


    data_dir, out_dir = Path(data_dir), Path(out_dir)
    config = as_dict(cfg)
    state = PartialState(cpu=resolve_device(cfg.device) == "cpu")
    artifacts.read_manifest(data_dir, "prep")  # a clear error before anything else
    inputs = [data_dir / "train.jsonl", data_dir / "dev.jsonl", data_dir / artifacts.MANIFEST]
    # --force over an existing run trains beside it and replaces it only when done (decided before any process
    # changes anything, so that every process decides alike)
    beside = force and out_dir.is_dir() and any(out_dir.iterdir())
    done = None
    if state.is_main_process:
        done = artifacts.check_out_dir(out_dir, stage="train", config=config, force=force, resume=resume,
                                       inputs=inputs)
        if done is None and not beside:
            out_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    if done is None and not state.is_main_process and (out_dir / artifacts.MANIFEST).is_file() and not force:
        done = artifacts.read_manifest(out_dir, "train")
    if done is not None:
        log.info("train: %s already holds this finished run; nothing to do (--force to redo it)", out_dir)
        return done
    if not beside:
        manifest = _train(cfg, data_dir, out_dir, config, inputs, state, resume, callbacks)
    else:
        with (artifacts.building(out_dir) if state.is_main_process
              else contextlib.nullcontext(artifacts.partial_dir(out_dir))) as build:
            manifest = _train(cfg, data_dir, build, config, inputs, state, False, callbacks)
    if manifest:  # empty on the other processes of a distributed run
        metrics = manifest["metrics"]
        size = next((o["bytes"] for o in manifest["outputs"] if o["path"] == manifest["adapter"]), 0) / 1e6
        log.info("train: %d steps in %s, adapter %.1f MB -> %s", metrics["steps"], _human(metrics["runtime_seconds"]),
                 size, out_dir)
    return manifest


def _train(cfg: TrainConfig, data_dir: Path, out_dir: Path, config: dict[str, Any], inputs: list[Path], state: Any,
           resume: bool, callbacks: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    from toolkit import lora, resources
    from toolkit.tracking import plot_loss

    usage = resources.Usage()

    prep_sha256 = artifacts.sha256_file(data_dir / artifacts.MANIFEST)
    checkpoint = _check_resume(out_dir, config, prep_sha256, state.is_main_process) if resume else None
    # Everything that can fail cheaply fails before the weights load and before OUT gets any file.
    lora.check_preconditions(cfg)
    tokenizer = lora.load_tokenizer(cfg)
    model_config = lora.model_config(cfg)
    fmt = lora.chat_format(cfg, model_config, tokenizer)
    train_ds, eval_ds, prep = load_datasets(cfg, data_dir, fmt)
    check_prep_format(prep, fmt)
    if state.is_main_process:
        artifacts.atomic_write_json(out_dir / CONFIG_FILE, {"train": config, "data_dir": str(data_dir),
                                                            "prep_manifest_sha256": prep_sha256})
        if checkpoint is None and (out_dir / METRICS_FILE).exists():
            (out_dir / METRICS_FILE).unlink()

    if cfg.gpu_memory_gib:
        from toolkit.memory import cap_gpu_memory

        log.info("train: GPU memory capped at %.1f GiB (%.1f%% of the card)", cfg.gpu_memory_gib,
                 100 * cap_gpu_memory(cfg.gpu_memory_gib, state.local_process_index))
    model = lora.attach_lora(lora.load_base(cfg, model_config), cfg)
    targets = lora.lora_targets(model)
    log.info("train: %d train / %d dev examples, %s format, LoRA on %d modules + %d expert tensors",
             len(train_ds), len(eval_ds) if eval_ds is not None else 0, fmt, len(targets["modules"]),
             len(targets["parameters"]))
    trainer = build_trainer(cfg, model, tokenizer, fmt, train_ds, eval_ds, out_dir, callbacks)
    if len(trainer.train_dataset) == 0:
        raise ConfigError(f"train.max_length {cfg.max_length}: every training example's prompt fills it, so no "
                          "answer token is left to learn. Raise it, e.g. --set train.max_length=2048.")

    tokens_before = _tokens_seen_at(checkpoint)
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    runtime = time.monotonic() - started
    final_eval = _final_eval(trainer, cfg) if eval_ds is not None else {}
    trainer.save_model(str(out_dir))  # adapter + tokenizer; collective under FSDP / DeepSpeed
    peaks = peak_gpu_memory_gib()  # collective too
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}

    for name in ("training_args.bin", "README.md"):  # a pickle and peft's model-card stub
        (out_dir / name).unlink(missing_ok=True)
    if not cfg.keep_checkpoints:
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    plot_loss(out_dir / METRICS_FILE, out_dir / LOSS_PNG)
    history = [e for e in trainer.state.log_history if "loss" in e]  # restored from the checkpoint on resume
    resumed_from = checkpoints.step_of(checkpoint)
    metrics = {
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": history[-1]["loss"] if history else result.training_loss,
        "mean_train_loss": checkpoints.mean_train_loss(history, result.training_loss, trainer.state.global_step,
                                                       resumed_from),
        "eval_loss": final_eval.get("eval_loss"),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": round((trainer.state.num_input_tokens_seen - tokens_before) / runtime, 1),
        "steady_tokens_per_second": steady_tokens_per_second(trainer.state.log_history, resumed_from),
        "peak_gpu_memory_gib": peaks,
        "resources": usage.figures(),
        "runtime_seconds": round(runtime, 2),
        "processes": state.num_processes,
        "parallelism": _parallelism(trainer, state.num_processes),
    }
    if metrics["eval_loss"] is not None and not math.isfinite(metrics["eval_loss"]):
        log.warning("train: eval loss is %s", metrics["eval_loss"])
    return artifacts.write_manifest(out_dir, stage="train", config=config, inputs=inputs, metrics=metrics,
                                    upstream=prep, extra=manifest_extra(cfg, fmt, targets))
