"""Benchmark: translation throughput (sentences/s) of `toolkit eval` / `toolkit serve` backends, before and after
batched decoding (issue 21).

    python bench/translate_speed.py --model MODEL_DIR [--limit 500] [--max-new-tokens 256] [--out DIR]
    python bench/translate_speed.py --random gpt-oss-20b --device cuda       # full-size shapes, random weights
    python bench/translate_speed.py --gguf FILE.gguf --threads 1,2 --n-batch 32,128,512   # llama.cpp on the CPU
        [--chat-template toolkit/templates/gemma3.jinja]    # for the base GGUF of `toolkit fetch gemma3-270m`

transformers rows (greedy, the first `--limit` sentences of the news set, `--direction`):
- `before`: the old path, reproduced by its settings: sentences in the order given, 8 per generate call, every
  sentence limited to `--max-new-tokens`, no repetition stop, an adapter left unmerged.
- `after`: what `toolkit eval` does now: a pool of `--batch-size` x 4 sentences sorted by length, batches of
  `--batch-size`, each row stopped on its own at its per-sentence limit (toolkit.decoding) or at a loop, an
  adapter merged at load. `--cache static` adds transformers' static KV cache; `--no-loop-stop` drops the repetition
  stop (random models: see below).
Each row reports sentences/s, generated tokens/s, outputs at their limit and cut for repeating. A random model
never ends a sentence itself and its outputs loop at once: with `--no-loop-stop` every row decodes to its limit,
the most work a sentence can take, so sentences/s is a lower bound; compare tokens/s as well.
`--random gemma3-270m --tokenizer FOLDER`: Gemma 3 270M's shapes from the config.json of FOLDER (the hf folder of
`toolkit fetch gemma3-270m`, weights not needed), float32, transformers' random initialisation.

llama.cpp rows: one per (n_threads, n_batch) pair, same sentences, the toolkit defaults for the limits.
The table goes to stdout, the results to OUT/translate_speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NEWS = ROOT.parent / "shared" / "eval" / "zh-nan.heldout.tsv"


def sentences(path: Path, limit: int, direction: str) -> list[str]:
    from toolkit.evaluate import read_test_set

    return read_test_set(path, "zh", "nan", direction, limit).sources


def random_model(name: str, device: str, folder: Path, tokenizer: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) with gpt-oss-20b's shapes and random weights (bench/train_speed.py), real tokenizer:
    built into `folder`, or read from `tokenizer` (a saved one; a lone tokenizer.json.gz is unpacked first, as
    bench/gpu_pack.py packs it for a machine that cannot build it)."""
    from train_speed import build_model, model_config

    from toolkit.config import TrainConfig
    from toolkit.tokenizer import build_hf_tokenizer

    if name not in ("gpt-oss-20b", "tiny", "gemma3-270m"):
        raise SystemExit(f"--random {name}: expected gpt-oss-20b, gemma3-270m or tiny")
    if name == "gemma3-270m":
        return random_from_folder(tokenizer, device, folder)
    # eager attention: transformers' gpt-oss runs no sdpa (its attention sinks); the eval's own default too
    cfg = TrainConfig(dtype="bfloat16" if device == "cuda" else "float32", device=device, attn_implementation="eager",
                      experts_implementation="grouped_mm" if device == "cuda" else "eager")
    config = model_config(tiny=name == "tiny")
    if name == "tiny":
        config.vocab_size = 201088  # the real tokenizer's ids must fit
    model = build_model(cfg, config, device)
    if tokenizer is None:
        return model.eval(), build_hf_tokenizer(folder)
    from transformers import AutoTokenizer

    return model.eval(), AutoTokenizer.from_pretrained(unpacked(tokenizer, folder))


