"""`python -m toolkit.llamacpp fetch`: llama.cpp's own HF -> GGUF converter, pinned and unpacked once.

The converter is not on PyPI as a package; it ships inside the llama-cpp-python source distribution
under `vendor/llama.cpp` (`convert_hf_to_gguf.py`, the `conversion/` package it imports and `gguf-py/`,
which is newer than the `gguf` wheel on PyPI). `fetch` downloads that sdist with `pip download`, checks
its sha256 against the pin below and unpacks just those three paths into a cache folder. The pin is the
same llama-cpp-python version the `export` extra builds, so the converter and the runtime that loads
and quantizes its output come from one llama.cpp commit.

`python -m toolkit.llamacpp convert LLAMA_CPP_DIR PRE_TOKENIZER -- CONVERTER_ARGS...` runs the converter
with the vendored gguf-py first on sys.path. With a PRE_TOKENIZER name (not "-") a tokenizer whose hash
the converter does not know is written with that pre-tokenizer, and the substitution is logged as a
warning; a known hash is never overridden.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from toolkit.artifacts import sha256_file
from toolkit.errors import ExternalToolError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
VENDORED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CONVERTER = "convert_hf_to_gguf.py"
ENV_DIR = "TOOLKIT_LLAMA_CPP"


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "toolkit" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def converter_dir(explicit: str | Path | None = None) -> Path:
    """The llama.cpp folder to convert with: `explicit`, $TOOLKIT_LLAMA_CPP, or the fetched pinned copy."""
    folder = Path(explicit or os.environ.get(ENV_DIR) or cache_dir())
    missing = [p for p in (CONVERTER, "conversion", "gguf-py") if not (folder / p).exists()]
    if missing:
        raise ExternalToolError(
            f"{folder}: expected llama.cpp's converter there, missing {', '.join(missing)}. "
            "Run `python -m toolkit.llamacpp fetch` (or scripts/fetch_llama_cpp.sh), or pass --llama-cpp DIR."
        )
    return folder


def pre_tokenizer_names(folder: Path) -> list[str]:
    """The pre-tokenizer names this converter writes (what llama.cpp can load)."""
    text = (folder / "conversion" / "base.py").read_text(encoding="utf-8")
    return sorted(set(re.findall(r'^\s+res = "([^"]+)"', text, flags=re.MULTILINE)))


def fetch(dest: Path | None = None, sdist: Path | None = None) -> Path:
    """Download (or take `sdist`), verify and unpack the pinned converter into `dest`; returns `dest`."""
    dest = Path(dest or cache_dir())
    if (dest / CONVERTER).is_file():
        log.info("llama.cpp converter already at %s", dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="llamacpp-") as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
            log.info("downloading %s from PyPI", SDIST_NAME)
            try:
                subprocess.run(cmd, capture_output=True, text=True, check=True)
            except subprocess.CalledProcessError as exc:
                raise ExternalToolError(f"`{' '.join(cmd)}` failed ({exc.returncode}): {exc.stderr[-800:]}") from None
            sdist = Path(tmp) / SDIST_NAME
        found = sha256_file(sdist)
        if found != SDIST_SHA256:
            raise ExternalToolError(f"{sdist}: sha256 {found}, expected the pinned {SDIST_SHA256}. Not unpacked.")
        staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=_parent(dest)))
        try:
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                           and m.name[len(prefix):].startswith(VENDORED) and (m.isfile() or m.isdir())]
                for member in members:
                    member.name = member.name[len(prefix):]
                tar.extractall(staging, members=members, filter="data")
            (staging / "SOURCE").write_text(
                f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist from PyPI, sha256 {SDIST_SHA256}, "
                "vendor/llama.cpp/{convert_hf_to_gguf.py,conversion/,gguf-py/,LICENSE} (MIT)\n", encoding="utf-8")
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("llama.cpp converter unpacked to %s", dest)
    return dest


def _parent(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.parent


def _convert_main(folder: Path, pre_tokenizer: str | None, args: list[str]) -> None:
    """Run convert_hf_to_gguf.py in this process, after the optional pre-tokenizer fallback is installed."""
    sys.path[:0] = [str(folder / "gguf-py"), str(folder)]
    if pre_tokenizer:
        from conversion import base  # the converter's own package, found through sys.path above

        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                logging.getLogger("toolkit.llamacpp").warning(
                    "tokenizer hash unknown to llama.cpp: writing pre-tokenizer %r as --pre-tokenizer says",
                    pre_tokenizer)
                return pre_tokenizer

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    _pair_mxfp4_tensors()
    sys.argv = [str(folder / CONVERTER), *args]
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")


def mxfp4_pairs_adjacent(tensors: dict[str, object]) -> dict[str, object]:
    """The same tensors, each MXFP4 `*_scales` moved right after its `*_blocks`."""
    out: dict[str, object] = {}
    for name, value in tensors.items():
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in tensors:
            continue  # placed with its blocks
        out[name] = value
        scales = name.removesuffix("_blocks") + "_scales"
        if name.endswith("_blocks") and scales in tensors:
            out[scales] = tensors[scales]
    return out


def _pair_mxfp4_tensors() -> None:
    """Work around the converter's gpt-oss MXFP4 pass-through pairing blocks with scales by reading order.

    `GptOssModel.generate_extra_tensors` keeps the last `*_blocks` it saw and repacks it with the next
    `*_scales` ("we assume that tensors are loaded in the correct order"). Tensors are read shard by shard,
    sorted by name within a shard, so a pair split across two shards meets another `*_blocks` in between
    (e.g. the down_proj of the same layer), and the experts are silently written from the wrong blocks.
    Checkpoints whose shards end anywhere (ours, `toolkit merge`'s) hit it; putting each scales right after
    its blocks in the converter's tensor index removes the dependence on shard boundaries.
    """
    from conversion import gpt_oss  # the converter's own package, on sys.path

    original = gpt_oss.GptOssModel.index_tensors

    def index_tensors(self, *args, **kwargs):
        return mxfp4_pairs_adjacent(original(self, *args, **kwargs))

    gpt_oss.GptOssModel.index_tensors = index_tensors


def main(argv: list[str]) -> int:
    if argv[:1] == ["fetch"]:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        dest = fetch(Path(argv[1]) if len(argv) > 1 else None)
        print(dest)
        return 0
    if argv[:1] == ["convert"] and len(argv) >= 4 and argv[3] == "--":
        folder, pre = Path(argv[1]), (None if argv[2] == "-" else argv[2])
        _convert_main(folder, pre, argv[4:])
        return 0
    print("usage: python -m toolkit.llamacpp fetch [DEST]\n"
          "       python -m toolkit.llamacpp convert LLAMA_CPP_DIR PRE_TOKENIZER|- -- CONVERTER_ARGS...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
