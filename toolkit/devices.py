"""The torch device a setting names (`train.device`, `eval.device`, `serve.device`): one rule for every stage."""

from __future__ import annotations


def resolve_device(name: str | None = "auto") -> str:
    """`auto` (or unset): cuda when torch sees a GPU, else cpu; any other name (cpu, cuda, cuda:1) as it is."""
    if name in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
