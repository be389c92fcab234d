"""Benchmark: host RAM, GPU memory and time of loading the base model for `toolkit train`, streamed vs before.

    python bench/qlora_load.py MODEL_DIR                      # qlora, streamed (the GPU machine)
    python bench/qlora_load.py MODEL_DIR --old                # ... and today's from_pretrained path (~42 GB RAM)
    python bench/qlora_load.py MODEL_DIR --dequantize-on-device   # MXFP4 experts dequantized on the GPU
    python bench/qlora_load.py MODEL_DIR --mode lora --device cuda
    python bench/qlora_load.py --sizes 2x512,4x1024,8x1024 --old   # CPU: random MXFP4 gpt-oss of growing size

MODEL_DIR is a gpt-oss folder in the released layout (`toolkit tiny OUT --size 20b` writes a random
gpt-oss-20b). The settings are the gpt-oss-20b-qlora preset's (bf16, input embeddings kept in CPU memory)
with `train.mode` / `train.device` from the flags. `--device meta` measures the weight-streaming part
alone on a machine without a GPU: every tensor is read (MXFP4 dequantized) and then dropped, standing in
for the GPU; its `--old` counterpart is from_pretrained onto the CPU, which holds the model.

Each load runs in a fresh process (ru_maxrss is a process-wide high-water mark). A row gives the
process' RSS before loading (torch and transformers imported), its peak while loading, the peak GPU
memory allocated, the GPU memory held by the loaded model, and the load time. `--sizes LxH,...` writes
random MXFP4 gpt-oss models of L layers and hidden size H (8 experts) into a temporary folder first.
The table goes to stdout (`--json FILE` keeps the rows); progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30


def peak_rss_bytes() -> int:
    """This process' RSS high-water mark (VmHWM: ru_maxrss would carry the parent's RSS over fork + exec)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def current_rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_once(model_dir: str, mode: str, device: str, old: bool, on_device: bool = False) -> dict:
    """One load in this process; the figures as a dict."""
    import torch

    from toolkit import config, loader, lora
    from toolkit.devices import resolve_device

    cfg = config.build("train", "gpt-oss-20b-qlora", [f'train.base_model="{model_dir}"', f'train.mode="{mode}"',
                                                       f'train.device="{"cpu" if device == "meta" else device}"'])
    model_config = lora.model_config(cfg)
    rss_before = current_rss_bytes()
    started = time.monotonic()
    if device == "meta" and not old:
        ckpt = loader.open_checkpoint(Path(model_dir))
        model = loader.empty_model(model_config, lora.torch_dtype(cfg))
        loader.stream_weights(model, ckpt, lambda module, name, tensor: loader.assign(module, name, tensor.to("meta")))
    elif old:
        model = lora.load_pretrained(cfg, model_config, resolve_device(cfg.device))
    else:
        model = lora.load_streamed(cfg, model_config, resolve_device(cfg.device), dequantize_on_device=on_device)
        if model is None:
            raise SystemExit(f"{model_dir}: not streamable (see the warning above)")
    seconds = time.monotonic() - started
    cuda = torch.cuda.is_available() and device == "cuda"
    return {
        "model": model_dir, "mode": mode, "device": device,
        "path": "from_pretrained" if old else "streamed" + (", dequantized on device" if on_device else ""),
        "rss_before_gib": round(rss_before / GIB, 3), "peak_rss_gib": round(peak_rss_bytes() / GIB, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
        "gpu_after_gib": round(torch.cuda.memory_allocated() / GIB, 3) if cuda else None,
        "seconds": round(seconds, 2),
    }


def run_child(model_dir: str, mode: str, device: str, old: bool, on_device: bool = False) -> dict:
    cmd = [sys.executable, __file__, model_dir, "--child", "--mode", mode, "--device", device]
    cmd += (["--old"] if old else []) + (["--dequantize-on-device"] if on_device else [])
    print(f"qlora_load: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"model": model_dir, "mode": mode, "device": device, "path": "from_pretrained" if old else "streamed",
                "error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_gpt_oss(out: Path, layers: int, hidden: int, shard_bytes: int) -> Path:
    """A random gpt-oss of `layers` x `hidden` (8 experts top-2, vocab 32,000) in the released MXFP4 layout."""
    import hashlib

    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from toolkit.tiny import write_released_layout

    heads = max(1, hidden // 64)
    config = GptOssConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden, head_dim=64,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 8), num_local_experts=8,
                          num_experts_per_tok=2, vocab_size=32000, sliding_window=128, tie_word_embeddings=False,
                          layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])

    def generator(name: str):
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in GptOssForCausalLM(config).state_dict().items()}

    def produce(name: str):
        return (torch.randn(shapes[name], generator=generator(name)) * 0.02).to(torch.bfloat16)

    def packed(name: str, shape):
        experts, cols, rows = shape
        gen = generator(name)
        return (torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen, dtype=torch.uint8),
                torch.randint(119, 122, (experts, rows, cols // 32), generator=gen, dtype=torch.uint8))

    write_released_layout(out, config, produce, shard_bytes, packed=packed)
    return out


def table(rows: list[dict]) -> str:
    head = "| model | path | RSS before (GiB) | peak RSS (GiB) | peak GPU (GiB) | GPU after (GiB) | seconds |"
    lines = [head, "|" + " --- |" * 7]
    for r in rows:
        if "error" in r:
            lines.append(f"| {Path(r['model']).name} | {r['path']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {Path(r['model']).name} | {r['path']} ({r['mode']}, {r['device']}) | {r['rss_before_gib']} | "
                     f"{r['peak_rss_gib']} | {r['peak_gpu_gib'] or '-'} | {r['gpu_after_gib'] or '-'} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--mode", default="qlora", choices=["qlora", "lora"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "meta"])
    parser.add_argument("--old", action="store_true", help="also time from_pretrained (holds the 16-bit model in RAM)")
    parser.add_argument("--dequantize-on-device", action="store_true",
                        help="streamed: MXFP4 experts travel packed and are dequantized on the GPU")
    parser.add_argument("--sizes", help="LxH,... random MXFP4 gpt-oss models to write and load (implies --device meta)")
    parser.add_argument("--shard-mb", type=int, default=100, help="shard size of the --sizes models")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.model_dir, args.mode, args.device, args.old, args.dequantize_on_device)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="qlora_load-") as tmp:
        if args.sizes:
            dirs = []
            for size in args.sizes.split(","):
                layers, hidden = (int(x) for x in size.lower().split("x"))
                print(f"qlora_load: writing a random {layers}x{hidden} gpt-oss", file=sys.stderr, flush=True)
                dirs.append(str(random_gpt_oss(Path(tmp) / f"gpt-oss-{layers}x{hidden}", layers, hidden,
                                               args.shard_mb * 10**6)))
            device = "meta"
        elif args.model_dir:
            dirs, device = [args.model_dir], args.device
        else:
            parser.error("give MODEL_DIR or --sizes")
        mode = "lora" if device == "meta" else args.mode  # the config refuses qlora without CUDA; unused there
        for model_dir in dirs:
            rows.append(run_child(model_dir, mode, device, False, args.dequantize_on_device and device == "cuda"))
            if args.old:  # without a GPU: from_pretrained onto the CPU, qlora's first step before
                rows.append(run_child(model_dir, mode, "cpu" if device == "meta" else device, True))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
