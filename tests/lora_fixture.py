"""A train folder for merge/export tests: a LoRA adapter on the tiny gpt-oss (attention + expert LoRA).

`toolkit train` makes these in real runs; here peft writes one directly with random non-zero B matrices
(a freshly initialised LoRA is a no-op, which the merge check rightly refuses), so the tests of merge and
export do not depend on training. The manifests chain to a prep manifest so the prompt is the real one.
"""

from __future__ import annotations

from pathlib import Path

from toolkit import artifacts
from toolkit.config import PrepConfig, as_dict

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_train_dir(base: Path, out_dir: Path, seed: int = 1, r: int = 4, **lora_kwargs) -> Path:
    """`lora_kwargs` override the LoraConfig (default: attention modules and both expert tensors, all layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = {"r": r, "lora_alpha": 2 * r, "target_modules": ATTENTION, "target_parameters": EXPERTS,
                "task_type": "CAUSAL_LM", **lora_kwargs}
    model = get_peft_model(model, LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    prep = {"stage": "prep", "config": as_dict(PrepConfig()), "upstream": None}
    artifacts.write_manifest(out_dir, stage="train", config={"base_model": str(base), "lora_r": r}, upstream=prep)
    return out_dir
