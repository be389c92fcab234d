"""A saved peft LoRA adapter as float32 deltas of its base model's tensors, one tensor at a time (`toolkit merge`).

`adapter_model.safetensors` + `adapter_config.json` are read directly: the adapter is never attached to a
loaded model. Which base tensor each pair of LoRA factors changes, and with which scale, is peft's own answer:
the adapter config is applied to the base architecture built on the meta device (no weights), so target
matching, `layers_to_transform`, `rank_pattern`/`alpha_pattern`, rsLoRA and the nesting of several
`target_parameters` on one module are peft's. The deltas are then computed here from the stored factors,
reproducing peft 0.21's `get_delta_weight`:

- `lora.Linear` (an nn.Linear, e.g. attention): W [out, in] += scale * B @ A.
- `lora.ParamWrapper` (`target_parameters`, e.g. gpt-oss' `mlp.experts.gate_up_proj` [E, H, 2I] and
  `down_proj` [E, I, H]): A [r*E, in] is read as [E, r, in] (expert-major rows), B [out, r*E] as [out, r, E]
  (expert-minor columns), and expert e gets scale * A_e^T @ B_e^T ([in, out]); for experts stored
  [E, out, in] (`is_transposed` False in transformers, peft's swapped in/out) scale * B_e @ A_e.

Adapters trained with `train.lowrank_experts` are these same files (only the training forward differed).
Anything else (DoRA, LoRA biases, modules_to_save, trainable tokens, embedding or conv LoRA, inits that
rewrite the base such as PiSSA) is refused: every tensor of the adapter must be consumed by a delta.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ArtifactError

log = logging.getLogger(__name__)
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # how peft's save_pretrained names the wrapped model's modules
# adapter_config.json settings whose LoRA is not W + scale * B @ A on the listed targets
UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
               "velora_config", "kasa_config", "monteclora_config", "layer_replication", "modules_to_save",
               "trainable_token_indices", "fan_in_fan_out", "megatron_config")
# initialisations that also rewrite the base weights: the adapter is then relative to a base we do not have
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class Target:
    """One base tensor changed by the adapter: its LoRA factors' names and how peft combines them."""

    param: str  # the base parameter, transformers' naming
    key: str  # the adapter's tensor names are f"{key}.lora_A.weight" / f"{key}.lora_B.weight"
    scale: float
    experts: int  # 0: a 2-D weight (B @ A); E: a 3-D expert stack
    swapped: bool  # peft swapped in/out: the stack is [E, out, in] (else [E, in, out])
    shape: tuple[int, ...]


def _refuse_unsupported(folder: Path, settings: dict[str, Any]) -> None:
    where = folder / CONFIG
    if str(settings.get("peft_type", "LORA")).upper() != "LORA":
        raise ArtifactError(f"{where}: peft_type {settings.get('peft_type')!r}; `toolkit merge` merges LoRA adapters "
                            "only.")
    for key in UNSUPPORTED:
        if settings.get(key):
            raise ArtifactError(f"{where}: {key} = {json.dumps(settings[key])} is not supported by `toolkit merge` "
                                "(plain LoRA: W + scale * B @ A). Train without it.")
    if settings.get("bias", "none") != "none":
        raise ArtifactError(f"{where}: bias = {settings['bias']!r} is not supported by `toolkit merge` (the "
                            "adapter trains base biases). Train with bias = \"none\".")
    init = settings.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ArtifactError(f"{where}: init_lora_weights = {init!r} rewrites the base weights; `toolkit merge` "
                            "needs an adapter relative to the unmodified base. Train with the default init.")


