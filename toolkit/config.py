"""Stage configuration: one frozen dataclass per stage, filled from defaults, a TOML preset or file,
then repeated `--set section.key=value` overrides. Unknown keys and bad values are collected and
reported together in one ConfigError.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from toolkit.errors import ConfigError
from toolkit.glossary import DEFAULT_HINT_TEMPLATE

log = logging.getLogger(__name__)
EVAL_BACKENDS = ("transformers", "llama-cpp", "ollama")
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"  # Ollama's own default; $OLLAMA_HOST replaces it
DTYPES = ("auto", "bfloat16", "float16", "float32")


def ollama_host(host: str | None = None) -> str:
    """The Ollama server: `host`, else $OLLAMA_HOST, else Ollama's default."""
    return host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST

def _help(text: str, default: Any = dataclasses.MISSING, *, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    """A dataclass field whose help text (and `choices`, its only allowed values) becomes --help text."""
    metadata = {"help": text, **({"choices": tuple(choices)} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def choice_problems(cfg: Any) -> list[str]:
    """`section.key: expected a, b or c, found 'x'` for each field of `cfg` whose value is not one of its choices."""
    out = []
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            out.append(f"{cfg.section}.{f.name}: expected {_one_of(choices)}, found {value!r}")
    return out


@dataclass(frozen=True)
class PrepConfig:
    """`toolkit prep`: TSV/JSONL pairs -> Harmony chat examples."""

    section: ClassVar[str] = "prep"

    source_column: str = _help("TSV column holding the source sentence.", "zh")
    target_column: str = _help("TSV column holding the target sentence.", "nan")
    reasoning_column: str | None = _help("Optional TSV column with a reasoning text for the analysis channel.", None)
    source_name: str = _help("Language name of the source column, as written in the prompt.",
                             "Mandarin Chinese (Traditional)")
    target_name: str = _help("Language name of the target column, as written in the prompt.",
                             "Taiwanese Hokkien (Han characters)")
    direction: str = _help("forward (source->target), reverse, or both.", "forward",
                           choices=("forward", "reverse", "both"))
    chat_format: str = _help("The chat format the examples are written for: harmony (gpt-oss; the system message "
                             "starts with the option `reasoning language: X`) or template (a chat template without "
                             "a reasoning channel, e.g. Gemma's: the instruction alone, no reasoning line).",
                             "harmony", choices=("harmony", "template"))
    reasoning_language: str = _help("Value of the system option `reasoning language: X` (chat_format harmony).",
                                    "English")
    reasoning_effort: str = _help("Harmony reasoning effort.", "low", choices=("low", "medium", "high"))
    instruction: str = _help(
        "Developer instruction; {src} and {tgt} are replaced by the language names.",
        "Translate the user's text from {src} into {tgt}. Reply with the translation only.",
    )
    dev_fraction: float = _help("Share of pairs held out as the dev split (ignored with dev_file).", 0.05)
    dev_file: str | None = _help("Explicit dev TSV/JSONL instead of a random split.", None)
    seed: int = _help("Seed of the dev split.", 20261125)
    max_length: int = _help("Longest allowed source or target (tokens, or characters without a tokenizer).", 256)
    length_unit: str = _help("tokens (the gpt-oss tokenizer, built offline), chars, or auto (tokens when the "
                             "tokenizer can be built, else chars).", "auto", choices=("tokens", "chars", "auto"))
    dedupe: bool = _help("Drop repeated (source, target) pairs.", True)
    join_pairs: int = _help("Also write training examples that join 2..N consecutive training pairs into one "
                            "(each sentence unchanged), so a model trained on short pairs also sees long inputs. "
                            "1 = off. Dev examples are never joined.", 1)
    join_separator: str = _help('What goes between joined sentences: "auto" (nothing after CJK or full-width '
                                'punctuation, else a space) or the literal text.', "auto")
    skip_bad_lines: bool = _help("Count and skip malformed lines instead of stopping at the first.", False)
    date: str = _help("Current date written in the Harmony system message (fixed for reproducibility).",
                      "2025-06-28")
    glossary: list[str] = _help("Term lexicons (TSV/CSV with the source and target columns, or the iTaigi / MOE "
                                "files as they are): the entries attested in a pair (term in the source, a form "
                                "in the target) go into its analysis and hints (CLI: --glossary, repeatable).", [])
    glossary_max_terms: int = _help("Most attested terms written into one example's analysis (longest first).", 4)
    glossary_analysis_share: float = _help("Share of the examples with attested terms that get them as an analysis "
                                           "(Harmony: the analysis channel; other chat formats: a <think> block "
                                           "before the answer).", 1.0)
    glossary_hint_share: float = _help("Share of examples whose system message carries a glossary hint: the "
                                       "attested entries plus up to glossary_hint_distractors unattested ones "
                                       "found in the source, as eval/serve --glossary show them.", 0.0)
    glossary_hint_distractors: int = _help("Most unattested entries (term in the source, no form in the target) "
                                           "added to a training hint, so the model learns to weigh a hint.", 2)
    glossary_hint_max_terms: int = _help("Most entries in one hint, in training and at inference.", 8)
    analysis_template: str | None = _help("Analysis text with {terms} (e.g. 'Words that change: {terms}.'); "
                                          "default: the one of the reasoning language (English, Mandarin).", None)
    hint_template: str = _help("Hint appended to the system message, with {terms}.", DEFAULT_HINT_TEMPLATE)

    def problems(self) -> list[str]:
        out = choice_problems(self)
        if not 0.0 <= self.dev_fraction < 1.0:
            out.append(f"prep.dev_fraction: expected 0 <= x < 1, found {self.dev_fraction}")
        if self.max_length <= 0:
            out.append(f"prep.max_length: expected a positive number, found {self.max_length}")
        if self.source_column == self.target_column:
            out.append("prep.source_column and prep.target_column must differ")
        if self.join_pairs < 1:
            out.append(f"prep.join_pairs: expected 1 (off) or more, found {self.join_pairs}")
        for name in ("glossary_analysis_share", "glossary_hint_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append(f"prep.{name}: expected a share, 0 <= x <= 1, found {getattr(self, name)}")
        for name in ("glossary_max_terms", "glossary_hint_max_terms"):
            if getattr(self, name) < 1:
                out.append(f"prep.{name}: expected 1 or more, found {getattr(self, name)}")
        if self.glossary_hint_distractors < 0:
            out.append(f"prep.glossary_hint_distractors: expected 0 or more, found {self.glossary_hint_distractors}")
        for name in ("analysis_template", "hint_template"):
            value = getattr(self, name)
            if value is not None and "{terms}" not in value:
                out.append(f"prep.{name}: expected a text holding {{terms}}, found {value!r}")
        if self.glossary and self.glossary_analysis_share and self.analysis_template is None:
            from toolkit.glossary import ANALYSIS_TEMPLATES, analysis_template

            if analysis_template(self.reasoning_language) is None:
                out.append(f"prep.analysis_template: no shipped analysis template for reasoning language "
                           f"{self.reasoning_language!r} (shipped: {', '.join(ANALYSIS_TEMPLATES)}); set one, e.g. "
                           "--set 'prep.analysis_template=\"Words that change: {terms}.\"'")
        return out


# --- train config (owned by the train stage; give it `section: ClassVar[str] = "NAME"`) ---
_LAYERS_HELP = 'which decoder layers get it: "all" or a list of indices, e.g. [7, 15, 23]'


EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm")
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead")  # train.compile_layers


@dataclass(frozen=True)
class TrainConfig:
    """`toolkit train`: LoRA / QLoRA with TRL's SFTTrainer on the prep folder's chat examples."""

    section: ClassVar[str] = "train"

    base_model: str = _help("Base model: a local folder or a Hugging Face Hub id.", "openai/gpt-oss-20b")
    mode: str = _help("lora (16-bit base weights) or qlora (bitsandbytes 4-bit NF4 base, needs CUDA).", "lora",
                      choices=("lora", "qlora"))
    dtype: str = _help("Weights/compute dtype (float32: the CPU demo).", "bfloat16",
                       choices=("bfloat16", "float16", "float32"))
    device: str = _help("auto (CUDA when present), cuda or cpu.", "auto", choices=("auto", "cuda", "cpu"))
    attn_implementation: str = _help("Attention kernel passed to transformers (gpt-oss: eager or flex_attention; "
                                     "a kernels-hub id works too).", "eager")
    experts_implementation: str = _help("MoE experts kernel passed to transformers: eager (a Python loop over "
                                        "experts, the public recipe), grouped_mm (torch grouped GEMMs), batched_mm, "
                                        "or auto (transformers' default).", "auto", choices=EXPERTS_IMPLEMENTATIONS)
    liger_kernel: bool = _help("Liger's Triton RMSNorm and RoPE kernels (TRL's chunked LM head already keeps the "
                               "vocabulary logits out of memory). Needs CUDA and liger-kernel.", False)
    lowrank_experts: bool = _help("Apply the expert LoRA as two thin grouped GEMMs on the routed tokens "
                                  "(x A) B instead of peft's full-size W + BA and its dense gradient "
                                  "(toolkit.expert_lora). Needs experts_implementation = grouped_mm.", False)
    fused_experts: bool = _help("gpt-oss: the MoE element-wise work between the expert GEMMs (bias gathers, the "
                                "clamped SwiGLU, routing weights, the token-order sum) as two torch.compile'd "
                                "functions (toolkit.fused_experts). Needs experts_implementation = grouped_mm.", False)
    checkpoint_every_n_layers: int = _help("With gradient_checkpointing: recompute only every n-th decoder layer "
                                           "(1 = all; larger gives memory back for speed).", 1)
    redequantize_experts: bool = _help("qlora: a decoder layer that is not recomputed (checkpoint_every_n_layers > 1) "
                                       "dequantizes its 4-bit experts again in backward instead of keeping the "
                                       "16-bit copy (gpt-oss-20b: 1.6 GB a layer) from forward (toolkit.redequantize). "
                                       "Needs experts_implementation = grouped_mm.", False)
    redequantize_recomputed: bool = _help("With redequantize_experts: recomputed layers too. Their recompute then "
                                          "keeps no 16-bit experts for backward either, which dequantizes them "
                                          "once more per layer and step. Measured on the qlora preset (H200, "
                                          "2026-12-03): the same peak, 8 % slower; kept for other layouts.", False)
    compile_layers: str = _help("torch.compile each decoder layer in place (toolkit.regional_compile): off, default, "
                                "max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs). The first steps "
                                "compile (minutes); fewer kernel launches after.", "off")
    offload_embeddings: bool = _help("Keep the frozen input embedding table in CPU memory (gpt-oss: 1.1 GiB); each "
                                     "step copies its rows to the GPU. For qlora on small GPUs.", False)
    activation_offloading: bool = _help("TRL's activation offloading: tensors saved for backward wait in pinned CPU "
                                        "memory (copies overlapped on a side stream). Less GPU memory for "
                                        "larger micro-batches; needs CUDA.", False)
    chat_format: str = _help("auto (Harmony for gpt-oss, else the tokenizer's chat template), harmony or template.",
                             "auto", choices=("auto", "harmony", "template"))
    chat_template: str | None = _help("A .jinja chat template for a tokenizer that has none.", None)
    lora_r: int = _help("LoRA rank.", 8)
    lora_alpha: int = _help("LoRA alpha (scale = alpha / r).", 16)
    lora_dropout: float = _help("Dropout on the LoRA input.", 0.0)
    lora_modules: list[str] = _help("nn.Linear names that get LoRA (attention projections).",
                                    ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_experts: list[str] = _help("3-D MoE expert parameters that get LoRA (peft target_parameters); ignored "
                                    "for models without them. [] = attention only.",
                                    ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    attention_layers: list[int] | str = _help(f"Attention LoRA: {_LAYERS_HELP}.", "all")
    expert_layers: list[int] | str = _help(f"Expert LoRA: {_LAYERS_HELP}.", "all")
    max_length: int = _help("Longest training sequence in tokens (longer ones are cut at the end).", 1024)
    batch_size: int = _help("Micro-batch per device.", 4)
    grad_accum: int = _help("Gradient accumulation steps.", 4)
    learning_rate: float = _help("Peak learning rate.", 2e-4)
    lr_scheduler: str = _help("transformers scheduler name (cosine_with_min_lr, cosine, linear, constant ...).",
                              "cosine_with_min_lr")
    min_lr_rate: float = _help("Final LR as a share of the peak (cosine_with_min_lr only).", 0.1)
    warmup_ratio: float = _help("Share of steps spent warming up.", 0.03)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm.", 1.0)
    optimizer: str = _help("transformers optimizer name (adamw_torch, adamw_torch_fused, paged_adamw_8bit ...).",
                           "adamw_torch")
    epochs: float = _help("Passes over the training split (ignored when max_steps > 0).", 1.0)
    max_steps: int = _help("Stop after this many optimizer steps (0: use epochs).", 0)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass (less memory, ~30% slower).",
                                         True)
    packing: bool = _help("Pack examples into max_length blocks (TRL best-fit decreasing, padding-free; needs a "
                          "FlashAttention attn_implementation).", False)
    padding_free: bool = _help("Concatenate each batch into one row with per-example positions, no padding "
                               "(needs a FlashAttention attn_implementation; max_length is then not enforced, "
                               "prep already bounds lengths).", False)
    eval_steps: int = _help("Dev-split eval loss every N steps (0: only at the end).", 50)
    max_eval_examples: int = _help("Dev examples used for eval loss (0: all).", 200)
    max_train_examples: int = _help("Use only the first N training examples (0: all).", 0)
    save_steps: int = _help("Write a resumable checkpoint every N steps (0: none).", 100)
    save_total_limit: int = _help("Checkpoints kept on disk while training.", 2)
    keep_checkpoints: bool = _help("Keep the checkpoints/ folder after a finished run.", False)
    logging_steps: int = _help("Log train loss every N steps (metrics.jsonl, TensorBoard).", 10)
    report_to: str = _help("tensorboard (local, in OUT/tensorboard) or none.", "tensorboard",
                           choices=("tensorboard", "none"))
    seed: int = _help("Seed of LoRA init, data order and dropout.", 42)
    gpu_memory_gib: float = _help("Cap this process's GPU memory at N GiB (0: no cap), e.g. 24 to prove on a large "
                                  "card that a run fits a 24 GB one: past the cap it fails with out-of-memory.", 0.0)

    def problems(self) -> list[str]:
        out = choice_problems(self)
        positive = ("lora_r", "lora_alpha", "max_length", "batch_size", "grad_accum", "logging_steps",
                    "checkpoint_every_n_layers")
        out += [f"train.{k}: expected a positive number, found {getattr(self, k)}"
                for k in positive if getattr(self, k) <= 0]
        non_negative = ("max_steps", "eval_steps", "save_steps", "save_total_limit", "max_eval_examples",
                        "max_train_examples", "weight_decay", "gpu_memory_gib")
        out += [f"train.{k}: expected 0 or more, found {getattr(self, k)}" for k in non_negative if getattr(self, k) < 0]
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"train.lora_dropout: expected 0 <= x < 1, found {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:  # transformers reads warmup_steps >= 1 as a number of steps
            out.append(f"train.warmup_ratio: expected a share of the steps, 0 <= x < 1, found {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_rate <= 1.0:
            out.append(f"train.min_lr_rate: expected a share of the peak, 0 <= x <= 1, found {self.min_lr_rate}")
        if self.max_grad_norm < 0:
            out.append(f"train.max_grad_norm: expected 0 (no clipping) or more, found {self.max_grad_norm}")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate: expected a positive number, found {self.learning_rate}")
        if self.max_steps == 0 and self.epochs <= 0:
            out.append(f"train.epochs: expected a positive number (or set max_steps), found {self.epochs}")
        for key in ("attention_layers", "expert_layers"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "all" or isinstance(value, list) and any(i < 0 for i in value):
                out.append(f'train.{key}: expected "all" or a list of layer indices >= 0, found {value!r}')
        if not self.lora_modules and not self.lora_experts:
            out.append("train.lora_modules and train.lora_experts are both empty: nothing to train")
        grouped_only = {"lowrank_experts": self.lowrank_experts and bool(self.lora_experts),
                        "fused_experts": self.fused_experts, "redequantize_experts": self.redequantize_experts}
        for key in [k for k, on in grouped_only.items() if on and self.experts_implementation != "grouped_mm"]:
            out.append(f"train.{key}: needs experts_implementation = grouped_mm, found "
                       f"{self.experts_implementation!r}")
        per_row = 4 if self.dtype == "float32" else 8  # grouped GEMM rows (r values) must span 16 bytes
        if self.lowrank_experts and self.lora_experts and self.lora_r % per_row:
            out.append(f"train.lowrank_experts: grouped GEMMs need lora_r a multiple of {per_row} in {self.dtype}, "
                       f"found {self.lora_r}; change lora_r or set lowrank_experts=false")
        if self.redequantize_recomputed and not self.redequantize_experts:
            out.append("train.redequantize_recomputed extends train.redequantize_experts: set both, or neither")
        if self.redequantize_experts and self.compile_layers != "off":
            # measured on the CPU: compiled, the weights are kept for backward again and every layer recompiles
            out.append("train.redequantize_experts works uncompiled only: set train.compile_layers=off or "
                       "train.redequantize_experts=false")
        if self.compile_layers not in COMPILE_MODES:
            out.append(f"train.compile_layers: expected one of {', '.join(COMPILE_MODES)}, "
                       f"found {self.compile_layers!r}")
        if self.activation_offloading and self.attn_implementation == "flex_attention" and not (
                self.gradient_checkpointing and self.checkpoint_every_n_layers == 1):
            # measured on the H200 (2026-12-03): flex attention's compiled backward refuses the tensors that come
            # back from the CPU (other strides); a layer that is recomputed saves none of them
            out.append("train.activation_offloading with flex attention needs every layer recomputed: set "
                       "train.gradient_checkpointing=true and train.checkpoint_every_n_layers=1, or "
                       "train.activation_offloading=false")
        if self.activation_offloading and self.device == "cpu":
            out.append("train.activation_offloading: moves saved tensors from a GPU to the CPU; set it to false on "
                       "the CPU")
        if self.liger_kernel and self.device == "cpu":
            out.append("train.liger_kernel: Liger's kernels are Triton (CUDA); set it to false on the CPU")
        packed_ok = "flash" in self.attn_implementation or self.attn_implementation == "flex_attention"
        if (self.packing or self.padding_free) and not packed_ok:
            # with eager attention a packed example sees its neighbours (its logits change by O(1)); flex
            # attention gets per-example masks from toolkit.packing
            out.append(f"train.packing / train.padding_free need a FlashAttention kernel that reads the per-example "
                       f"positions (e.g. attn_implementation = \"kernels-community/vllm-flash-attn3\") or "
                       f"flex_attention, found {self.attn_implementation!r}")
        if self.gpu_memory_gib and self.device == "cpu":
            out.append("train.gpu_memory_gib: a GPU memory cap on the CPU; set it to 0")
        if self.mode == "qlora" and self.device == "cpu":
            out.append("train.mode qlora needs CUDA (bitsandbytes 4-bit); use mode lora on the CPU")
        if self.mode == "qlora" and self.dtype == "float32":
            out.append("train.dtype: qlora computes in bfloat16 or float16, found float32")
        if self.chat_template and not self.chat_template.endswith((".jinja", ".j2")):
            out.append(f"train.chat_template: expected a .jinja file, found {self.chat_template!r}")
        return out


# --- merge config (owned by the merge stage; give it `section: ClassVar[str] = "NAME"`) ---
@dataclass(frozen=True)
class MergeConfig:
    """`toolkit merge`: fold the LoRA adapter into the base weights (safetensors)."""

    section: ClassVar[str] = "merge"

    base_model: str | None = _help("Base model folder or hub id (default: the one the train manifest names).", None)
    format: str = _help("bf16: every tensor dense in merge.dtype; mxfp4: MoE expert tensors re-quantized to MXFP4 "
                        "in gpt-oss' released layout (~13 GB for gpt-oss-20b), the rest in merge.dtype.", "bf16",
                        choices=("bf16", "mxfp4"))
    requantize_adapted: bool = _help("With format mxfp4: also re-quantize the expert stacks the adapter changed (the "
                                     "released layout exactly). Off: those stay dense in merge.dtype (+1.4 GB per "
                                     "gpt-oss-20b layer), since a LoRA delta smaller than half an FP4 step rounds "
                                     "back to the base weight.", False)
    dtype: str = _help("Dense tensors: auto (the base's own dtype, bfloat16 for gpt-oss' MXFP4 release), bfloat16, "
                       "float16 or float32.", "auto", choices=DTYPES)
    parity_text: str = _help("Source sentence of the Harmony prompt used to check the merge.",
                             "今天天氣真好，我們去公園散步。")
    parity_atol: float | None = _help("Largest allowed |merged - expected| next-token logit, expected being "
                                      "base+adapter with the changed tensors rounded as stored (default 1e-3).", None)
    parity_rtol: float | None = _help("...or up to this share of the adapter's own effect on that logit, whichever is "
                                      "larger (default 0.01).", None)
    max_shard_size: str = _help("Largest safetensors shard (written a tensor at a time: costs no memory).", "5GB")

    def problems(self) -> list[str]:
        out = choice_problems(self)
        if self.parity_atol is not None and self.parity_atol <= 0:
            out.append(f"merge.parity_atol: expected a positive number, found {self.parity_atol}")
        if self.parity_rtol is not None and not 0 <= self.parity_rtol < 1:
            out.append(f"merge.parity_rtol: expected a share in [0, 1), found {self.parity_rtol}")
        return out



# --- export config (owned by the export stage; give it `section: ClassVar[str] = "NAME"`) ---
GGUF_OUTTYPES = ("f32", "f16", "bf16")
GGUF_QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "MXFP4_MOE")


@dataclass(frozen=True)
class ExportConfig:
    """`toolkit export`: GGUF through llama.cpp's converter, quantized files, Ollama Modelfile."""

    section: ClassVar[str] = "export"

    name: str | None = _help("Model name: GGUF file names NAME-TYPE.gguf and the Ollama model (default: the run "
                             "name, else model).", None)
    outtype: str = _help("Type of the converted GGUF: f32, f16 or bf16. A merge in the MXFP4 layout (merge --format "
                         "mxfp4) is converted to an MXFP4_MOE file instead: experts MXFP4 as merged, the rest outtype.",
                         "f16", choices=GGUF_OUTTYPES)
    quants: list[str] = _help(f"Quantized files made from it ({', '.join(GGUF_QUANTS)}); [] for none. MXFP4_MOE of "
                              "an MXFP4 merge is the converted file itself.", ["Q8_0", "Q4_K_M"])
    pre_tokenizer: str | None = _help("llama.cpp pre-tokenizer name for a tokenizer whose hash the converter does "
                                      "not know (e.g. gpt-4o for gpt-oss-style BPE). Never applied silently.", None)
    llama_cpp: str | None = _help("Folder with llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ "
                                  "(default: the pinned copy `python -m toolkit.llamacpp fetch` unpacks).", None)
    verify: bool = _help("Load every GGUF with llama-cpp-python and compare its logits with the merged model.", True)
    verify_texts: list[str] = _help("Source sentences of the Harmony prompts used to verify the files.", [
        "今天天氣真好，我們去公園散步。", "你吃飯了嗎？", "這本書是我昨天在台北買的。", "請問火車站要怎麼走？",
    ])
    float_rtol: float = _help("Largest allowed max|gguf - hf| / max|hf| of next-token logits for f32/f16/bf16.",
                              0.02)
    min_top1: float = _help("Quantized files (and MXFP4_MOE, whose experts llama.cpp multiplies by 8-bit "
                            "activations): least share of prompt positions whose top-1 token matches the "
                            "merged model. A gross-error check (a broken file scores near 0); the tiny random "
                            "model's flat logits give 0.78-0.98, so keep it well below that.", 0.7)
    n_threads: int = _help("CPU threads for quantization and verification (0 = all).", 0)
    n_gpu_layers: int = _help("Layers llama-cpp-python offloads to the GPU while verifying (-1 = all, 0 = none: "
                              "the CPU alone; a CPU-only build ignores it).", -1)
    llama_process: str = _help("Where llama.cpp quantizes and verifies: `child` (a fresh process per step, which "
                               "never holds torch: a CUDA build of llama-cpp-python segfaulted beside it) or `same` "
                               "(the export's own process).", "child", choices=("child", "same"))
    ollama_gguf: str | None = _help("Which file the Modelfile uses: the outtype or one of the quants (default: "
                                    "Q4_K_M when made, else the first quant, else the outtype).", None)
    modelfile_template: str = _help("Template in modelfiles/ (name without .Modelfile) or a file path.",
                                    "gpt-oss-harmony")
    temperature: float = _help("Modelfile PARAMETER temperature (0 = greedy, best for translation).", 0.0)
    num_ctx: int = _help("Modelfile PARAMETER num_ctx (context window).", 4096)
    num_predict: int = _help("Modelfile PARAMETER num_predict (longest reply, reasoning included).", 1024)

    def ollama_file_type(self) -> str:
        if self.ollama_gguf:
            return self.ollama_gguf
        return "Q4_K_M" if "Q4_K_M" in self.quants else (self.quants[0] if self.quants else self.outtype)

    def problems(self) -> list[str]:
        out = choice_problems(self)
        bad = [q for q in self.quants if q not in GGUF_QUANTS]
        if bad:
            out.append(f"export.quants: unknown {bad} (known: {', '.join(GGUF_QUANTS)})")
        if self.ollama_gguf is not None and self.ollama_gguf not in (self.outtype, *self.quants):
            out.append(f"export.ollama_gguf: {self.ollama_gguf!r} is not made by this export "
                       f"(outtype {self.outtype}, quants {list(self.quants)})")
        if not self.verify_texts:
            out.append("export.verify_texts: give at least one sentence")
        if len(set(self.quants)) != len(self.quants) or self.outtype in self.quants:
            out.append(f"export.quants: each type once, and not the outtype, found {list(self.quants)}")
        if not 0.0 <= self.min_top1 <= 1.0:
            out.append(f"export.min_top1: expected 0..1, found {self.min_top1}")
        if self.float_rtol <= 0:
            out.append(f"export.float_rtol: expected a positive number, found {self.float_rtol}")
        if self.temperature < 0:
            out.append(f"export.temperature: expected 0 (greedy) or more, found {self.temperature}")
        if self.num_ctx <= 0:
            out.append(f"export.num_ctx: expected a positive number, found {self.num_ctx}")
        return out



# --- decoding fields shared by eval and serve (toolkit.decoding) ---
@dataclass(frozen=True)
class DecodingFields:
    """Per-sentence token limits and the repetition stop, the same in `toolkit eval` and `toolkit serve`."""

    base_tokens: int = _help("Per-sentence token limit = base_tokens + tokens_per_source_token x the source's tokens "
                             "(+ analysis_tokens for a model that writes an analysis first), at most max_new_tokens.",
                             24)
    tokens_per_source_token: float = _help("See base_tokens (0 = no per-sentence limit: every sentence may run to "
                                           "max_new_tokens).", 2.0)
    analysis_tokens: int = _help("Extra room for an analysis before the answer: a Harmony model's analysis channel "
                                 "(gpt-oss), or the <think> block of a chat-template model whose prep wrote "
                                 "analyses; other models get none.", 192)
    repeat_max_ngram: int = _help("Stop an output that ends in a loop of one n-gram of up to N tokens repeated, "
                                  "and keep one copy (0 = off).", 16)
    repeat_min_copies: int = _help("A loop is at least this many copies of its n-gram...", 3)
    repeat_min_tokens: int = _help("...spanning at least this many tokens (so 1,000,000 or 哈哈哈 is no loop).", 16)

    def decoding_problems(self, section: str) -> list[str]:
        out = [f"{section}.{k}: expected 0 or more, found {getattr(self, k)}"
               for k in ("base_tokens", "tokens_per_source_token", "analysis_tokens", "repeat_max_ngram",
                         "repeat_min_tokens") if getattr(self, k) < 0]
        if self.repeat_min_copies < 2:
            out.append(f"{section}.repeat_min_copies: expected 2 or more, found {self.repeat_min_copies}")
        return out


# --- eval and serve configs (owned by the eval and serve stages; give each `section: ClassVar[str] = "NAME"`) ---


@dataclass(frozen=True)
class BackendConfig(DecodingFields):
    """How `toolkit eval` and `toolkit serve` run a model: its fields are keys of [eval] and of [serve] alike."""

    backend: str | None = _help("transformers (model/merge/train folder or hub id), llama-cpp (GGUF file) or ollama "
                                "(model name) (default: llama-cpp for a GGUF or an export folder, else "
                                "transformers).", None, choices=EVAL_BACKENDS)
    ollama_host: str | None = _help(f"Ollama server URL (default: $OLLAMA_HOST, else {DEFAULT_OLLAMA_HOST}).", None)
    max_new_tokens: int = _help("Most tokens any text may generate (analysis + final); each text's own limit comes "
                                "from its length (base_tokens).", 256)
    n_ctx: int = _help("llama-cpp context window.", 2048)
    n_gpu_layers: int = _help("llama-cpp layers offloaded to the GPU (-1 = all).", 0)
    n_threads: int | None = _help("llama-cpp CPU threads (default: llama-cpp-python's, half the cores).", None)
    n_batch: int = _help("llama-cpp prompt tokens evaluated per batch.", 512)
    device: str = _help("transformers device: auto (cuda when available), cuda, cuda:N or cpu.", "auto")
    dtype: str = _help("transformers weights dtype.", "auto", choices=DTYPES)
    copy_bias: float = _help("Greedy decoding with this bonus added to the logit of every token of the source "
                             "sentence (0 = off; transformers and llama-cpp). Between close languages it keeps names, "
                             "numbers and shared words that a small model would drop or paraphrase.", 0.0)

    def backend_problems(self) -> list[str]:
        section = getattr(self, "section", "backend")
        out = choice_problems(self)
        for name in ("max_new_tokens", "n_ctx", "n_batch"):
            if getattr(self, name) <= 0:
                out.append(f"{section}.{name}: expected a positive number, found {getattr(self, name)}")
        if not 0.0 <= self.copy_bias < 100.0:
            out.append(f"{section}.copy_bias: expected 0 (off) <= x < 100, found {self.copy_bias}")
        elif self.copy_bias and self.backend == "ollama":
            out.append(f"{section}.copy_bias: Ollama's API takes no logit hook; use the llama-cpp backend on the "
                       "GGUF or set copy_bias=0")
        return out + self.decoding_problems(section)

    def translator_options(self, backend: str) -> dict[str, Any]:
        """The `backends.load_translator` options of `backend` from these settings."""
        from toolkit.decoding import from_config

        decoding = from_config(self)
        if backend == "transformers":
            return {"device": self.device, "dtype": self.dtype, "copy_bias": self.copy_bias, "decoding": decoding,
                    **({"batch_size": self.batch_size} if hasattr(self, "batch_size") else {})}
        if backend == "llama-cpp":
            return {"n_ctx": self.n_ctx, "n_gpu_layers": self.n_gpu_layers, "n_threads": self.n_threads,
                    "n_batch": self.n_batch, "copy_bias": self.copy_bias, "decoding": decoding}
        if self.copy_bias:
            raise ConfigError(f"copy_bias {self.copy_bias}: Ollama's API takes no logit hook; use the llama-cpp "
                              "backend on the GGUF or set copy_bias=0.")
        return {"host": self.ollama_host, "decoding": decoding}


@dataclass(frozen=True)
class EvalConfig(BackendConfig):
    """`toolkit eval`: translate a test TSV through a backend and score it with sacrebleu."""

    section: ClassVar[str] = "eval"

    model: str | None = _help("Model folder or hub id, train folder, GGUF file or Ollama model name (default: the "
                              "run's latest export GGUF > merge > train).", None)
    source_column: str | None = _help("TSV column of the source sentences (default: the model's prep config, "
                                      "else zh).", None)
    target_column: str | None = _help("TSV column of the references (default: the model's prep config, else nan).",
                                      None)
    direction: str = _help("forward (source column -> target column) or reverse.", "forward",
                           choices=("forward", "reverse"))
    limit: int = _help("Evaluate only the first N rows (0 = all).", 0)
    batch_size: int = _help("Sentences per generate call (transformers, which sorts 4 batches at a time by length) "
                            "and per predictions.jsonl flush.", 32)
    n_bootstrap: int = _help("Bootstrap resamples for confidence intervals and the paired test (sacrebleu's; "
                             "1 = none).", 1000)
    glossary: list[str] = _help("Term lexicons (as prep.glossary; CLI: --glossary, repeatable): term accuracy is "
                                "scored, and with glossary_hints the entries found in each source go to the "
                                "model as a hint in its system message.", [])
    glossary_hints: bool = _help("With a glossary: hint the model (off: only score the terms).", True)

    def problems(self) -> list[str]:
        out = self.backend_problems()
        if self.batch_size <= 0:
            out.append(f"eval.batch_size: expected a positive number, found {self.batch_size}")
        if self.limit < 0:
            out.append(f"eval.limit: expected 0 (all) or a positive number, found {self.limit}")
        if self.n_bootstrap < 1:
            out.append(f"eval.n_bootstrap: expected 1 (no intervals) or more, found {self.n_bootstrap}")
        return out


@dataclass(frozen=True)
class ServeConfig(BackendConfig):
    """`toolkit serve`: a FastAPI translation endpoint in front of one backend."""

    section: ClassVar[str] = "serve"

    host: str = _help("Address to bind. Anything but localhost needs the API key (api_key_env).", "127.0.0.1")
    port: int = _help("TCP port (0 picks a free one; the URL is printed).", 8000)
    api_key_env: str = _help("Environment variable holding the API key (clients send X-API-Key or "
                             "Authorization: Bearer). Unset: no key, localhost only.", "TOOLKIT_API_KEY")
    max_chars: int = _help("Longest text accepted, in characters (longer: 413).", 2000)
    max_texts: int = _help("Most texts in one request (more: 413).", 32)
    concurrency: int = _help("Backend calls running at once (worker threads). llama.cpp and one transformers "
                             "model are not thread-safe: keep 1 unless the backend is a server (Ollama).", 1)
    queue_size: int = _help("Requests waiting for a worker beyond `concurrency`; when full: 429.", 16)
    batch_requests: bool = _help("transformers backend: the requests that wait while a call runs are decoded "
                                 "together as its next call (off: one call per request, `concurrency` at a time).",
                                 True)
    batch_window_ms: float = _help("With batch_requests: how long a request that finds no call running waits for "
                                   "others to join it (0: it starts at once, alone).", 0.0)
    batch_max_texts: int = _help("With batch_requests: most texts in one joint call, decoded as one batch.", 128)
    request_timeout_s: float = _help("Seconds a request may wait and run before a 504.", 120.0)
    source_codes: list[str] = _help("LibreTranslate language codes of the model's source language; the first is the "
                                    "one GET /languages lists ([] = the prep column, with zh-Hant beside zh and "
                                    "nan-Hant beside nan).", [])
    target_codes: list[str] = _help("LibreTranslate language codes of the model's target language (as source_codes).",
                                    [])
    glossary: list[str] = _help("Term lexicons (as prep.glossary; CLI: --glossary, repeatable): the entries found in "
                                "a text go to the model as a hint in its system message.", [])
    max_glossary_entries: int = _help("Most entries of a request's own `glossary` field (more: 413).", 64)

    def translator_options(self, backend: str) -> dict[str, Any]:
        options = super().translator_options(backend)
        if backend == "transformers":  # a joint call of waiting requests decodes as one generate call
            options["batch_size"] = self.batch_max_texts
        return options

    def problems(self) -> list[str]:
        out = self.backend_problems()
        for name in ("source_codes", "target_codes"):
            bad = [c for c in getattr(self, name) if not re.fullmatch(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*", c)]
            if bad:
                out.append(f"serve.{name}: expected language codes such as zh or nan-Hant, found {bad[0]!r}")
        shared = {c.lower() for c in self.source_codes} & {c.lower() for c in self.target_codes}
        if shared:
            out.append(f"serve.source_codes and serve.target_codes share {min(shared)!r}: a code names one "
                       "language")
        if not 0 <= self.port <= 65535:
            out.append(f"serve.port: expected 0..65535, found {self.port}")
        for name in ("max_chars", "max_texts", "concurrency", "request_timeout_s", "max_glossary_entries",
                     "batch_max_texts"):
            if getattr(self, name) <= 0:
                out.append(f"serve.{name}: expected a positive number, found {getattr(self, name)}")
        if self.queue_size < 0:
            out.append(f"serve.queue_size: expected 0 or more, found {self.queue_size}")
        if self.batch_window_ms < 0:
            out.append(f"serve.batch_window_ms: expected 0 or more, found {self.batch_window_ms}")
        return out


# Keys renamed since a release: reading the old one is an error that names the new one.
RENAMED = {("eval", "host"): "ollama_host"}


# Every dataclass above with a `section` class attribute is a TOML section.
SECTIONS: dict[str, type] = {
    obj.section: obj for obj in list(globals().values())
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and isinstance(getattr(obj, "section", None), str)
}



def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "nothing"}


def _type_name(hint: Any) -> str:
    """`list[int] | str` -> 'a list of whole numbers or text': what a user can write, not Python's repr."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" (or unset)" if len(args) < len(typing.get_args(hint))
                                                          else "")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return "a list of " + {int: "whole numbers", float: "numbers", str: "texts"}.get(inner, "values")
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _value_problem(name: str, key: str, value: Any, hint: Any) -> str | None:
    if not _type_ok(value, hint):
        return f"{name}.{key}: expected {_type_name(hint)}, found {value!r}"
    if isinstance(value, float) and not math.isfinite(value):  # TOML and --set read nan and inf as numbers
        return f"{name}.{key}: expected a finite number, found {value}"
    return None


def _parse_value(text: str) -> Any:
    """`--set k=v`: v is read as a TOML value (numbers, true/false, ["lists"]) or else as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def preset_path(name: str | Path) -> Path:
    """A shipped preset name (e.g. `tiny-cpu`) or a path to a TOML file (any suffix)."""
    path = Path(name)
    shipped = resources.files("toolkit") / "configs" / f"{name}.toml"
    bare = "/" not in str(name) and "\\" not in str(name)
    bare_preset = bare and not path.suffix and shipped.is_file()  # `tiny-cpu` is the preset, `./tiny-cpu` a file
    if path.is_file() and not bare_preset:
        return path
    if shipped.is_file():
        return Path(str(shipped))
    available = ", ".join(list_presets())
    if path.is_dir():
        raise ConfigError(f"config {name!r}: is a folder. Pass a TOML file, or a preset: {available}.")
    if path.suffix or not bare:
        raise ConfigError(f"config {name!r}: no such file. Check the path, or pass a preset: {available}.")
    raise ConfigError(f"config {name!r}: no such file and no shipped preset of that name. Presets: {available}.")


def list_presets() -> list[str]:
    folder = resources.files("toolkit") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; every way to fail (unreadable, not UTF-8, not TOML) is one ConfigError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}).") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}). Save the file as UTF-8.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}). Fix the file.") from exc


def build(
    section: str, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **cli: Any
) -> Any:
    """Defaults -> preset/file section -> `--set section.key=value` -> explicit CLI values (not None).

    Only `section` is built; other sections of the file are checked for unknown keys and types too, so a
    typo in a shared preset never passes silently. Every layer is checked on its own (a bad `--set` value
    is reported even when a CLI option overrides it), and the value checks of the section run on the
    values that passed the type checks, so all problems of every kind come out in one ConfigError.
    """
    problems: list[str] = []
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if config is not None:
        path = preset_path(config)
        from_file: dict[str, dict[str, Any]] = {}
        for name, values in read_toml(path).items():
            if name not in SECTIONS or not isinstance(values, dict):
                problems.append(f"{path}: unknown section [{name}] (known: {', '.join(sorted(SECTIONS))})")
                continue
            from_file[name] = dict(values)
        layers.append((str(config), from_file))
    from_set: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        name, dot, attr = key.strip().partition(".")
        if not sep or not dot:
            problems.append(f"--set {item!r}: expected section.key=value, e.g. train.lora_r=32")
            continue
        from_set.setdefault(name, {})[attr] = _parse_value(value.strip())
    layers.append(("--set", from_set))
    layers.append(("the command line", {section: {k: v for k, v in cli.items() if v is not None}}))

    data: dict[str, dict[str, Any]] = {}
    rejected: set[tuple[str, str]] = set()
    for origin, layer in layers:
        for name, values in layer.items():
            cls = SECTIONS.get(name)
            if cls is None:
                problems.append(f"unknown section {name!r} (known: {', '.join(sorted(SECTIONS))})")
                continue
            fields = {f.name for f in dataclasses.fields(cls)}
            hints = typing.get_type_hints(cls)
            for key, value in values.items():
                if key not in fields and (name, key) in RENAMED:
                    problems.append(f"{name}.{key}: renamed {name}.{RENAMED[name, key]}; write that instead")
                    continue
                if key not in fields:
                    problems.append(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
                    continue
                problem = _value_problem(name, key, value, hints[key])
                if problem:
                    problems.append(f"{problem} (from {origin})")
                    rejected.add((name, key))
                    continue
                if (origin == "the command line" and key in from_set.get(name, {}) and (name, key) not in rejected
                        and from_set[name][key] != value):
                    log.warning("%s.%s: the command line's %r replaces --set %s.%s=%r", name, key, value, name, key,
                                from_set[name][key])
                data.setdefault(name, {})[key] = value
    cls = SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"unknown section {section!r}")
    hints = typing.get_type_hints(cls)
    values = {k: float(v) if hints[k] is float else v for k, v in data.get(section, {}).items()}
    result = cls(**values)  # rejected values are left at their defaults, so the value checks still run
    if hasattr(result, "problems"):
        bad = [f"{name}.{key}" for name, key in rejected if name == section]
        problems.extend(p for p in result.problems() if not any(re.search(rf"{b}\b", p) for b in bad))
    if problems:
        raise ConfigError(f"{len(problems)} config problem(s): " + "; ".join(problems))
    return result


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def help_text(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