def unpacked(tokenizer: Path, folder: Path) -> Path:
    """`tokenizer`, or a copy in `folder` with its tokenizer.json.gz unpacked (bench/gpu_pack.py packs it so)."""
    import gzip
    import shutil

    packed = tokenizer / "tokenizer.json.gz"
    if (tokenizer / "tokenizer.json").is_file() or not packed.is_file():
        return tokenizer
    shutil.copytree(tokenizer, folder / "tok")
    with gzip.open(packed) as src, open(folder / "tok" / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return folder / "tok"


def random_from_folder(tokenizer: Path | None, device: str, folder: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a model folder without its weights (config.json, tokenizer files, chat template:
    the `hf` folder of `toolkit fetch gemma3-270m` less model.safetensors): the model with transformers' own
    random initialisation, float32 (as the Gemma presets train and evaluate), built on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if tokenizer is None or not (tokenizer / "config.json").is_file():
        raise SystemExit("--random gemma3-270m needs --tokenizer FOLDER with config.json and the tokenizer files "
                         "(the hf folder of `toolkit fetch gemma3-270m`, weights not needed)")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tokenizer), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(unpacked(tokenizer, folder))


def transformers_rows(args: argparse.Namespace, texts: list[str]) -> list[dict[str, Any]]:
    from toolkit import backends
    from toolkit.decoding import Decoding, RepeatStop
    from toolkit.evaluate import SORT_BATCHES
    from toolkit.prompt import default_spec

    modes = {
        "before": ({"batch_size": 8, "sort": False, "merge_adapter": False,
                    "decoding": Decoding(tokens_per_source_token=0, repeat=RepeatStop(max_ngram=0))}, 8),
        "after": ({"batch_size": args.batch_size, "sort": True, "merge_adapter": True,
                   "decoding": Decoding(repeat=RepeatStop(max_ngram=0)) if args.no_loop_stop else Decoding(),
                   "generate_options": {"cache_implementation": "static"} if args.cache == "static" else None},
                  args.pool or args.batch_size * SORT_BATCHES),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = time.perf_counter()
        shared = random_model(args.random, args.device, Path(tmp), args.tokenizer) if args.random else None
        if shared is not None:
            print(f"# random {args.random} built in {time.perf_counter() - built:.1f} s", file=sys.stderr, flush=True)
        for mode in args.modes.split(","):
            options, chunk = modes[mode]
            if shared is not None:
                translator = backends.TransformersTranslator.from_model(*shared, name=f"random {args.random}",
                                                                       device=args.device, **options)
                spec = default_spec()
            else:
                translator = backends.load_translator("transformers", args.model, device=args.device,
                                                      dtype=args.dtype, **options)
                spec = backends.spec_for("transformers", args.model)
            spec = spec.for_direction(args.direction)
            warm = time.perf_counter()
            translator.translate(texts[:min(len(texts), 8)], spec, max_new_tokens=args.max_new_tokens)  # warm-up
            print(f"# {mode}: warm-up (8 sentences) {time.perf_counter() - warm:.1f} s", file=sys.stderr, flush=True)
            if args.profile_tokens:
                profile(translator, texts[:translator.batch_size], spec, args.profile_tokens,
                        args.out / f"profile-{mode}.txt" if args.out else None)
            rows.append(timed(f"transformers {mode}", lambda t=translator, n=chunk, sp=spec, m=mode: chunked(
                t, texts, n, sp, args.max_new_tokens, m, args.budget_s), sync=args.device == "cuda"))
            del translator
    return rows


def chunked(translator: Any, texts: list[str], chunk: int, spec: Any, max_new_tokens: int, mode: str,
            budget_s: float = 0.0) -> list[Any]:
    """`translator.translate` over `texts` `chunk` at a time, each chunk's time on stderr as it ends (a row cut
    short by a device call's time limit still says how far it got). With `budget_s`, no chunk starts after that
    many seconds (the first always runs): the row is then timed on the sentences done."""
    results: list[Any] = []
    started = time.perf_counter()
    for start in range(0, len(texts), chunk):
        results += translator.translate(texts[start:start + chunk], spec, max_new_tokens=max_new_tokens)
        print(f"# {mode}: {len(results)}/{len(texts)} sentences, {sum(r.tokens for r in results)} tokens in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        if budget_s and time.perf_counter() - started > budget_s and len(results) < len(texts):
            print(f"# {mode}: --budget-s {budget_s:g} spent, the row stops at {len(results)} sentences",
                  file=sys.stderr, flush=True)
            break
    return results


def profile(translator: Any, texts: list[str], spec: Any, tokens: int, out: Path | None, top: int = 25) -> str:
    """torch.profiler over one `translate` call of `texts` (a row's first batch) with `tokens` new tokens at most:
    the operator tables by self device time and by self CPU time (where the GPU waits on Python), and the time
    per decoding step. To stderr, and to `out` when given."""
    import torch
    from train_speed import profiler, profiler_tables

    started = time.perf_counter()
    with profiler() as prof:
        results = translator.translate(texts, spec, max_new_tokens=tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    steps = max(r.tokens for r in results)
    text = (f"# profile: {len(texts)} sentences, {steps} decoding steps in {seconds:.2f} s "
            f"({1000 * seconds / max(steps, 1):.1f} ms per step, profiler overhead included)\n"
            + profiler_tables(prof, top))
    print(text, file=sys.stderr, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return text


def llama_rows(args: argparse.Namespace, texts: list[str]) -> list[dict[str, Any]]:
    from toolkit import backends

    rows = []
    spec = backends.spec_for("llama-cpp", args.gguf).for_direction(args.direction)
    for threads in [int(t) for t in args.threads.split(",")]:
        for n_batch in [int(b) for b in args.n_batch.split(",")]:
            translator = backends.load_translator("llama-cpp", args.gguf, n_threads=threads, n_batch=n_batch,
                                                  n_ctx=args.n_ctx)
            if args.chat_template and translator.template is not None:  # a GGUF without one (fetched base model)
                translator.template.template = args.chat_template.read_text(encoding="utf-8")
            translator.translate(texts[:2], spec, max_new_tokens=args.max_new_tokens)  # warm-up
            row = timed(f"llama-cpp threads {threads} n_batch {n_batch}",
                        lambda t=translator: t.translate(texts, spec, max_new_tokens=args.max_new_tokens))
            rows.append({**row, "n_threads": threads, "n_batch": n_batch})
            del translator
    return rows


def timed(name: str, run, sync: bool = False) -> dict[str, Any]:
    import torch

    if sync:
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = run()
    if sync:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(r.tokens for r in results)
    row = {"name": name, "sentences": len(results), "seconds": round(seconds, 2),
           "sentences_per_s": round(len(results) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           "tokens": tokens, "hit_limit": sum(r.stop == "length" for r in results),
           "stopped_repetition": sum(r.stop == "repetition" for r in results)}
    print(f"| {name} | {row['sentences_per_s']:.2f} | {row['tokens_per_s']:.0f} | {tokens} | {row['hit_limit']} | "
          f"{row['stopped_repetition']} | {seconds:.1f} |", flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="transformers model, merge or train folder")
    what.add_argument("--random", help="gpt-oss-20b (full-size shapes, random weights) or tiny")
    what.add_argument("--gguf", help="a GGUF for the llama.cpp rows")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="--random: a saved o200k_harmony tokenizer folder instead of building one")
    ap.add_argument("--test", type=Path, default=NEWS, help="TSV with zh and nan columns (default: the news set)")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--direction", default="forward", choices=["forward", "reverse"])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--modes", default="before,after", help="transformers rows: before, after or both")
    ap.add_argument("--batch-size", type=int, default=64, help="the after row's batch")
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="the after row's KV cache")
    ap.add_argument("--pool", type=int, default=0,
                    help="the after row's sentences per translate call, sorted by length within it (default: "
                         "batch size x 4, as toolkit eval); smaller pools let --budget-s stop a row sooner")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="transformers rows: start no chunk of sentences after this many seconds (0: no limit)")
    ap.add_argument("--no-loop-stop", action="store_true",
                    help="the after row without its repetition stop: a random model's outputs loop at once, so the "
                         "stop would end them early; without it every row decodes to its limit (the most work)")
    ap.add_argument("--profile-tokens", type=int, default=0,
                    help="transformers rows: profile one batch first with at most this many new tokens "
                         "(torch.profiler tables to stderr and OUT/profile-MODE.txt)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", default="2", help="llama.cpp: comma-separated n_threads values")
    ap.add_argument("--n-batch", default="512", help="llama.cpp: comma-separated n_batch values")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--chat-template", type=Path, default=None,
                    help="llama.cpp: a .jinja template for a GGUF without one (toolkit/templates/gemma3.jinja for the "
                         "GGUF `toolkit fetch gemma3-270m` gives)")
    ap.add_argument("--out", type=Path, default=None, help="folder for translate_speed.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    texts = sentences(args.test, args.limit, args.direction)
    print("| row | sentences/s | tokens/s | tokens | hit limit | loop cut | seconds |\n|---|---|---|---|---|---|---|")
    rows = llama_rows(args, texts) if args.gguf else transformers_rows(args, texts)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        info = {"args": {k: str(v) for k, v in vars(args).items()}, "python": platform.python_version(),
                "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        (args.out / "translate_speed.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n",
                                                        encoding="utf-8")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
