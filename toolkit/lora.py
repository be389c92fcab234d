"""Base model loading and LoRA placement for `toolkit train` (and for benchmarks that time its steps).

`load_model(cfg)` = `load_tokenizer` + `load_base` + `attach_lora`. A benchmark can build a random
full-size model from a `GptOssConfig` itself and call `attach_lora(model, cfg)` on it.

LoRA goes on the attention projections (`nn.Linear`, peft `target_modules`) and on the MoE experts,
which gpt-oss stores as 3-D parameters (`mlp.experts.gate_up_proj` [E, H, 2I] and `down_proj`
[E, I, H]); peft reaches those only through `target_parameters`, one low-rank delta per expert.

`qlora` quantizes to bitsandbytes NF4 tensor by tensor on the way from the checkpoint to the GPU
(toolkit.loader: a meta-device model, gpt-oss' MXFP4 experts dequantized one tensor at a time, so host
RAM never holds the 16-bit model): every `nn.Linear` but `lm_head` (attention projections) becomes
`bnb.nn.Linear4bit`, and every 3-D expert parameter is quantized with
`bitsandbytes.nn.parametrize.replace_parameter_4bit` (bitsandbytes >= 0.48), since bitsandbytes' own
loader only handles `nn.Linear` and gpt-oss' experts are ~19B of its 21B parameters. Embeddings,
`lm_head`, router, norms and attention sinks stay 16-bit. `lora` on one GPU streams the same way, in
16 bits. A checkpoint that cannot be streamed (not safetensors, or names transformers converts while
loading) goes through `from_pretrained` as before: for qlora, the 16-bit model in host RAM first, then
`quantize_4bit_`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from toolkit import mxfp4
from toolkit.config import TrainConfig
from toolkit.devices import resolve_device
from toolkit.errors import ArtifactError, ConfigError, ExternalToolError

log = logging.getLogger(__name__)
MIN_BNB = (0, 48)  # replace_parameter_4bit (4-bit 3-D expert parameters) appeared in bitsandbytes 0.48


def torch_dtype(cfg: TrainConfig):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]


def check_preconditions(cfg: TrainConfig) -> None:
    """Fail before any weights load: CUDA for cuda/qlora, bf16 support, bitsandbytes for qlora."""
    import torch

    device = resolve_device(cfg.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device cuda (mode {cfg.mode}) but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}). Run on a GPU machine or use `--config tiny-cpu`.")
    if device == "cuda" and cfg.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.dtype bfloat16 but this GPU has no bf16 support. Pass --set train.dtype=float16.")
    if cfg.liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ExternalToolError("train.liger_kernel is on but liger-kernel is not installed. Install it "
                                "(pip install 'toolkit[gpu]') or pass --set train.liger_kernel=false.")
    if cfg.mode == "qlora":
        if not torch.cuda.is_available():
            raise ConfigError("train.mode qlora quantizes with bitsandbytes on a CUDA GPU, and torch sees none. "
                              "Run on a GPU machine, or use --set train.mode=lora (e.g. `--config tiny-cpu`).")
        try:
            version = importlib.metadata.version("bitsandbytes")
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < MIN_BNB:
            raise ExternalToolError(
                f"train.mode qlora needs bitsandbytes >= {'.'.join(map(str, MIN_BNB))} (4-bit MoE experts), found "
                f"{version or 'none'}. Install it: pip install 'toolkit[qlora]'."
            )
    if cfg.activation_offloading and device != "cuda":
        raise ConfigError(f"train.activation_offloading moves saved tensors from a GPU to the CPU, and this run is on "
                          f"{device}. Pass --set train.activation_offloading=false.")


def _chat_template_text(cfg: TrainConfig) -> str | None:
    if not cfg.chat_template:
        return None
    path = Path(cfg.chat_template)
    if not path.is_file():
        raise ConfigError(f"train.chat_template: {path}: no such file. Pass a .jinja chat template.")
    return path.read_text(encoding="utf-8")


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"train.base_model {cfg.base_model!r}: cannot load its tokenizer ({exc}). "
                            "Pass a local model folder with --set train.base_model=PATH.") from exc
    template = _chat_template_text(cfg)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def model_config(cfg: TrainConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.base_model)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"train.base_model {cfg.base_model!r}: cannot load its config ({exc}). "
                            "Pass a local model folder with --set train.base_model=PATH.") from exc


def chat_format(cfg: TrainConfig, config: Any, tokenizer: Any) -> str:
    """harmony (gpt-oss, rendered by toolkit.harmony) or template (the tokenizer's own chat template)."""
    fmt = cfg.chat_format
    if fmt == "auto":
        fmt = "harmony" if getattr(config, "model_type", None) == "gpt_oss" else "template"
    if fmt == "template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{cfg.base_model}: the tokenizer has no chat template. Pass one with "
                          "--set train.chat_template=FILE.jinja, or use a chat (instruct) model.")
    return fmt


