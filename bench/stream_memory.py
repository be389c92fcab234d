"""`python bench/stream_memory.py --work DIR [--sizes 512x2x8,1024x4x16] [--only load,merge,export]`: peak host RSS
and time against model size, on the CPU, of today's paths and the streamed ones: the weight-loading part of QLoRA,
the merge, and the export. Prints a Markdown table on stdout (progress on stderr).

Models are random gpt-oss checkpoints in the released MXFP4 layout (`toolkit.tiny.write_released_layout`),
SIZE = HIDDEN x LAYERS x EXPERTS (intermediate = hidden, the tiny BPE tokenizer), with a random LoRA adapter
(attention + expert LoRA). Each measurement runs in a fresh subprocess of this script (`--one NAME`), so
`ru_maxrss` is that measurement's own peak; `baseline` is the same subprocess importing torch, transformers
and peft and doing nothing: the footprint the streamed paths should stay near (plus one shard or tensor).

The measured paths are named callables in MEASURES; a path not available in this checkout (the streamed merge
before it lands: `merge.format` unknown) prints "n/a". Plug other implementations in there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_SIZES = "512x2x8,1024x4x16,1536x8x32"  # the largest: 1.8B params, today's float32 merge ~15 GB of RAM
SHARD_BYTES = 200_000_000


class NotAvailable(Exception):
    """The path is not in this checkout."""


# ---- fixtures ---------------------------------------------------------------------------------------------------

def gpt_oss_config(hidden: int, layers: int, experts: int, tokenizer):
    from transformers import GptOssConfig

    heads = max(4, hidden // 64)
    return GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64, num_local_experts=experts,
        num_experts_per_tok=min(4, experts), sliding_window=128, max_position_embeddings=4096,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|return|>")], tie_word_embeddings=False,
        architectures=["GptOssForCausalLM"],
    )


def build(root: Path, hidden: int, layers: int, experts: int) -> dict[str, Path]:
    """The MXFP4 base (also the stand-in for `merge --format mxfp4`'s output), its bf16 copy, a train folder."""
    import torch
    from transformers import GptOssForCausalLM

    from toolkit import artifacts, checkpoint
    from toolkit.config import PrepConfig, as_dict
    from toolkit.tiny import build_bpe_tokenizer, write_released_layout

    base, bf16, train = root / "base", root / "merged-bf16", root / "train"
    prep = {"stage": "prep", "config": as_dict(PrepConfig()), "upstream": None}
    train_manifest = {"stage": "train", "config": {"base_model": str(base)}, "upstream": prep}
    if not (base / artifacts.MANIFEST).is_file():
        shutil.rmtree(root, ignore_errors=True)
        tok = build_bpe_tokenizer()
        config = gpt_oss_config(hidden, layers, experts, tok)
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in GptOssForCausalLM(config).state_dict().items()}
        gen = torch.Generator().manual_seed(0)

        def produce(name):
            if name.endswith("norm.weight"):
                return torch.ones(shapes[name], dtype=torch.bfloat16)
            return (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)

        def packed(name, shape):
            count, cols, rows = shape
            return (torch.randint(0, 256, (count, rows, cols // 32, 16), generator=gen, dtype=torch.uint8),
                    torch.randint(119, 122, (count, rows, cols // 32), generator=gen, dtype=torch.uint8))

        write_released_layout(base, config, produce, SHARD_BYTES, packed=packed)
        tok.save_pretrained(base)
        write_adapter(base, train)
        artifacts.write_manifest(train, stage="train", config={"base_model": str(base)}, upstream=prep)
        # the bf16 merge stand-in: the same weights dequantized, streamed tensor by tensor
        ckpt = checkpoint.Checkpoint(base)
        names = ckpt.param_names()
        entries = [checkpoint.Entry(n, "BF16", shapes[n]) for n in names]
        checkpoint.write_shards(bf16, entries, lambda e: ckpt.param(e.name, torch.bfloat16),
                                max_shard_bytes=SHARD_BYTES)
        data = json.loads((base / "config.json").read_text())
        data.pop("quantization_config")
        (bf16 / "config.json").write_text(json.dumps(data, indent=2))
        tok.save_pretrained(bf16)
        for folder in (bf16, base):  # base last: its manifest marks the fixture complete
            artifacts.write_manifest(folder, stage="merge", config={}, upstream=train_manifest)
    return {"base": base, "bf16": bf16, "train": train}


def write_adapter(base: Path, out: Path, r: int = 8) -> None:
    """A random LoRA (attention + experts) in peft's own format, made on a meta-device model (no weights loaded)."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], task_type="CAUSAL_LM",
                      base_model_name_or_path=str(base))
    state = get_peft_model_state_dict(get_peft_model(model, lora))
    gen = torch.Generator().manual_seed(1)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in state.items()},
              str(out / "adapter_model.safetensors"))
    lora.save_pretrained(str(out))


# ---- the measured paths (each runs in its own subprocess) ---------------------------------------------------------

def baseline(paths: dict[str, Path], work: Path) -> None:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def load_today(paths: dict[str, Path], work: Path) -> None:
    """Today's QLoRA loading: the whole model dequantized to bf16 in host RAM before the NF4 pass to the GPU."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16, device_map="cpu",
                                         quantization_config=Mxfp4Config(dequantize=True))


def load_streamed(paths: dict[str, Path], work: Path) -> None:
    """The streamed QLoRA loading of `toolkit.loader` (meta-device model, each tensor read, dequantized to bf16 and
    placed before the next is read), with a placement that drops each tensor: it stands in for the NF4 quantization
    on the GPU, which takes it off the host at once."""
    import torch
    from transformers import AutoConfig

    from toolkit import loader

    config = AutoConfig.from_pretrained(paths["base"])
    model = loader.empty_model(config, torch.bfloat16)
    loader.stream_weights(model, loader.open_checkpoint(paths["base"]), lambda module, name, tensor: None)


def merge_peft(paths: dict[str, Path], work: Path) -> None:
    """Today's merge on the CPU: the base in float32, peft's merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32, device_map="cpu",
                                                 quantization_config=Mxfp4Config(dequantize=True))
    model = PeftModel.from_pretrained(model, str(paths["train"])).merge_and_unload()
    if getattr(model.config, "quantization_config", None) is not None:  # as toolkit merge did: plain weights now
        del model.config.quantization_config
    model.save_pretrained(work / "merged", max_shard_size="200MB")


def merge_streamed(fmt: str) -> Callable[[dict[str, Path], Path], None]:
    def run(paths: dict[str, Path], work: Path) -> None:
        from toolkit import config, merge

        if "format" not in config.MergeConfig.__dataclass_fields__:
            raise NotAvailable("toolkit.merge has no --format in this checkout")
        merge.run(config.build("merge", None, [f"merge.format={fmt}"]), paths["train"], work / "merged")
    return run


def export_cfg(**values):
    from toolkit import config

    # resources, not quality: a random model's flat logits would fail the checks for no reason
    return config.build("export", None, [], pre_tokenizer="gpt-4o", float_rtol=1.0, min_top1=0.0,
                        verify_texts=["你好"], **values)


def export_today(paths: dict[str, Path], work: Path) -> None:
    """Today's export: bf16 merge -> bf16 GGUF -> MXFP4_MOE, verified against the merged model loaded whole."""
    from toolkit import gguf

    def loaded_reference(merged_dir: Path, prompts: list[str]):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
        config = AutoConfig.from_pretrained(merged_dir)
        gguf.match_llama_cpp_rope(config)
        model = AutoModelForCausalLM.from_pretrained(merged_dir, config=config, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = [model(input_ids=torch.tensor([row])).logits[0].numpy() for row in ids]
        return {"ids": ids, "logits": logits, "last_as_shipped": None, "dtype": "float32", "rope_rounded": False}

    gguf.reference_logits = loaded_reference
    manifest = gguf.run(export_cfg(outtype="bf16", quants=["MXFP4_MOE"], ollama_gguf="MXFP4_MOE"), paths["bf16"],
                        work / "export")
    print(json.dumps({"disk_peak": manifest["metrics"]["resources"]["disk_peak_bytes"]}))


def export_streamed(paths: dict[str, Path], work: Path) -> None:
    """mxfp4 merge -> MXFP4_MOE GGUF (experts passed through), verified layer by layer."""
    from toolkit import gguf

    manifest = gguf.run(export_cfg(outtype="bf16", quants=["MXFP4_MOE"], ollama_gguf="MXFP4_MOE"), paths["base"],
                        work / "export")
    print(json.dumps({"disk_peak": manifest["metrics"]["resources"]["disk_peak_bytes"]}))


MEASURES: dict[str, dict[str, Callable[[dict[str, Path], Path], None]]] = {
    "baseline": {"import torch, transformers, peft": baseline},
    "load": {"today: from_pretrained (bf16, CPU)": load_today, "streamed: Checkpoint.params -> meta model": load_streamed},
    "merge": {"today: peft merge_and_unload (fp32)": merge_peft, "streamed: --format bf16": merge_streamed("bf16"),
              "streamed: --format mxfp4": merge_streamed("mxfp4")},
    "export": {"today: bf16 GGUF -> MXFP4_MOE, loaded reference": export_today,
               "streamed: MXFP4_MOE straight, layerwise reference": export_streamed},
}


# ---- driver -----------------------------------------------------------------------------------------------------

def one(step: str, name: str, root: Path) -> int:
    """Child process: run one measurement, print its figures as the last stdout line."""
    import resource

    paths = {"base": root / "base", "bf16": root / "merged-bf16", "train": root / "train"}
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.monotonic()
    try:
        MEASURES[step][name](paths, work)
    except NotAvailable as exc:
        print(json.dumps({"n/a": str(exc)}))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": round(time.monotonic() - started, 1), "rss": self_peak, "child_rss": child_peak}))
    return 0


def measure(step: str, name: str, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", step, name, str(root)]
    result = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True)  # a failure is a row; its log on stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": f"exit {result.returncode}"}
    figures: dict = {}
    for line in lines:
        figures.update(json.loads(line))
    return figures


def mib(n: float | None) -> str:
    return "" if not n else f"{n / 2**20:,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the models (several GB for the largest size)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="HIDDENxLAYERSxEXPERTS,... (default %(default)s)")
    parser.add_argument("--only", default="baseline,load,merge,export", help="steps to measure")
    parser.add_argument("--one", nargs=3, metavar=("STEP", "NAME", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one[0], args.one[1], Path(args.one[2]))
    if args.work is None:
        parser.error("--work DIR is required")

    from toolkit.checkpoint import Checkpoint

    rows = []
    for size in args.sizes.split(","):
        hidden, layers, experts = (int(x) for x in size.lower().split("x"))
        root = args.work / size
        print(f"building {size} in {root}", file=sys.stderr)
        paths = build(root, hidden, layers, experts)
        ckpt = Checkpoint(paths["base"])
        disk = sum((paths["base"] / s).stat().st_size for s in ckpt.shards())
        shard = max((paths["base"] / s).stat().st_size for s in ckpt.shards())
        bf16 = sum(p.stat().st_size for p in paths["bf16"].glob("*.safetensors"))
        for step in args.only.split(","):
            for name in MEASURES[step]:
                print(f"  {size} {step}: {name}", file=sys.stderr)
                f = measure(step, name, root)
                rss = "n/a" if "n/a" in f else f.get("error") or mib(f.get("rss"))
                rows.append([size, mib(disk), mib(bf16), mib(shard), step, name, rss, mib(f.get("child_rss")),
                             str(f.get("seconds", "")), mib(f.get("disk_peak"))])
    header = ["size (h×L×E)", "MXFP4 MiB", "bf16 MiB", "largest shard MiB", "step", "path", "peak RSS MiB",
              "subprocess RSS MiB", "seconds", "disk peak MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
