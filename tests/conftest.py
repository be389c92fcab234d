"""Shared fixtures: tiny gpt-oss models generated offline (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TSV = ROOT / "corpora" / "zh-nan-moe-sample" / "sample.tsv"
SHARED = ROOT.parent / "shared"  # the shared data beside the repository (not shipped)
HELDOUT = SHARED / "eval" / "zh-nan.heldout.tsv"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def heldout() -> Path:
    """The news held-out set of ../shared; the test is skipped (saying so) on a checkout without it."""
    if not HELDOUT.is_file():
        pytest.skip(f"needs the held-out set {HELDOUT.relative_to(ROOT.parent)} beside the repository")
    return HELDOUT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random GptOssForCausalLM with a small BPE tokenizer (Harmony specials + chat template)."""
    from toolkit.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_mxfp4(tmp_path_factory) -> Path:
    """The tiny gpt-oss as openai/gpt-oss-20b ships: MXFP4 experts, bf16 rest, 3 shards with an index."""
    from toolkit.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-mxfp4") / "model", seed=0, mxfp4=True)


@pytest.fixture(scope="session")
def tiny_model_real_tokenizer(tmp_path_factory) -> Path:
    """The same architecture with the real o200k_harmony tokenizer (201,088 tokens, hidden 32)."""
    from toolkit.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-real") / "model", seed=0, real_tokenizer=True)


@pytest.fixture
def sample_tsv() -> Path:
    return SAMPLE_TSV


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    """The tiny gpt-oss as an f32 GGUF (llama.cpp's pinned converter; loading it needs llama-cpp-python)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from toolkit import gguf, llamacpp

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-f32.gguf"
    gguf.convert(tiny_model, out, "f32", llamacpp.fetch(), "gpt-4o")  # the tiny BPE's hash is unknown to llama.cpp
    return out
