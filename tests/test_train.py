"""`toolkit train` on the tiny gpt-oss (CPU): adapter output, what LoRA changes, the label mask, loss,
kill-and-resume, config errors, presets, QLoRA preconditions, and a 2-process `accelerate launch` run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

from toolkit import artifacts, config, harmony
from toolkit.config import PrepConfig, TrainConfig
from toolkit.corpus import prepare
from toolkit.errors import ArtifactError, ConfigError, ExternalToolError

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "loss.png",
                 "manifest.json", "metrics.jsonl", "tokenizer.json", "tokenizer_config.json", "train_config.json"}


def tiny_cfg(model: Path, **kw) -> TrainConfig:
    """The tiny-cpu preset, made shorter: no eval/checkpoint unless asked, short sequences."""
    sets = {"base_model": str(model), "max_steps": 3, "eval_steps": 0, "save_steps": 0, "logging_steps": 1,
            "batch_size": 2, "report_to": "none", **kw}
    return config.build("train", "tiny-cpu", [f"train.{k}={json.dumps(v)}" for k, v in sets.items()])


def _short_prep(folder: Path, skip: int = 0) -> Path:
    """A prep folder of 24 short sample pairs (a few of them dev pairs), from the `skip`-th short pair on."""
    lines = (ROOT / "corpora" / "zh-nan-moe-sample" / "sample.tsv").read_text(encoding="utf-8").splitlines()
    short = [line for line in lines[1:] if len(line.split("\t")[0]) <= 6][skip:skip + 24]
    corpus = folder / "pairs.tsv"
    corpus.write_text("\n".join([lines[0], *short]) + "\n", encoding="utf-8")
    prepare(PrepConfig(length_unit="chars", dev_fraction=0.15), corpus, folder / "prep")
    return folder / "prep"


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory) -> Path:
    return _short_prep(tmp_path_factory.mktemp("train-prep"))


class Kill(TrainerCallback):
    """A KeyboardInterrupt (Ctrl-C) right after optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


