"""`toolkit tiny OUT`: a tiny random gpt-oss for tests and the CPU demo, generated offline and deterministically.

The model is the real `GptOssForCausalLM` architecture at toy size (hidden 64, 2 layers, 4 experts top-2,
one sliding and one full attention layer). The tokenizer is a small byte-level BPE trained on the shipped
sample corpus with gpt-oss's own pre-tokenizer pattern, carrying the Harmony special tokens and the Harmony
chat template; `real_tokenizer=True` uses the real `o200k_harmony` tokenizer instead (201,088 rows of
embeddings: about 13M parameters at hidden 32).

`mxfp4=True` writes the checkpoint the way openai/gpt-oss-20b ships: `quantization_config` (mxfp4) in
config.json, expert projections as MXFP4 `*_blocks`/`*_scales` (uint8), everything else bf16, in several
safetensors shards with an index. `build_gpt_oss_20b` writes a full-size random gpt-oss-20b (~13 GB) in
that layout, one tensor at a time (host memory: one tensor, not the model).
"""

from __future__ import annotations

from pathlib import Path

from toolkit import assets
from toolkit.errors import DataError

SAMPLE = assets.folder("corpora") / "zh-nan-moe-sample" / "sample.tsv"
HARMONY_SPECIALS = [
    "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
    "<|message|>", "<|call|>", "<|endofprompt|>",
]
BPE_VOCAB = 2048


def _training_text(sample: Path) -> list[str]:
    from toolkit.harmony import system_text
    from toolkit.prompt import default_spec

    if not sample.is_file():  # the tokenizer would silently differ: its merges are learnt from this text
        raise DataError(f"{sample}: the sample corpus the tiny tokenizer is trained on is missing; reinstall the "
                        "toolkit (its wheel ships corpora/) or run from a checkout.")
    lines = sample.read_text(encoding="utf-8").splitlines()[1:]
    spec = default_spec()
    extra = [system_text(e) for e in ("low", "medium", "high")] + [spec.messages("x")[0]["content"],
                                                                    spec.reversed().messages("x")[0]["content"]]
    # The fixed English of every prompt is repeated so BPE learns its merges: otherwise the system
    # message alone is ~300 byte-level tokens and every tiny training step is needlessly slow.
    return [cell for line in lines for cell in line.split("\t")] + extra * 200


