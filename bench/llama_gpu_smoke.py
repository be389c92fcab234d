"""Smoke tests of a llama-cpp-python build on a GPU, each case in its own process (a crash is a result, not the end).

    python bench/llama_gpu_smoke.py FILE.gguf [--cases eval,verify,...] [--layers -1]

Cases, each as toolkit loads llama.cpp:
- eval: toolkit eval's llama-cpp backend (default f16 KV cache, greedy generate with a logits processor, as
  copy_bias runs);
- verify: toolkit export's check (f32 KV cache, logits of every prompt position);
- torch-verify: the same after torch has started CUDA in the process (export computes its reference with torch
  first). On 2026-12-02 every GPU export check segfaulted on the H200 while a plain load did not;
- verify-f16kv, verify-nooffload, verify-cpu: verify with one thing changed, to find what a crash needs: the
  default f16 KV cache; llama.cpp's op offload off (large batches of a layer kept on the CPU move to the GPU
  otherwise, n_gpu_layers=0 included); no layer on the GPU and op offload off (the CPU computes everything);
- toolkit-verify: `toolkit.gguf.verify` itself, as export's worker process runs it (the Harmony prompts of
  export.verify_texts, several evaluations with resets, a short completion), with reference logits of zeros
  (the figures mean nothing; whether it runs is the result) and no torch in the process. On 2026-12-03 export's
  worker crashed on the H200 while every case above but torch-verify passed on the same file.

One line per case on stdout, `CASE ok ...` or `CASE failed (exit N)` (lower case: `gemma_gpu.sh wait` takes
FAILED in its log for a failed stage); exit status 1 when `eval` failed (the build is of no use for the eval grid
then), else 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CASES = ("eval", "verify", "torch-verify", "verify-f16kv", "verify-nooffload", "verify-cpu", "toolkit-verify")


def run_case(case: str, path: str, layers: int) -> str:
    import llama_cpp

    if case == "torch-verify":
        import torch

        torch.zeros(1, device="cuda").sum().item()
    if case == "toolkit-verify":
        return toolkit_verify(path, layers)
    if case == "eval":
        llm = llama_cpp.Llama(model_path=path, logits_all=False, n_ctx=2048, n_gpu_layers=layers, n_threads=1,
                              n_threads_batch=1, n_batch=512, seed=0, verbose=False)
        prompt = llm.tokenize("今天天氣真好".encode(), add_bos=True, special=False)
        favoured = prompt[-2:]

        def favour(_ids, scores):
            scores[favoured] += 2.0
            return scores

        out = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True,
                                logits_processor=[favour]):
            out.append(tok)
            if len(out) >= 16 or tok == llm.token_eos():
                break
        return f"{len(out)} tokens generated"
    options = {} if case == "verify-f16kv" else {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    if case in ("verify-nooffload", "verify-cpu"):
        options["op_offload"] = False
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, seed=0,
                          n_gpu_layers=0 if case == "verify-cpu" else layers, **options)
    ids = llm.tokenize("今天天氣真好，我們去公園散步。".encode(), add_bos=True, special=True)
    llm.eval(ids)
    return f"logits of {len(ids)} positions, finite: {all(abs(x) < 1e30 for x in llm.scores[len(ids) - 1])}"


def toolkit_verify(path: str, layers: int) -> str:
    """`toolkit.gguf.verify` on `path` with zero reference logits; the prompts tokenized by the file's own vocab."""
    import dataclasses
    from pathlib import Path

    import llama_cpp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from toolkit import config, gguf, prompt

    cfg = dataclasses.replace(config.build("export"), n_gpu_layers=layers)
    prompts = [prompt.default_spec().render_prompt(text) for text in cfg.verify_texts]
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    ids = [vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in prompts]
    ref = {"ids": ids, "logits": [np.zeros((len(row), vocab.n_vocab()), np.float32) for row in ids],
           "last_as_shipped": None, "rope_rounded": False}
    vocab.close()
    figures = gguf.verify(Path(path), "f16", prompts, ref, cfg)
    return f"{figures['positions']} positions of {len(prompts)} prompts, torch loaded: {'torch' in sys.modules}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--layers", type=int, default=-1, help="n_gpu_layers (-1 = all)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process's one case
    args = parser.parse_args()
    if args.case:
        print(f"{args.case} ok: {run_case(args.case, args.gguf, args.layers)}", flush=True)
        return 0
    failed = set()
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}; expected some of {', '.join(CASES)}")
        proc = subprocess.run([sys.executable, __file__, args.gguf, "--layers", str(args.layers), "--case", case],
                              check=False, capture_output=True, text=True, timeout=300)
        line = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
        if proc.returncode:
            failed.add(case)
            tail = proc.stderr.strip().splitlines()[-1:] or [""]
            print(f"{case} failed (exit {proc.returncode}) {tail[0][:200]}", flush=True)
        else:
            print(line[0] if line else f"{case} ok", flush=True)
    return 1 if "eval" in failed else 0


if __name__ == "__main__":
    sys.exit(main())
