"""A train run folder holding a random LoRA adapter of a preset's exact shapes, for merge/export benchmarks.

    python bench/full_size_adapter.py PREP_DIR OUT --model /tmp/g20b [--config gpt-oss-20b-qlora] [--scale 0.01]
                                      [--set train.KEY=VALUE ...]

Where no GPU is at hand to train one (a full-size qlora run needs CUDA and bitsandbytes), the merge's cost can
still be measured: it depends on the adapter's shapes and targets, never on the values learned. The base is
built on the meta device (no weights read), the preset's LoRA attached exactly as `toolkit train` attaches it
(same targets: attention on every layer, the expert tensors of `train.expert_layers`), and the factors drawn:
A as peft initialises it, B ~ N(0, scale) instead of peft's zeros, so that the adapter changes the model and
the merge's parity check has something to check. The folder is what `toolkit train` writes (adapter, tokenizer,
manifest with the prep manifest upstream); its manifest says `"synthetic": true` in its metrics, and the merge
manifest carries that upstream, so no figure measured on it can pass for a trained adapter's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prep", type=Path, help="a `toolkit prep` folder (its manifest goes upstream)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", required=True, help="the base checkpoint folder (only its config is read)")
    parser.add_argument("--config", default="gpt-oss-20b-qlora")
    parser.add_argument("--scale", type=float, default=0.01, help="standard deviation of the B factors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                        help="a train setting over the preset's (e.g. train.expert_layers=[0] for a tiny model)")
    args = parser.parse_args(argv)

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from toolkit import artifacts, lora, train
    from toolkit.config import as_dict, build

    base = [f'train.base_model="{args.model}"', *args.overrides]
    cfg = build("train", args.config, base)
    # the LoRA placement of the preset, on a bf16 meta model: 4-bit quantisation changes how the base is
    # stored, not which tensors carry LoRA factors or their shapes
    placement = build("train", args.config, [*base, 'train.mode="lora"', 'train.device="cpu"',
                                             "train.lowrank_experts=false", "train.activation_offloading=false"])
    prep = artifacts.read_manifest(args.prep, "prep")
    tokenizer = lora.load_tokenizer(cfg)
    config = lora.model_config(cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    peft_model = lora.attach_lora(model, placement)
    generator = torch.Generator().manual_seed(args.seed)
    count = 0
    for full, param in list(peft_model.named_parameters()):
        if "lora_" not in full:
            continue
        owner, _, leaf = full.rpartition(".")
        values = torch.empty(param.shape, dtype=torch.float32)
        if ".lora_A." in full:
            torch.nn.init.kaiming_uniform_(values, a=5 ** 0.5, generator=generator)
        else:
            values.normal_(0.0, args.scale, generator=generator)
        peft_model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(values.to(torch.bfloat16),
                                                                                requires_grad=False)
        count += 1
    args.out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    (args.out / "README.md").unlink(missing_ok=True)
    targets = lora.lora_targets(peft_model)
    metrics = {"steps": 0, "synthetic": True, "b_scale": args.scale, "seed": args.seed}
    manifest = artifacts.write_manifest(args.out, stage="train", config=as_dict(cfg),
                                        inputs=[args.prep / artifacts.MANIFEST], metrics=metrics, upstream=prep,
                                        extra=train.manifest_extra(cfg, lora.chat_format(cfg, config, tokenizer),
                                                                   targets))
    print(f"{count} LoRA factors on {len(targets['modules'])} modules + {len(targets['parameters'])} expert "
          f"tensors -> {args.out}")
    return manifest


if __name__ == "__main__":
    main()
