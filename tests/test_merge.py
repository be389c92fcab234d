"""`toolkit merge` on the tiny gpt-oss: the adapter (attention + expert LoRA) really lands in the weights.

The float32 `tiny_model` base (dense output) and the MXFP4 `tiny_mxfp4` base in the released layout (bf16 and
mxfp4 output), each against peft's own `merge_and_unload` (the reference, used nowhere else).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from lora_fixture import make_train_dir

from toolkit import artifacts, config, merge
from toolkit.cli import main
from toolkit.errors import ArtifactError

MERGED_FILES = {"chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                "tokenizer.json", "tokenizer_config.json", "manifest.json"}


@pytest.fixture(scope="module")
def train_dir(tiny_model, tmp_path_factory) -> Path:
    return make_train_dir(tiny_model, tmp_path_factory.mktemp("train") / "train")


@pytest.fixture(scope="module")
def merged(train_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merge") / "merge"
    return out, merge.run(config.build("merge"), train_dir, out)


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_merge_writes_exact_files_and_parity_figures(merged):
    out, manifest = merged
    assert {p.name for p in out.iterdir()} == MERGED_FILES
    parity = manifest["metrics"]["parity"]
    assert parity["max_abs_diff_merged_vs_expected"] < 1e-4
    assert parity["max_abs_diff_merged_vs_base"] > 1e-2
    assert parity["prompt_source"] == "prep manifest" and parity["dtype"] == "float32"
    assert manifest["upstream"]["stage"] == "train"
    assert "<|start|>assistant" in (out / "chat_template.jinja").read_text()


def test_merged_weights_are_base_plus_scaled_lora(tiny_model, train_dir, merged):
    """W' = W + (alpha/r) B A for attention; experts changed; untouched tensors are bit-identical."""
    import torch
    from safetensors.torch import load_file

    base, new = _tensors(tiny_model), _tensors(merged[0])
    assert base.keys() == new.keys()
    lora = load_file(str(train_dir / "adapter_model.safetensors"))
    cfg = json.loads((train_dir / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = cfg["lora_alpha"] / cfg["r"] * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(new[key], base[key] + delta, atol=1e-6, rtol=1e-5)
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert (new[key] - base[key]).abs().max() > 1e-4, key
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.router.weight",
                "model.layers.1.self_attn.sinks", "model.layers.0.self_attn.q_proj.bias"):
        assert torch.equal(new[key], base[key]), key


def test_merged_folder_reloads_with_adapter_logits(tiny_model, train_dir, merged):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 99, 300, 42, 7, 8, 600]])
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(merged[0], dtype=torch.float32)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                            str(train_dir))(ids).logits
    torch.testing.assert_close(reloaded, adapted, atol=1e-4, rtol=1e-4)


def test_rerun_is_noop_other_config_refused(train_dir, merged):
    out, manifest = merged
    again = merge.run(config.build("merge"), train_dir, out)
    assert again["created"] == manifest["created"]
    with pytest.raises(ArtifactError, match="--force"):
        merge.run(config.build("merge", None, ["merge.parity_text=你好"]), train_dir, out)