class Snapshot(TrainerCallback):
    """Copies every parameter at train begin and end."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_train_writes_adapter_and_changes_only_lora(tiny_model, prep_dir, tmp_path):
    from toolkit import train

    out = tmp_path / "train"
    snap = Snapshot()
    cfg = tiny_cfg(tiny_model, learning_rate=1e-2, report_to="tensorboard", gradient_checkpointing=True)
    manifest = train.run(cfg, prep_dir, out, callbacks=[snap])

    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {f for f in files if not f.startswith("tensorboard/")} == ADAPTER_FILES
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert {o["path"] for o in manifest["outputs"]} == files - {"manifest.json"}
    assert manifest["stage"] == "train" and manifest["upstream"]["stage"] == "prep"
    assert manifest["base_model"] == str(tiny_model) and manifest["chat_format"] == "harmony"
    targets = manifest["lora"]
    assert "model.layers.0.self_attn.q_proj" in targets["target_modules"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in targets["target_parameters"]
    metrics = manifest["metrics"]
    assert metrics["steps"] == 3 and metrics["tokens_per_second"] > 0 and metrics["eval_loss"] > 0
    assert metrics["steady_tokens_per_second"] > 0  # 3 logged steps: the last two are timed
    assert metrics["peak_gpu_memory_gib"] is None  # no CUDA here
    assert len([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]) >= 3

    lora = {n for n in snap.before if "lora_" in n}
    assert lora and all(".default." in n for n in lora)
    for name, before in snap.before.items():
        changed = not before.equal(snap.after[name])
        assert changed == (name in lora), f"{name}: changed={changed}"
    # both kinds of LoRA moved, and both are in the saved adapter
    assert any("self_attn" in n for n in lora) and any("experts" in n for n in lora)
    saved = adapter_tensors(out)
    assert any("self_attn.q_proj.lora_B" in k for k in saved) and any("experts" in k for k in saved)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero

    # a re-run is a no-op; an unfinished folder is refused without --resume/--force
    assert train.run(cfg, prep_dir, out) == manifest
    assert {Path(r["path"]).name for r in manifest["inputs"]} == {"train.jsonl", "dev.jsonl", "manifest.json"}
    # issue 18, item 1: `train OTHER_PREP --out FINISHED` is no no-op
    other = _short_prep(tmp_path, skip=24)
    with pytest.raises(ArtifactError, match=r"from other inputs \(.*train.jsonl instead of .*Pass --force"):
        train.run(cfg, other, out)
    # issue 18, item 2: a --force run trains beside the finished one, which stays as it was if that run fails
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, other, out, force=True, callbacks=[Kill(1)])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not artifacts.partial_dir(out).exists()
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="--resume"):
        train.run(cfg, prep_dir, out)


def test_only_the_assistant_completion_is_supervised(tiny_model, prep_dir, tmp_path):
    from transformers import AutoTokenizer

    from toolkit import lora, train

    cfg = tiny_cfg(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train_ds, _, prep = train.load_datasets(cfg, prep_dir, "harmony")
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    trainer = train.build_trainer(cfg, model, tokenizer, "harmony", train_ds, None, tmp_path)
    rows = train.read_examples(prep_dir / "train.jsonl")
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        full = harmony.render(row["messages"], reasoning_effort=row["reasoning_effort"], date=prep["config"]["date"])
        assert tokenizer.decode(ids) == full
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first])
        assert labels[first:] == ids[first:]  # everything after the prompt is supervised, nothing is skipped
        prompt, supervised = tokenizer.decode(ids[:first]), tokenizer.decode(ids[first:])
        assert prompt.endswith("<|start|>user<|message|>" + row["source"] + "<|end|><|start|>assistant")
        assert "<|start|>developer" in prompt and "<|start|>system" in prompt
        assert supervised == f"<|channel|>final<|message|>{row['target']}<|return|>"


def test_flex_attention_raises_the_recompile_limit_while_training_only(tiny_model, prep_dir, tmp_path, monkeypatch):
    import dataclasses

    import torch._dynamo
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from toolkit import lora, train

    cfg = tiny_cfg(tiny_model)
    train_ds, _, _ = train.load_datasets(cfg, prep_dir, "harmony")
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    seen = []

    def record(self, *args, **kwargs):  # stands in for SFTTrainer's own loop: what limit would it run under?
        seen.append(torch._dynamo.config.recompile_limit)

    monkeypatch.setattr(SFTTrainer, "train", record)
    monkeypatch.setattr(SFTTrainer, "evaluate", record)
    before = torch._dynamo.config.recompile_limit
    assert before < train.FLEX_RECOMPILE_LIMIT  # dynamo's default (8): the limit below is ours
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for attn, expected in (("flex_attention", train.FLEX_RECOMPILE_LIMIT), ("eager", before)):
        # the flex config is only read here; the tiny model itself stays eager
        flex = dataclasses.replace(cfg, attn_implementation=attn)
        trainer = train.build_trainer(flex, model, tokenizer, "harmony", train_ds, None, tmp_path / attn)
        assert torch._dynamo.config.recompile_limit == before  # building the trainer changes nothing
        trainer.train()
        trainer.evaluate()
        assert seen == [expected, expected] and torch._dynamo.config.recompile_limit == before
        seen.clear()


def test_chat_template_models_supervise_the_answer_and_end_of_turn(tiny_model, prep_dir, tmp_path):
    """A non-Harmony model: the tokenizer's template renders, and the answer + its end-of-turn are supervised."""
    from toolkit import lora, train

    template = tmp_path / "chatml.jinja"
    template.write_text("{% for m in messages %}<|start|>{{ m.role }}\n{{ m.content }}<|end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}", encoding="utf-8")
    cfg = tiny_cfg(tiny_model, chat_format="template", chat_template=str(template))
    tokenizer = lora.load_tokenizer(cfg)
    train_ds, _, _ = train.load_datasets(cfg, prep_dir, "template")
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    trainer = train.build_trainer(cfg, model, tokenizer, "template", train_ds, None, tmp_path)
    row, example = train.read_examples(prep_dir / "train.jsonl")[0], trainer.train_dataset[0]
    first = next(i for i, label in enumerate(example["labels"]) if label != -100)
    assert tokenizer.decode(example["input_ids"][:first]).endswith(f"{row['source']}<|end|>\n<|start|>assistant\n")
    assert tokenizer.decode(example["input_ids"][first:]) == f"{row['target']}<|end|>\n"

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((tiny_model / name).read_bytes())
    cfg = tiny_cfg(bare, chat_format="template")
    with pytest.raises(ConfigError, match="no chat template.*train.chat_template"):
        lora.chat_format(cfg, None, lora.load_tokenizer(cfg))