def _distributed_backend() -> str | None:
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    return None


def kernel_kwargs(cfg: TrainConfig) -> dict[str, str]:
    """from_pretrained / _from_config keyword arguments choosing the attention and MoE experts kernels."""
    kwargs = {"attn_implementation": cfg.attn_implementation}
    if cfg.experts_implementation != "auto":
        kwargs["experts_implementation"] = cfg.experts_implementation
    return kwargs


def load_base(cfg: TrainConfig, config: Any | None = None):
    """The base causal LM in `cfg.dtype` (qlora: NF4 on the GPU); call `check_preconditions` first.

    qlora, and lora on one GPU, stream the checkpoint (toolkit.loader); lora on the CPU or under FSDP /
    DeepSpeed, and checkpoints that cannot be streamed, load with transformers' `from_pretrained`.
    """
    config = config if config is not None else model_config(cfg)
    device = resolve_device(cfg.device)
    model = None
    if cfg.mode == "qlora" or device == "cuda" and _distributed_backend() is None:
        model = load_streamed(cfg, config, device)
    return model if model is not None else load_pretrained(cfg, config, device)


def _target_device(device: str) -> str:
    if device != "cuda":
        return device
    from accelerate import PartialState

    return f"cuda:{PartialState().local_process_index}"


def load_streamed(cfg: TrainConfig, config: Any, device: str, *, dequantize_on_device: bool = False):
    """`cfg.base_model` read tensor by tensor onto `device` (qlora: NF4), or None when it cannot be streamed.

    `dequantize_on_device`: MXFP4 experts dequantized on the GPU (see toolkit.loader.load; off by default,
    so the GPU's loading peak stays what it was).
    """
    from toolkit import loader

    try:
        folder = loader.local_folder(cfg.base_model)
        model = loader.load(folder, config, torch_dtype(cfg), _target_device(device), quantize=cfg.mode == "qlora",
                            offload_embeddings=cfg.offload_embeddings, dequantize_on_device=dequantize_on_device,
                            model_kwargs=kernel_kwargs(cfg))
    except loader.NotStreamable as exc:
        cost = ": the whole model passes through host RAM in 16 bits" if cfg.mode == "qlora" else ""
        log.warning("train.base_model %s is not streamed (%s); loading it with from_pretrained%s",
                    cfg.base_model, exc, cost)
        return None
    return model