def test_another_adapter_is_no_no_op_and_a_failed_force_keeps_the_merge(tiny_model, train_dir, merged, tmp_path):
    """Issue 18, items 1 and 2: `merge OTHER_TRAIN --out FINISHED` is refused (the train folder is an input, by its
    manifest's path and sha256); with --force, a merge that fails leaves the finished one as it was."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "merge"
    shutil.copytree(merged[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = make_train_dir(tiny_model, tmp_path / "other", seed=2)
    with pytest.raises(ArtifactError, match=r"from other inputs \(.*other/manifest.json instead of .*Pass --force"):
        merge.run(config.build("merge"), other, out)
    weights = load_file(str(other / "adapter_model.safetensors"))  # an untrained adapter: the merge check fails
    save_file({k: v * 0 if "lora_B" in k else v for k, v in weights.items()}, str(other / "adapter_model.safetensors"))
    with pytest.raises(ArtifactError, match="the adapter has no effect"):
        merge.run(config.build("merge"), other, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge", "other"]  # no partial build left beside it


def test_noop_adapter_is_refused_and_nothing_written(tiny_model, tmp_path):
    """A fresh LoRA (B = 0) changes nothing: the merge check must refuse it, leaving no manifest."""
    from safetensors.torch import load_file, save_file

    train = make_train_dir(tiny_model, tmp_path / "train")
    weights = load_file(str(train / "adapter_model.safetensors"))
    save_file({k: v * 0 if "lora_B" in k else v for k, v in weights.items()}, str(train / "adapter_model.safetensors"))
    with pytest.raises(ArtifactError, match="the adapter has no effect"):
        merge.run(config.build("merge"), train, tmp_path / "out")
    assert not (tmp_path / "out" / artifacts.MANIFEST).exists()


def test_check_parity_rejects_a_wrong_merge():
    import torch

    base, expected = torch.zeros(10), torch.ones(10)
    with pytest.raises(ArtifactError, match="differ by 0.02 .* from base\\+adapter computed with the same rounding"):
        merge.check_parity(base, expected, expected + 0.02)
    figures = merge.check_parity(base, expected, expected + 1e-4)  # float32 noise passes
    assert figures["max_abs_diff_merged_vs_base"] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ArtifactError, match="differ by 0.5"):  # half the adapter lost
        merge.check_parity(base, expected, expected * 0.5)
    with pytest.raises(ArtifactError, match="no effect"):  # rounding (or training) left nothing to merge
        merge.check_parity(base, base, base)


def test_storage_rounding_is_reported_not_refused(tiny_mxfp4, mxfp4_merge, tmp_path, caplog):
    """bf16 of a float32 merge: the written model equals base+adapter rounded the same way (the check passes) and
    the manifest says how much of the exact adapter's effect the rounding kept."""
    manifest = merge.run(build(dtype="bfloat16"), mxfp4_merge[0], tmp_path / "out")
    parity = manifest["metrics"]["parity"]
    assert parity["max_abs_diff_merged_vs_expected"] <= parity["allowed"]
    assert 0.5 < parity["effect_kept"] < 1 and parity["top1_agreement"] > 0.5


def test_missing_adapter_is_a_clear_error(tmp_path):
    artifacts.write_manifest(tmp_path, stage="train", config={})
    with pytest.raises(ArtifactError, match="no adapter_config.json"):
        merge.run(config.build("merge"), tmp_path, tmp_path / "out")


