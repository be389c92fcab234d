"""`toolkit tiny OUT`: a tiny random gpt-oss for tests and the CPU demo, generated offline and deterministically.

The model is the real `GptOssForCausalLM` architecture at toy size (hidden 64, 2 layers, 4 experts top-2,
one sliding and one full attention layer). The tokenizer is a small byte-level BPE trained on the shipped
sample corpus with gpt-oss's own pre-tokenizer pattern, carrying the Harmony special tokens and the Harmony
chat template; `real_tokenizer=True` uses the real `o200k_harmony` tokenizer instead (201,088 rows of
embeddings: about 13M parameters at hidden 32).
"""

from __future__ import annotations

from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "zh-nan-moe-sample" / "sample.tsv"
HARMONY_SPECIALS = [
    "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
    "<|message|>", "<|call|>", "<|endofprompt|>",
]
BPE_VOCAB = 2048


def _training_text(sample: Path) -> list[str]:
    from toolkit.harmony import system_text
    from toolkit.prompt import default_spec

    lines = sample.read_text(encoding="utf-8").splitlines()[1:] if sample.is_file() else []
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


def build_tiny(out_dir: Path, seed: int = 0, real_tokenizer: bool = False) -> Path:
    """Write a tiny random GptOssForCausalLM + tokenizer to `out_dir` (same seed -> same weights)."""
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
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