def build_bpe_tokenizer(sample: Path = SAMPLE):
    """A byte-level BPE with gpt-oss's pre-tokenizer regex and the Harmony special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from toolkit.harmony import CHAT_TEMPLATE
    from toolkit.tokenizer import tiktoken_pattern

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tiktoken_pattern()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=HARMONY_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_training_text(sample), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny(out_dir: Path, seed: int = 0, real_tokenizer: bool = False, mxfp4: bool = False,
               max_shard_size: int = 200_000) -> Path:
    """Write a tiny random GptOssForCausalLM + tokenizer to `out_dir` (same seed -> same weights).

    mxfp4: the released layout (MXFP4 experts, bf16 rest, shards of `max_shard_size` bytes + index).
    """
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    out_dir = Path(out_dir)
    if real_tokenizer:
        from toolkit.tokenizer import build_hf_tokenizer

        tok = build_hf_tokenizer(out_dir)
        vocab, hidden = 201088, 32
    else:
        tok = build_bpe_tokenizer()
        vocab, hidden = len(tok), 64
    config = GptOssConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|return|>"), tok.convert_tokens_to_ids("<|call|>")],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # router and experts start near zero otherwise; give every expert real weights
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                # lm_head at std 0.5: at 0.05 the logits are too flat for a few LoRA steps to move the loss far
                std = 0.5 if name.startswith("lm_head") else 0.05
                torch.nn.init.normal_(param, std=std, generator=torch.Generator().manual_seed(seed + len(name)))
    model.generation_config.pad_token_id = tok.pad_token_id
    if mxfp4:
        state = model.state_dict()
        write_released_layout(out_dir, config, lambda name: state[name], max_shard_size)
        model.generation_config.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def expert_param(name: str) -> bool:
    """The 3-D expert projections MXFP4 stores packed (their biases stay bf16)."""
    return name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def write_released_layout(out_dir: Path, config, produce, max_shard_size: int, packed=None, progress=None) -> list:
    """Write config.json (with mxfp4 quantization_config) and the weights in gpt-oss' released layout.

    `produce(name)` gives each parameter in transformers' layout (any float dtype); `packed(name, shape)`, when
    given, gives an expert parameter's (blocks, scales) directly instead of quantizing `produce(name)`.
    Parameter names and shapes come from the architecture built on the meta device.
    """
    import json

    import torch
    from transformers import GptOssForCausalLM

    from toolkit import checkpoint
    from toolkit import mxfp4 as fp4

    with torch.device("meta"):
        skeleton = GptOssForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    entries: list = []
    for name, shape in shapes.items():
        if expert_param(name):
            experts, cols, rows = shape  # [E, in, out] -> stored over [E, out, in/32, 16]
            blocks, scales = fp4.packed_names(name)
            entries += [checkpoint.Entry(blocks, "U8", (experts, rows, cols // fp4.BLOCK, fp4.BLOCK // 2)),
                        checkpoint.Entry(scales, "U8", (experts, rows, cols // fp4.BLOCK))]
        else:
            entries.append(checkpoint.Entry(name, "BF16", shape))
    cache: dict = {}

    def tensor(entry):
        base = fp4.param_name_of(entry.name)
        if base is None:
            return produce(entry.name).to(torch.bfloat16)
        if base not in cache:
            cache.clear()
            cache[base] = packed(base, shapes[base]) if packed else fp4.quantize_param(produce(base))
        return cache[base][0 if entry.name.endswith(fp4.SUFFIXES[0]) else 1]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = checkpoint.write_shards(out_dir, entries, tensor, max_shard_bytes=max_shard_size, progress=progress)
    data = config.to_dict()
    data["quantization_config"] = fp4.quantization_config()
    data["architectures"] = data.get("architectures") or ["GptOssForCausalLM"]  # llama.cpp's converter needs it
    data["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files


def gpt_oss_20b_config(tokenizer=None):
    """openai/gpt-oss-20b's architecture (GptOssConfig() defaults are the 120b's: 36 layers, 128 experts)."""
    from transformers import GptOssConfig

    layers = 24
    ids = {}
    if tokenizer is not None:
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": [tokenizer.convert_tokens_to_ids("<|return|>"),
                                tokenizer.convert_tokens_to_ids("<|call|>")]}
    return GptOssConfig(
        num_hidden_layers=layers, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
        intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8, vocab_size=201088,
        sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)], **ids,
    )


INITS = ("scaled", "uniform")


def build_gpt_oss_20b(out_dir: Path, seed: int = 0, max_shard_size: int = 4_000_000_000,
                      tokenizer: Path | None = None, config=None, init: str = "scaled") -> Path:
    """A random gpt-oss-20b in the released MXFP4 layout (~13 GB) with the real tokenizer, tensor by tensor.

    Cost (speed, memory) depends on shapes, not values: this stands in for the released weights where they
    cannot be downloaded. Expert blocks are random FP4 codes.
    `init`: "scaled" (default) keeps the residual stream in charge, as in a trained model: embeddings ~N(0, 1),
    the residual branches' output projections (`o_proj`, experts' `down_proj`) GPT-2's N(0, 0.02 / sqrt(2 * layers))
    (FP4 scales 2**-11..2**-9), other dense weights ~N(0, 0.02), gate_up scales 2**-8..2**-6. Logits then move
    smoothly with the weights and activations, so logit checks (merge, export) mean something.
    "uniform": every dense weight ~N(0, 0.02), every FP4 scale 2**-8..2**-6: each layer rewrites the residual
    stream, and the model is chaotic (bf16 instead of float32 activations move its logits by half their range).
    `tokenizer`: a saved o200k_harmony tokenizer folder to copy (default: build it, which needs the `tokens` extra).
    `config`: another GptOssConfig (tests write a small one the same way).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, not {init!r}")
    import hashlib
    import math

    import torch
    from tqdm import tqdm

    from toolkit.tokenizer import build_hf_tokenizer

    out_dir = Path(out_dir)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        tok.save_pretrained(out_dir)
    else:
        tok = build_hf_tokenizer(out_dir)
    config = config or gpt_oss_20b_config(tok)

    def generator(name: str):
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    scaled = init == "scaled"
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)

    def std(name: str) -> float:
        if scaled and name == "model.embed_tokens.weight":
            return 1.0
        if scaled and name.endswith("o_proj.weight"):
            return residual_std
        return 0.02

    def produce(name: str):
        shape = shapes[name]
        if name.endswith(("norm.weight", "layernorm.weight")):
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=generator(name)) * std(name)).to(torch.bfloat16)

    def packed(name: str, shape):
        experts, cols, rows = shape
        gen = generator(name)
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
        low = 116 if scaled and "down_proj" in name else 119  # 2**(e - 127): FP4 codes' RMS ~2.9 times the scale
        scales = torch.randint(low, low + 3, (experts, rows, cols // 32), generator=gen, dtype=torch.uint8)
        return blocks, scales

    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in GptOssForCausalLM(config).state_dict().items()}
    bar = tqdm(total=len(shapes), desc="gpt-oss-20b (random)", unit="tensor")
    write_released_layout(out_dir, config, produce, max_shard_size, packed=packed,
                          progress=lambda entry: bar.update(0 if entry.name.endswith("_scales") else 1))
    bar.close()
    from transformers import GenerationConfig

    GenerationConfig(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=config.eos_token_id).save_pretrained(out_dir)
    return out_dir