def _peft_layers(folder: Path, base_config: Any) -> tuple[list[tuple[str, Any]], set[str], dict[str, tuple]]:
    """(name, peft LoRA layer) of the adapter applied to the meta-device base, the keys peft would save, shapes."""
    from accelerate import init_empty_weights
    from peft import PeftConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(base_config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    lora_config = PeftConfig.from_pretrained(str(folder))
    try:
        peft_model = get_peft_model(model, lora_config, low_cpu_mem_usage=True)
    except (ValueError, TypeError) as exc:  # peft: a target matched nothing, or a setting it refuses
        first = " ".join(str(exc).split())
        raise ArtifactError(f"{folder / CONFIG}: does not fit the base model: {first}") from None
    layers = [(name, module) for name, module in peft_model.base_model.model.named_modules()
              if isinstance(module, LoraLayer)]
    return layers, set(get_peft_model_state_dict(peft_model)), shapes


def _target(folder: Path, name: str, layer: Any, shapes: dict[str, tuple]) -> Target:
    from peft.tuners.lora.layer import Linear, ParamWrapper

    adapter = "default"
    if type(layer) not in (Linear, ParamWrapper):
        raise ArtifactError(f"{folder / CONFIG}: LoRA on {name} is a peft {type(layer).__name__}; `toolkit merge` "
                            "merges LoRA on linear layers and on parameters (target_parameters) only.")
    if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter) or adapter in getattr(layer, "lora_variant", {}):
        raise ArtifactError(f"{folder / CONFIG}: {name} uses a LoRA variant (DoRA, LoRA bias); `toolkit merge` "
                            "merges plain LoRA only.")
    module = ".".join(part for part in name.split(".") if part != "base_layer")
    param = f"{module}.{layer.parameter_name}" if isinstance(layer, ParamWrapper) else f"{module}.weight"
    shape = shapes[param]
    experts = int(getattr(layer, "num_experts", 1)) if len(shape) == 3 else 0
    if len(shape) == 3 and experts < 2:
        raise ArtifactError(f"{folder / CONFIG}: {param} is a 3-D parameter with one expert; not supported.")
    return Target(param=param, key=PREFIX + name, scale=float(layer.scaling[adapter]), experts=experts,
                  swapped=bool(getattr(layer, "_did_swap_in_out_features", False)), shape=shape)