def test_cli_merge(train_dir, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(train_dir), "--out", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert (out / "manifest.json").is_file()


def test_vocab_files_the_tokenizer_does_not_save_are_copied(tmp_path):
    """A SentencePiece base's tokenizer.model reaches the merged folder (llama.cpp's converter needs it)."""
    from toolkit.merge import copy_vocab_files

    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir()
    out.mkdir()
    (base / "tokenizer.model").write_bytes(b"\x0a\x03sp!")
    copy_vocab_files(str(base), out)
    assert (out / "tokenizer.model").read_bytes() == b"\x0a\x03sp!"
    (base / "tokenizer.model").write_bytes(b"other")
    copy_vocab_files(str(base), out)  # never overwrites what the merge wrote itself
    assert (out / "tokenizer.model").read_bytes() == b"\x0a\x03sp!"
    copy_vocab_files("org/hub-model", tmp_path / "none")  # a hub id: nothing to copy, no error


# --- the streamed merge of gpt-oss' MXFP4 release (tiny_mxfp4), against peft's merge_and_unload ---
EXPERT_TENSORS = [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]


def build(**values):
    return config.build("merge", None, [], **values)


def lowrank_train_dir(base: Path, out_dir: Path) -> Path:
    """An adapter made the way `toolkit train` makes it with train.lowrank_experts: toolkit.lora, one SGD step
    through the low-rank grouped-GEMM forward (B given values first: a fresh LoRA's B = 0)."""
    import torch

    from toolkit import lora
    from toolkit.config import PrepConfig, as_dict

    sets = {"base_model": str(base), "dtype": "float32", "experts_implementation": "grouped_mm",
            "lowrank_experts": True, "expert_layers": "all"}
    cfg = config.build("train", "tiny-cpu", [f"train.{k}={json.dumps(v)}" for k, v in sets.items()])
    model = lora.attach_lora(lora.load_base(cfg), cfg)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 0.5 * param.grad
    model.save_pretrained(out_dir)
    prep = {"stage": "prep", "config": as_dict(PrepConfig()), "upstream": None}
    artifacts.write_manifest(out_dir, stage="train", config={"base_model": str(base)}, upstream=prep)
    return out_dir


ADAPTERS = {  # name -> LoraConfig overrides of lora_fixture.make_train_dir, or "lowrank"
    "attention+experts": {},
    "experts-layer-1": {"target_modules": [], "target_parameters": ["layers.1.mlp.experts.gate_up_proj",
                                                                    "layers.1.mlp.experts.down_proj"]},
    "attention-layer-0-rslora": {"target_modules": ["q_proj", "o_proj"], "target_parameters": None,
                                 "layers_to_transform": [0], "use_rslora": True},
    "lowrank_experts": "lowrank",
}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def mxfp4_adapter(request, tiny_model, tiny_mxfp4, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("adapter") / "train"
    if ADAPTERS[request.param] == "lowrank":  # trained on the float32 copy: the adapter depends on shapes only
        lowrank_train_dir(tiny_model, folder)
    else:
        make_train_dir(tiny_mxfp4, folder, **ADAPTERS[request.param])
    return request.param, folder


def peft_merged(base: Path, adapter: Path) -> dict:
    """The reference: transformers dequantizes the MXFP4 base, peft merges in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=Mxfp4Config(dequantize=True))
    model = PeftModel.from_pretrained(model.to(torch.float32), str(adapter)).merge_and_unload()
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def dense(folder: Path) -> dict:
    import torch

    from toolkit.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    return {name: ckpt.param(name, torch.float32) for name in ckpt.param_names()}


def test_streamed_merge_equals_peft_for_every_kind_of_target(mxfp4_adapter, tiny_mxfp4, tmp_path):
    import torch

    kind, train = mxfp4_adapter
    manifest = merge.run(build(dtype="float32", base_model=str(tiny_mxfp4)), train, tmp_path / "out")
    merged, reference, base = dense(tmp_path / "out"), peft_merged(tiny_mxfp4, train), dense(tiny_mxfp4)
    assert merged.keys() == base.keys() == reference.keys()
    targets = json.loads((train / "adapter_config.json").read_text())
    changed = {name for name in merged if not torch.equal(merged[name], base[name])}
    for name in merged:
        torch.testing.assert_close(merged[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    expected = {n for n in merged if not torch.equal(reference[n], base[n])}
    assert changed == expected and changed, kind  # exactly the adapter's targets moved, nothing else
    experts_changed = changed & set(EXPERT_TENSORS)
    assert bool(experts_changed) == bool(targets["target_parameters"]), kind
    assert manifest["metrics"]["parity"]["max_abs_diff_merged_vs_expected"] < 1e-3


def test_expert_lora_reaches_the_merged_experts(tiny_mxfp4, tmp_path):
    """Fails if expert LoRA is dropped (as a merge that leaves packed tensors untouched does): every expert tensor
    the adapter targets moves by exactly scale * (its B @ A per expert), in bf16 output too."""
    import torch
    from safetensors.torch import load_file

    train = make_train_dir(tiny_mxfp4, tmp_path / "train", target_modules=[])
    merge.run(build(base_model=str(tiny_mxfp4)), train, tmp_path / "out")  # bf16, the default for this base
    merged, base = dense(tmp_path / "out"), dense(tiny_mxfp4)
    lora = load_file(str(train / "adapter_model.safetensors"))
    for layer in (0, 1):
        for key, name in ((f"layers.{layer}.mlp.experts.base_layer", "gate_up_proj"),
                          (f"layers.{layer}.mlp.experts", "down_proj")):
            a = lora[f"base_model.model.model.{key}.lora_A.weight"].reshape(4, 4, -1)  # [E, r, in]
            b = lora[f"base_model.model.model.{key}.lora_B.weight"].reshape(-1, 4, 4)  # [out, r, E]
            delta = 2.0 * torch.einsum("ore,eri->eio", b, a)  # peft's layout, alpha / r = 2
            param = f"model.layers.{layer}.mlp.experts.{name}"
            moved = merged[param] - base[param]
            assert moved.abs().max() > 0.5 * delta.abs().max(), param
            torch.testing.assert_close(moved, delta, atol=2e-2, rtol=0)  # bf16 rounding of the merged weight


@pytest.fixture(scope="module")
def mxfp4_merge(tiny_mxfp4, tmp_path_factory) -> tuple[Path, Path, dict]:
    """--format mxfp4 with requantize_adapted (the released layout exactly) of an adapter on attention and on layer
    0's experts only."""
    root = tmp_path_factory.mktemp("mxfp4-merge")
    train = make_train_dir(tiny_mxfp4, root / "train", target_parameters=["layers.0.mlp.experts.gate_up_proj",
                                                                          "layers.0.mlp.experts.down_proj"])
    return train, root / "out", merge.run(build(format="mxfp4", requantize_adapted=True), train, root / "out")


def test_mxfp4_output_keeps_the_released_layout(tiny_mxfp4, mxfp4_merge):
    import torch

    from toolkit import mxfp4
    from toolkit.checkpoint import Checkpoint

    train, out, manifest = mxfp4_merge
    written, base = Checkpoint(out), Checkpoint(tiny_mxfp4)
    assert set(written.weight_map) == set(base.weight_map)  # blocks/scales where the release has them
    assert written.config["quantization_config"]["quant_method"] == "mxfp4"
    assert {written.header(n)[0] for n in written.weight_map if not mxfp4.param_name_of(n)} == {"BF16"}
    for name in EXPERT_TENSORS:
        same = all(torch.equal(w, b) for w, b in zip(written.packed(name), base.packed(name)))
        assert same == name.startswith("model.layers.1."), name  # untouched experts: the base's bytes
    reference = peft_merged(tiny_mxfp4, train)
    for name in EXPERT_TENSORS[:2]:  # layer 0: the float32 merge, re-quantized
        expected = mxfp4.dequantize_param(*mxfp4.quantize_param(reference[name]))
        got = written.param(name, torch.float32)
        assert (got == expected).float().mean() > 0.999, name  # a midpoint tie may round the other way
    parity = manifest["metrics"]["parity"]
    assert parity["format"] == "mxfp4" and 0 < parity["effect_kept"] <= 1 and parity["effect_cosine"] > 0.5
    assert 0 <= parity["top1_agreement"] <= 1 and parity["positions"] == parity["prompt_tokens"] > 10


def test_mxfp4_output_loads_in_transformers(mxfp4_merge):
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from toolkit import layerwise

    out = mxfp4_merge[1]
    ids = [5, 17, 99, 300, 42, 7, 8, 600]
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=Mxfp4Config(dequantize=True))
    with torch.no_grad():
        logits = model.to(torch.float32)(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, layerwise.logits(out, [ids])[0], atol=1e-4, rtol=1e-4)


def test_mxfp4_output_keeps_the_adapted_experts_dense_by_default(tiny_mxfp4, mxfp4_merge, tmp_path):
    """The default mxfp4 merge: layer 0's changed experts dense bf16 (named in modules_to_not_convert), layer 1's
    the base's own blocks; the weights are those of the bf16 merge, so no adapter effect is lost to FP4 rounding."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from toolkit import layerwise
    from toolkit.checkpoint import Checkpoint

    train = mxfp4_merge[0]
    manifest = merge.run(build(format="mxfp4"), train, tmp_path / "mixed")
    dense_merge = merge.run(build(), train, tmp_path / "bf16")
    written, base, bf16 = Checkpoint(tmp_path / "mixed"), Checkpoint(tiny_mxfp4), Checkpoint(tmp_path / "bf16")
    assert written.config["quantization_config"]["modules_to_not_convert"][-1] == "model.layers.0.mlp.experts"
    for name in EXPERT_TENSORS:
        if name.startswith("model.layers.0."):
            assert written.packed(name) is None and written.header(name)[0] == "BF16"
        else:
            assert all(torch.equal(w, b) for w, b in zip(written.packed(name), base.packed(name)))
        assert torch.equal(written.param(name, torch.float32), bf16.param(name, torch.float32)), name
    parity, reference = manifest["metrics"]["parity"], dense_merge["metrics"]["parity"]
    assert parity["dense_expert_modules"] == ["model.layers.0.mlp.experts"] and parity["requantized_experts"] == []
    assert parity["effect_kept"] == pytest.approx(reference["effect_kept"], abs=1e-6)
    assert parity["effect_kept"] > mxfp4_merge[2]["metrics"]["parity"]["effect_kept"]  # re-quantizing loses some
    ids = [5, 17, 99, 300, 42, 7, 8, 600]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", quantization_config=Mxfp4Config(dequantize=True))
    with torch.no_grad():
        logits = model.to(torch.float32)(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, layerwise.logits(tmp_path / "mixed", [ids])[0], atol=1e-4, rtol=1e-4)


def test_bf16_output_of_the_mxfp4_base_is_dense(tiny_mxfp4, mxfp4_merge, tmp_path):
    from toolkit.checkpoint import Checkpoint

    manifest = merge.run(build(), mxfp4_merge[0], tmp_path / "out")
    written = Checkpoint(tmp_path / "out")
    assert "quantization_config" not in written.config and written.config["dtype"] == "bfloat16"
    assert set(written.weight_map) == set(Checkpoint(tiny_mxfp4).param_names())
    assert {written.header(n)[0] for n in written.weight_map} == {"BF16"}
    parity = manifest["metrics"]["parity"]
    assert parity["effect_kept"] > mxfp4_merge[2]["metrics"]["parity"]["effect_kept"]  # MXFP4 rounds more


def test_parity_check_catches_a_broken_merge_and_writes_nothing(tiny_mxfp4, mxfp4_merge, tmp_path, monkeypatch):
    """The written weights get 3x the LoRA scale (the reference forward does not): refused, nothing left."""
    import dataclasses

    from toolkit import merge_plan

    original = merge_plan.MergePlan._dense

    def tripled(self, name):
        target = self.adapter.targets.get(name)
        if target is None:
            return original(self, name)
        self.adapter.targets[name] = dataclasses.replace(target, scale=3 * target.scale)
        try:
            return original(self, name)
        finally:
            self.adapter.targets[name] = target

    monkeypatch.setattr(merge_plan.MergePlan, "_dense", tripled)
    with pytest.raises(ArtifactError, match="merge check failed: the written model.s logits differ") as err:
        merge.run(build(dtype="float32"), mxfp4_merge[0], tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # built beside OUT: nothing is left after a failed check


def test_dropped_expert_lora_is_an_error(tiny_mxfp4, mxfp4_merge, tmp_path, monkeypatch):
    """A writer that copies the expert stacks without their LoRA is stopped before anything is kept."""
    from toolkit import merge_plan

    original = merge_plan.MergePlan._packed
    monkeypatch.setattr(merge_plan.MergePlan, "_packed", lambda self, name: self.base.packed(name) or
                        original(self, name))
    with pytest.raises(ArtifactError, match="did not apply the LoRA of .*experts"):
        merge.run(build(format="mxfp4", requantize_adapted=True), mxfp4_merge[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # built beside OUT: nothing is left after a failed check


def test_unsupported_adapters_are_refused_in_one_line(tiny_mxfp4, mxfp4_merge, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for case in ("dora", "missing-layer"):
        train = tmp_path / case
        shutil.copytree(mxfp4_merge[0], train)
        if case == "dora":
            settings = json.loads((train / "adapter_config.json").read_text())
            (train / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
            expected = "use_dora = true is not supported"
        else:  # a LoRA on a layer this base does not have (another base's adapter)
            weights = load_file(str(train / "adapter_model.safetensors"))
            weights = {k.replace("layers.1.self_attn", "layers.7.self_attn"): v for k, v in weights.items()}
            save_file(weights, str(train / "adapter_model.safetensors"))
            expected = "tensors do not match adapter_config.json"
        with pytest.raises(ArtifactError, match=expected) as err:
            merge.run(build(), train, tmp_path / f"out-{case}")
        assert "\n" not in str(err.value)
        assert not (tmp_path / f"out-{case}" / artifacts.MANIFEST).exists()


def test_non_moe_base_merges_and_refuses_mxfp4(tiny_model, tmp_path):
    """A dense (Llama) base: the streamed merge equals peft's; --format mxfp4 has no experts to pack."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    train = make_train_dir(tmp_path / "llama", tmp_path / "train", target_parameters=None)
    with pytest.raises(ArtifactError, match="no MoE expert tensors"):
        merge.run(build(format="mxfp4"), train, tmp_path / "out-mxfp4")
    merge.run(build(), train, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"  # auto: the base's
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"),
                                          str(train)).merge_and_unload().state_dict()
    merged = dense(tmp_path / "out")
    assert merged.keys() == reference.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cli_merge_format_mxfp4(mxfp4_merge, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(mxfp4_merge[0]), "--out", str(out), "--format", "mxfp4"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["config"]["format"] == "mxfp4"


def test_nested_expert_adapters_saved_in_the_other_order_merge_the_same(tiny_mxfp4, mxfp4_merge, tmp_path):
    """A qlora run (4-bit, parametrized experts) nests gate_up_proj's and down_proj's ParamWrappers the other way
    round than peft does on the plain model: the merge pairs them by shape, and merges exactly the same."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from toolkit.checkpoint import Checkpoint

    train = tmp_path / "swapped"
    shutil.copytree(mxfp4_merge[0], train)
    weights = load_file(str(train / "adapter_model.safetensors"))
    outer, inner = ".mlp.experts.lora_", ".mlp.experts.base_layer.lora_"
    swapped = {k.replace(outer, "@").replace(inner, outer).replace("@", inner): v for k, v in weights.items()}
    assert any(swapped[k].shape != weights[k].shape for k in weights)  # gate_up and down traded places
    save_file(swapped, str(train / "adapter_model.safetensors"))
    merge.run(build(), mxfp4_merge[0], tmp_path / "plain")
    merge.run(build(), train, tmp_path / "other-order")
    want, got = Checkpoint(tmp_path / "plain"), Checkpoint(tmp_path / "other-order")
    for name in want.param_names():
        assert torch.equal(got.param(name), want.param(name)), name