def test_a_chat_model_without_experts_trains_attention_only(tiny_model, prep_dir, tmp_path):
    """Any causal chat LM works (here a tiny random Gemma 3 with a Gemma-style template): LoRA on attention only."""
    import shutil

    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from toolkit import train

    model_dir = tmp_path / "gemma"
    Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_model)), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=16, max_position_embeddings=2048,
    )).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, model_dir / name)
    template = tmp_path / "gemma.jinja"
    template.write_text("{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
                        "{{ m.content }}<end_of_turn>\n{% endfor %}"
                        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", encoding="utf-8")
    cfg = tiny_cfg(model_dir, max_steps=2, chat_template=str(template))
    manifest = train.run(cfg, prep_dir, tmp_path / "out")
    assert manifest["chat_format"] == "template" and manifest["lora"]["target_parameters"] == []
    assert "model.layers.1.self_attn.v_proj" in manifest["lora"]["target_modules"]
    assert "<start_of_turn>model" in (tmp_path / "out" / "chat_template.jinja").read_text()
    assert {k.split(".self_attn.")[0] for k in adapter_tensors(tmp_path / "out")} == {
        "base_model.model.model.layers.0", "base_model.model.model.layers.1"}


def test_config_errors_are_listed_together():
    with pytest.raises(ConfigError) as err:
        config.build("train", None, ["train.mode=full", "train.lora_r=0", "train.lora_dropout=1.5",
                                     "train.expert_layers='some'", "train.device=tpu"])
    message = str(err.value)
    assert message.startswith("5 config problem(s)")
    for key in ("train.mode", "train.lora_r", "train.lora_dropout", "train.expert_layers", "train.device"):
        assert key in message
    with pytest.raises(ConfigError, match="padding_free need a FlashAttention kernel"):
        config.build("train", None, ["train.padding_free=true"])
    assert config.build("train", None, ["train.packing=true", "train.attn_implementation='flash_attention_2'"])
    with pytest.raises(ConfigError) as err:
        config.build("train", None, ["train.lora_rank=8", "train.batch=2", "train.lr=1"])
    assert str(err.value).startswith("3 config problem(s)") and "train.lora_rank: unknown key" in str(err.value)


def test_layer_selection_and_missing_layers(tiny_model):
    from toolkit import lora

    cfg = tiny_cfg(tiny_model, attention_layers=[1], expert_layers=[0])
    targets = lora.lora_targets(lora.attach_lora(lora.load_base(cfg), cfg))
    assert targets["modules"] == [f"model.layers.1.self_attn.{m}" for m in ("k_proj", "o_proj", "q_proj", "v_proj")]
    assert targets["parameters"] == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    cfg = tiny_cfg(tiny_model, expert_layers=[7, 15])
    with pytest.raises(ConfigError, match="layer 7 does not exist.*2 layers"):
        lora.lora_config(cfg, lora.load_base(cfg))
    cfg = tiny_cfg(tiny_model, lora_dropout=0.1)
    with pytest.raises(ConfigError, match="lora_dropout.*lora_experts=\\[\\]"):
        lora.lora_config(cfg, lora.load_base(cfg))
    assert lora.lora_config(tiny_cfg(tiny_model, lora_dropout=0.1, lora_experts=[]), lora.load_base(cfg))


def test_every_shipped_preset_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in config.list_presets():
        text = config.preset_path(name).read_text(encoding="utf-8")
        assert text.startswith("# toolkit "), f"{name}: must start with the command that uses it"
        if "[train]" in text:
            assert isinstance(config.build("train", name), TrainConfig)
    folder = ROOT / "toolkit" / "configs" / "accelerate"
    kinds = {}
    for path in sorted(folder.glob("*.yaml")):
        assert path.read_text().startswith("# accelerate launch --config_file toolkit/configs/accelerate/")
        kinds[path.name] = load_config_from_file(str(path)).distributed_type.value
    assert kinds == {"deepspeed-zero3.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP"}
    ds = json.loads((folder / "deepspeed-zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3


def test_deepspeed_config_passes_accelerates_own_launch_checks(monkeypatch, tmp_path):
    """accelerate refuses a DeepSpeed launch whose YAML sets, beside deepspeed_config_file, a value the JSON
    owns (mixed_precision, accumulation, ...): reproduce the launcher's environment and run its check."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin

    def check(path: Path) -> None:
        args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
        _, defaults, mixed_precision_from_file = _validate_launch_command(args)
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_precision_from_file else [])]
        monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields).lower())
        DeepSpeedPlugin._deepspeed_config_checks(None)  # reads only that variable

    shipped = ROOT / "toolkit" / "configs" / "accelerate" / "deepspeed-zero3.yaml"
    check(shipped)
    broken = tmp_path / "deepspeed-zero3.yaml"  # the file as it was before the 2-GPU run showed the refusal
    broken.write_text(shipped.read_text().replace("num_machines: 1", "mixed_precision: bf16\nnum_machines: 1"))
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        check(broken)


def test_steady_tokens_per_second_leaves_out_the_warm_up():
    from toolkit.train import steady_tokens_per_second

    # step 1 compiles for 20 s, step 2 for 10 s, then 1,000 tokens a second
    logs = [{"loss": 1.0, "num_input_tokens_seen": 1000 * s, "train_runtime": t}
            for s, t in [(1, 20.0), (2, 31.0), (3, 32.0), (4, 33.0), (5, 34.0), (6, 35.0), (7, 36.0), (8, 37.0)]]
    assert steady_tokens_per_second(logs) == pytest.approx(1000 * 6 / 6)  # from step 2 (a quarter in) to 8
    assert steady_tokens_per_second(logs[:2]) is None
    assert steady_tokens_per_second([{"eval_loss": 1.0}] + logs[:3]) == pytest.approx(2000 / 12, abs=0.1)  # step 1 to 3


def test_qlora_fails_fast_without_cuda(prep_dir, tmp_path, monkeypatch):
    """On a machine without CUDA, qlora stops before any weights or output files."""
    from toolkit import lora, train

    cfg = config.build("train", "gpt-oss-20b-qlora", ['train.base_model="/nonexistent"', 'train.device="auto"'])
    with pytest.raises(ConfigError, match="qlora.*no"):
        train.run(cfg, prep_dir, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())
    # with a GPU but without bitsandbytes the message says what to install
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    real_version = lora.importlib.metadata.version

    def version(name):  # bitsandbytes absent even where it is installed (its CPU backend runs the qlora tests)
        if name == "bitsandbytes":
            raise lora.importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(lora.importlib.metadata, "version", version)
    with pytest.raises(ExternalToolError, match=r"bitsandbytes >= 0.48.*toolkit\[qlora\]"):
        lora.check_preconditions(cfg)
    # the preset offloads activations from the GPU: a run that resolves to the CPU is told, before any weights load
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    lora_cfg = dataclasses.replace(cfg, mode="lora")
    with pytest.raises(ConfigError, match="activation_offloading.*on cpu"):
        lora.check_preconditions(lora_cfg)
    lora.check_preconditions(dataclasses.replace(lora_cfg, activation_offloading=False, liger_kernel=False))


def test_cli_train(tiny_model, prep_dir, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    out = tmp_path / "cli"
    args = ["train", str(prep_dir), "--config", "tiny-cpu", "--out", str(out), "--max-steps", "1",
            "--set", f"train.base_model={json.dumps(str(tiny_model))}", "--set", "train.eval_steps=0",
            "--set", "train.save_steps=0", "--set", "train.report_to='none'", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["out"] == str(out)
    assert (out / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(main, ["train", str(prep_dir), "--config", "gpt-oss-20b-qlora", "--out",
                                       str(tmp_path / "q")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "CUDA" in result.output


def test_cli_train_interrupted_says_how_to_resume(prep_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from toolkit import train
    from toolkit.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    result = CliRunner().invoke(main, ["train", str(prep_dir), "--config", "tiny-cpu", "--out", str(tmp_path / "x")])
    assert result.exit_code == 130 and f"--out {tmp_path / 'x'} --resume" in result.stderr


@pytest.fixture(scope="module")
def expressive_tiny_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a 10x output layer. At std 0.05 and hidden 64 its logits span only about +-3, so
    cross-entropy over 1,024 tokens cannot fall below ~3.8 nats whatever LoRA learns (frozen lm_head)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-expressive")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out)
    for path in tiny_model.iterdir():
        if path.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(path, out / path.name)
    return out


@pytest.mark.slow
def test_loss_halves_on_memorisable_pairs(expressive_tiny_model, prep_dir, tmp_path):
    from toolkit import train

    cfg = tiny_cfg(expressive_tiny_model, max_steps=20, batch_size=4, learning_rate=1e-2, logging_steps=2)
    manifest = train.run(cfg, prep_dir, tmp_path / "train")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "train" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 10 and losses[-1] <= losses[0] / 2, losses
    assert manifest["metrics"]["train_loss"] == losses[-1] and (tmp_path / "train" / "loss.png").stat().st_size


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_adapter(tiny_model, prep_dir, tmp_path, monkeypatch):
    """Killed while checkpoint-4 was being written (issue 18, items 5, 6, 8): the partial checkpoint, a
    truncated one and a cut-off metrics line are skipped, training resumes from checkpoint-2, and the adapter
    and the whole-run metrics are those of an uninterrupted run."""
    import torch
    from transformers import Trainer

    from toolkit import train

    class StartStep(TrainerCallback):
        step = None
        adam_steps: set[int] | None = None

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            self.step = state.global_step  # a fresh optimizer has no state before its first step
            self.adam_steps = {int(v["step"]) for v in optimizer.state_dict()["state"].values()}

    cfg = tiny_cfg(tiny_model, max_steps=6, save_steps=2, learning_rate=5e-3)
    straight = tmp_path / "straight"
    expected = train.run(cfg, prep_dir, straight)["metrics"]
    broken = tmp_path / "broken"
    save_rng_state = Trainer._save_rng_state

    def killed_while_saving(self, output_dir):
        if output_dir.endswith("checkpoint-4"):  # weights and optimizer written, RNG and trainer state not yet
            raise KeyboardInterrupt
        save_rng_state(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_rng_state", killed_while_saving)
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg, prep_dir, broken)
    folder = broken / "checkpoints"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert (folder / "checkpoint-2" / "optimizer.pt").is_file() and not (broken / "manifest.json").exists()
    # a checkpoint folder truncated by a kill under transformers' own writer (weights cut off, no trainer state)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00")
    with open(broken / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 4, "loss": 6.9')  # a line cut off by the kill
    start = StartStep()
    manifest = train.run(cfg, prep_dir, broken, resume=True, callbacks=[start])
    metrics = manifest["metrics"]
    assert start.step == 2 and metrics["resumed_from_step"] == 2 and metrics["steps"] == 6
    assert start.adam_steps == {2}  # AdamW moments restored from checkpoint-2
    assert not (broken / "checkpoints").exists()
    a, b = adapter_tensors(straight), adapter_tensors(broken)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    records = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # lines after step 2 re-logged once
    # metrics of the whole run, not of the resumed steps alone
    assert metrics["mean_train_loss"] == pytest.approx(expected["mean_train_loss"], rel=1e-4)
    assert metrics["steady_tokens_per_second"] is not None and metrics["steady_tokens_per_second"] > 0
    # a resume with another config is refused
    (broken / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="--resume with another config.*learning_rate"):
        train.run(tiny_cfg(tiny_model, max_steps=6, save_steps=2, learning_rate=1e-3),
                  prep_dir, broken, resume=True)


def test_a_cut_off_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    """Issue 18, item 6: the line a kill cut off in metrics.jsonl is dropped with a warning, not a crash."""
    from transformers import TrainerControl, TrainerState

    from toolkit.tracking import MetricsCallback, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "loss": 7.0}\n{"step": 4, "lo',
                    encoding="utf-8")
    state = TrainerState(global_step=2)
    with caplog.at_level("WARNING", logger="toolkit.tracking"):
        MetricsCallback(path).on_train_begin(None, state, TrainerControl())
    assert path.read_text().splitlines() == ['{"step": 1, "loss": 9.0}', '{"step": 2, "loss": 8.0}']
    assert "metrics.jsonl:4: unreadable line dropped" in caplog.text
    assert read_metrics(path) == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}]


def test_whole_run_metrics_after_a_resume():
    """Issue 18, item 8: after a resume, the mean loss and the steady throughput cover the whole run."""
    from toolkit.checkpoints import mean_train_loss
    from toolkit.train import steady_tokens_per_second

    # losses logged every 2 steps; the run was resumed from checkpoint-4 and trained steps 5..8
    history = [{"loss": 10.0, "step": 2}, {"loss": 8.0, "step": 4}, {"loss": 6.0, "step": 6}, {"loss": 4.0, "step": 8}]
    assert mean_train_loss(history, 5.0, 8, resumed_from=4) == pytest.approx((10 * 2 + 8 * 2 + 5.0 * 4) / 8)
    assert mean_train_loss(history, 7.0, 8, resumed_from=None) == 7.0
    # each train() call restarts the clock (train_runtime) and compiles again; 1,000 tokens a second otherwise
    first = [(1, 20.0), (2, 21.0), (3, 22.0), (4, 23.0)]
    second = [(5, 15.0), (6, 16.0), (7, 17.0), (8, 18.0)]
    logs = [{"loss": 1.0, "step": s, "num_input_tokens_seen": 1000 * s, "train_runtime": t} for s, t in first + second]
    assert steady_tokens_per_second(logs, resumed_from=4) == pytest.approx(1000.0)
    assert steady_tokens_per_second(logs) == pytest.approx(1000.0)  # the clock's restart shows it too


@pytest.mark.slow
def test_run_continues_after_a_kill(tiny_model, sample_tsv, tmp_path, monkeypatch):
    """Issue 18, item 7: `toolkit run` again after a kill: prep is a no-op, the interrupted train resumes."""
    from click.testing import CliRunner

    from toolkit import train
    from toolkit.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["run", str(sample_tsv), "--run", "demo", "--config", "tiny-cpu", "--until", "train",
            "--set", f"train.base_model={json.dumps(str(tiny_model))}", "--set", "train.max_steps=4",
            "--set", "train.save_steps=2", "--set", "train.eval_steps=0", "--set", "train.logging_steps=1",
            "--set", "prep.length_unit='chars'"]
    build = train.build_trainer
    with monkeypatch.context() as patch:
        patch.setattr(train, "build_trainer", lambda *args: build(*args[:7], [Kill(3)]))
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 130 and "run the same command again to continue" in result.stderr
    folder = tmp_path / "export" / "demo"
    prep_created = json.loads((folder / "prep" / "manifest.json").read_text())["created"]
    assert (folder / "train" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (folder / "train" / "manifest.json").exists()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["prep\texport/demo/prep", "train\texport/demo/train"]
    assert json.loads((folder / "prep" / "manifest.json").read_text())["created"] == prep_created
    metrics = json.loads((folder / "train" / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4


@pytest.mark.slow
def test_two_process_cpu_run_through_accelerate_launch(tiny_model, prep_dir, tmp_path):
    """Issue 9, CPU part: DDP over gloo with 2 processes trains and saves one adapter.

    `accelerate launch --cpu` runs a single process (multi-CPU goes through mpirun), so the processes are
    started by accelerate's torchrun launcher (`--multi_gpu`), and the CPU-only host makes them gloo DDP.
    """
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "toolkit", "train", str(prep_dir), "--config", "tiny-cpu", "--out", str(out),
           "--max-steps", "2", "--set", f"train.base_model={json.dumps(str(tiny_model))}",
           "--set", "train.eval_steps=0", "--set", "train.save_steps=0", "--set", "train.batch_size=2"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out)]  # printed once, by the main process
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["processes"] == 2 and metrics["parallelism"] == "ddp" and metrics["steps"] == 2
    assert metrics["tokens_seen"] > 2 * 2 * 2 * 100  # 2 steps x 2 processes x 2 examples of 300+ tokens
    assert {o["path"] for o in manifest["outputs"]} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert any("experts" in k for k in adapter_tensors(out))


@pytest.mark.slow
def test_fsdp2_shards_the_lora_model_and_trains_like_one_process(tiny_model):
    """Issue 9, CPU part: FSDP2 (`fully_shard` per decoder layer, as the shipped fsdp.yaml asks accelerate
    for) over 2 gloo processes shards the toolkit's LoRA model (attention, experts, low-rank expert path),
    and 3 steps on two half-batches give the losses of the unsharded model on the whole batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp2_worker.py"), str(tiny_model)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["trainable"] == result["dtensor_trainable"] > 0 and result["local_share"] == pytest.approx(0.5)
    assert result["expert_lora"] == ["lora_A", "lora_B"]
    assert result["got"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["got"][-1] < result["got"][0]