class Adapter:
    """The deltas of a saved LoRA adapter, read tensor by tensor; `add_to(name, weight)` applies one."""

    def __init__(self, folder: str | Path, base_config: Any):
        from safetensors import safe_open

        self.folder = Path(folder)
        weights = self.folder / WEIGHTS
        if not weights.is_file():
            raise ArtifactError(f"{self.folder}: no {WEIGHTS} (a .bin adapter?). Save the adapter as safetensors.")
        settings = json.loads((self.folder / CONFIG).read_text(encoding="utf-8"))
        _refuse_unsupported(self.folder, settings)
        layers, expected, shapes = _peft_layers(self.folder, base_config)
        self._file = safe_open(str(weights), "pt")
        stored = set(self._file.keys())
        if stored != expected:
            extra, missing = sorted(stored - expected)[:3], sorted(expected - stored)[:3]
            raise ArtifactError(f"{weights}: its tensors do not match {CONFIG} on this base (not understood: {extra}, "
                                f"missing: {missing}). `toolkit merge` merges plain LoRA; check --base-model.")
        self.targets: dict[str, Target] = {}
        for name, layer in layers:
            target = _target(self.folder, name, layer, shapes)
            if target.param in self.targets:
                raise ArtifactError(f"{self.folder / CONFIG}: two LoRA layers on {target.param}; not supported.")
            self.targets[target.param] = target
        self._match_nested_by_shape()
        consumed = {f"{t.key}.lora_{ab}.weight" for t in self.targets.values() for ab in "AB"}
        if consumed != stored:  # every adapter tensor becomes part of a delta, or the merge stops here
            raise ArtifactError(f"{weights}: tensors no delta uses: {sorted(stored - consumed)[:3]}; missing: "
                                f"{sorted(consumed - stored)[:3]}.")
        self.applied: set[str] = set()
        self._cached: tuple[str, Any] | None = None

    def _factor_shapes(self, key: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (tuple(self._file.get_slice(f"{key}.lora_A.weight").get_shape()),
                tuple(self._file.get_slice(f"{key}.lora_B.weight").get_shape()))

    def _match_nested_by_shape(self) -> None:
        """Pair nested parameter adapters with their tensors by the factors' shapes.

        Several `target_parameters` on one module (gpt-oss' experts: gate_up_proj and down_proj) are nested
        ParamWrappers saved as `experts.lora_*` and `experts.base_layer.lora_*`; which is which follows the order
        peft wrapped them in, and that order differs between a 4-bit (parametrized) training model and the plain
        model here. The stored shapes decide: B has the tensor's output size, A its input size.
        """
        import itertools

        groups: dict[str, list[Target]] = {}
        for target in self.targets.values():
            if target.experts:
                groups.setdefault(target.param.rpartition(".")[0], []).append(target)
        for group in (g for g in groups.values() if len(g) > 1):
            keys = [t.key for t in group]
            found = {key: self._factor_shapes(key) for key in keys}

            def fits(target: Target, key: str, found: dict = found) -> bool:
                (a_rows, a_in), (b_out, b_cols) = found[key]
                _, first, second = target.shape  # [E, in, out], or [E, out, in] when peft swapped them
                size_in, size_out = (second, first) if target.swapped else (first, second)
                return a_in == size_in and b_out == size_out and a_rows == b_cols and a_rows % target.experts == 0

            matches = [order for order in itertools.permutations(keys)
                       if all(fits(t, k) for t, k in zip(group, order))]
            if not matches:
                raise ArtifactError(f"{self.folder / WEIGHTS}: the LoRA factors of {group[0].param.rpartition('.')[0]} "
                                    f"fit none of its tensors' shapes ({', '.join(f'{k}: {v}' for k, v in found.items())})")
            if tuple(keys) in matches:
                continue
            if len(matches) > 1:
                raise ArtifactError(f"{self.folder / WEIGHTS}: the nested LoRA factors of "
                                    f"{group[0].param.rpartition('.')[0]} fit several of its tensors (equal shapes) "
                                    "and are saved in another order than peft nests them here: cannot tell which "
                                    "is which.")
            log.info("adapter: %s: nested LoRA pairs matched to their tensors by shape", group[0].param)
            for target, key in zip(group, matches[0]):
                self.targets[target.param] = Target(**{**target.__dict__, "key": key})

    def factors(self, name: str):
        """(lhs, rhs) in float32 with delta = scale * lhs @ rhs: 2-D [out, r] @ [r, in]; experts [E, ., r] @ [E, r, .]."""
        import torch

        if self._cached and self._cached[0] == name:
            return self._cached[1]
        target = self.targets[name]
        a = self._file.get_tensor(f"{target.key}.lora_A.weight").to(torch.float32)
        b = self._file.get_tensor(f"{target.key}.lora_B.weight").to(torch.float32)
        if target.experts:  # peft ParamWrapper.get_delta_factors: A rows expert-major, B columns expert-minor
            a = a.reshape(target.experts, -1, a.shape[-1])  # [E, r, in]
            b = b.reshape(b.shape[0], -1, target.experts).permute(2, 0, 1)  # [E, out, r]
            pair = (b, a) if target.swapped else (a.transpose(-2, -1), b.transpose(-2, -1))
        else:
            pair = (b, a)
        self._cached = (name, pair)
        return pair

    def add_to(self, name: str, weight, experts: slice | None = None):
        """weight += delta in place (float32 `weight`: the whole tensor, or the experts `experts` of a 3-D one)."""
        target = self.targets[name]
        lhs, rhs = self.factors(name)
        if not target.experts:
            weight.addmm_(lhs, rhs, alpha=target.scale)
        else:
            indices = range(target.experts)[experts or slice(None)]
            if weight.shape[0] != len(indices):
                raise ValueError(f"{name}: {weight.shape[0]} experts given, {len(indices)} expected")
            for row, e in enumerate(indices):  # one expert's delta at a time: never a second full-size tensor
                weight[row].addmm_(lhs[e], rhs[e], alpha=target.scale)
        self.applied.add(name)
        return weight

    def transform(self, name: str, tensor):
        """`toolkit.layerwise` transform: base+adapter (float32 `tensor`, changed in place) as tensors are read."""
        return self.add_to(name, tensor) if name in self.targets else tensor

    def check_all_applied(self) -> None:
        """Every target got its delta (an expert LoRA silently skipped is the failure this guards against)."""
        missing = sorted(set(self.targets) - self.applied)
        if missing:
            raise ArtifactError(f"{self.folder}: the merge did not apply the LoRA of {missing[:3]} "
                                f"({len(missing)} tensors). This is a bug; nothing was written.")

    def close(self) -> None:
        self._file = None
        self._cached = None