def load_pretrained(cfg: TrainConfig, config: Any, device: str):
    """transformers' from_pretrained (qlora: in 16 bits on the CPU, then `quantize_4bit_` on the GPU)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg), **kernel_kwargs(cfg)}
    if mxfp4.is_mxfp4(config):
        from transformers import Mxfp4Config

        # Training needs plain tensors: MXFP4 kernels are inference-only. 16-bit experts take ~39 GiB for 20b.
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    if cfg.mode == "qlora":
        kwargs["device_map"] = "cpu"  # quantized below while moving to the GPU, so 16-bit weights never fit there
    elif device == "cuda" and _distributed_backend() is None:
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"train.base_model {cfg.base_model!r}: cannot load the weights ({exc}).") from exc
    if cfg.mode == "qlora":
        quantize_4bit_(model, _target_device(device), compute_dtype=torch_dtype(cfg))
    if cfg.offload_embeddings:
        from toolkit.memory import offload_input_embeddings

        offload_input_embeddings(model)
    return model


def quantize_4bit_(model: Any, device: str, compute_dtype: Any) -> dict[str, int]:
    """Quantize `model` in place to NF4 on `device`: nn.Linear (not lm_head) and 3-D expert parameters."""
    import torch
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from toolkit.loader import linear_4bit, params_4bit

    counts = {"linear": 0, "experts": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = linear_4bit(child, compute_dtype)
                q.weight = params_4bit(child.weight.data, q)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q.to(device))  # Params4bit quantizes when it reaches the GPU
                counts["linear"] += 1
        for name, param in list(parent.named_parameters(recurse=False)):
            if param.ndim == 3:
                param.data = param.data.to(device)
                replace_parameter_4bit(parent, name, quant_type="nf4", compress_statistics=True)
                counts["experts"] += 1
    model.to(device)
    model.is_loaded_in_4bit = True  # TRL then keeps the LoRA weights in bf16, as for a bnb-loaded model
    log.info("qlora: %d nn.Linear and %d expert tensors quantized to NF4", counts["linear"], counts["experts"])
    return counts


def _layer_count(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def _param_names(model: Any) -> tuple[list[str], list[str]]:
    """(every parameter's name, the 4-bit parametrized ones) with `X.parametrizations.P.original` read as `X.P`."""
    names, quantized = [], []
    for name, _ in model.named_parameters():
        owner, marker, rest = name.partition(".parametrizations.")
        if marker and rest.endswith(".original"):
            name = f"{owner}.{rest.removesuffix('.original')}"
            quantized.append(name)
        names.append(name)
    return names, quantized


def lora_config(cfg: TrainConfig, model: Any):
    """peft LoraConfig for `model`: attention modules on `attention_layers`, experts on `expert_layers`."""
    from peft import LoraConfig

    n_layers = _layer_count(model)
    problems = [f"train.{key}: layer {i} does not exist (the model has {n_layers} layers: 0..{n_layers - 1})"
                for key in ("attention_layers", "expert_layers") if isinstance(getattr(cfg, key), list)
                for i in getattr(cfg, key) if i >= n_layers]
    if problems:
        raise ConfigError("; ".join(problems))
    param_names, quantized = _param_names(model)
    experts = [e for e in cfg.lora_experts if any(n.endswith(f".{e}") for n in param_names)]
    if cfg.lora_experts and not experts:
        log.info("%s has no parameters named %s: LoRA on attention only", cfg.base_model, cfg.lora_experts)
    if cfg.expert_layers != "all":
        # peft matches target_parameters by name suffix and ignores layers_to_transform for them
        experts = [f"layers.{i}.{e}" for i in cfg.expert_layers for e in experts]
    if quantized:
        # peft matches a parametrized (4-bit) tensor only by its full name, never by a suffix
        experts = [n for n in quantized if any(n.endswith(f".{e}") for e in experts)]
        owners = [n.rsplit(".", 1)[0] for n in experts]
        if not cfg.lowrank_experts and len(set(owners)) < len(owners):
            raise ConfigError(f"train.mode qlora: LoRA on {len(owners) // len(set(owners))} 4-bit expert tensors of "
                              "one module, and peft's own expert LoRA then applies only one of them. Set "
                              "train.lowrank_experts=true (with train.experts_implementation=grouped_mm), or "
                              "give train.lora_experts one tensor.")
    if experts and cfg.lora_dropout:
        raise ConfigError(f"train.lora_dropout {cfg.lora_dropout}: peft's LoRA on expert parameters "
                          "(target_parameters) has no dropout. Set train.lora_dropout=0 or train.lora_experts=[].")
    if not cfg.lora_modules and not experts:
        raise ConfigError(f"{cfg.base_model}: train.lora_modules is empty and the model has no experts named "
                          f"{cfg.lora_experts}: nothing to train. Set train.lora_modules.")
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_modules),
        target_parameters=experts or None,
        layers_to_transform=None if cfg.attention_layers == "all" else list(cfg.attention_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: Any, cfg: TrainConfig):
    """Wrap `model` in a PeftModel with fresh LoRA weights (seeded by cfg.seed)."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(cfg.seed)
    kwargs = {}
    if _distributed_backend() == "deepspeed" and cfg.dtype != "float32":
        # ZeRO-3 gathers parameters in the dtype of the first one: keep adapters in the base dtype (trl#6089)
        kwargs["autocast_adapter_dtype"] = False
    try:
        peft_model = get_peft_model(model, lora_config(cfg, model), **kwargs)
    except ValueError as exc:  # peft: a target matched nothing
        raise ConfigError(f"{cfg.base_model}: LoRA targets {cfg.lora_modules} / {cfg.lora_experts}: {exc}") from exc
    if getattr(model, "is_loaded_in_4bit", False):
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if cfg.lowrank_experts:
        from toolkit import expert_lora

        expert_lora.enable(peft_model)
    if cfg.redequantize_experts:
        from toolkit import redequantize

        if not redequantize.enable(peft_model, recomputed=cfg.redequantize_recomputed):
            log.warning("train.redequantize_experts: %s has no 4-bit expert tensors (mode %s): nothing to do",
                        cfg.base_model, cfg.mode)
    if cfg.fused_experts:
        from toolkit import fused_experts

        if not fused_experts.enable(peft_model):
            log.warning("train.fused_experts: %s has no gpt-oss experts modules: nothing to do", cfg.base_model)
    if cfg.compile_layers != "off":  # last: the compiled layers trace the modules as they are now
        from toolkit.regional_compile import compile_layers

        compile_layers(peft_model, cfg.compile_layers)
    return peft_model


def lora_targets(peft_model: Any) -> dict[str, list[str]]:
    """The module and parameter names that actually carry LoRA weights (for the manifest)."""
    base = peft_model.base_model
    return {
        "modules": sorted(getattr(base, "targeted_module_names", [])),
        "parameters": sorted(getattr(base, "targeted_parameter_names", [])),
    }


def load_model(cfg: TrainConfig):
    """(PeftModel with LoRA attached, tokenizer, chat format): preconditions first, then the weights."""
    check_preconditions(cfg)
    tokenizer = load_tokenizer(cfg)
    config = model_config(cfg)
    fmt = chat_format(cfg, config, tokenizer)
    model = load_base(cfg, config)
    return attach_lora(model, cfg), tokenizer, fmt
