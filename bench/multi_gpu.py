"""Issue 9: `toolkit train` of full-size gpt-oss-20b shapes (random weights) on one GPU, then on 2 GPUs
through `accelerate launch` with the shipped FSDP2 and DeepSpeed ZeRO-3 configs (bench/multi_gpu.sh runs
it on the lent machine).

    python bench/multi_gpu.py make-model DIR --tokenizer TOK   random bf16 gpt-oss-20b checkpoint + tokenizer
    python bench/multi_gpu.py table RUN_DIR...                 markdown table (stdout) and JSON of the runs

Cost depends on shapes, not values, so a random checkpoint built from gpt-oss-20b's `GptOssConfig` times
the real thing; it is saved with `save_pretrained` and loaded back by `toolkit train` exactly as the
released weights would be (minus their MXFP4 dequantization).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_model(out: Path, tokenizer: Path, device: str = "cuda", seed: int = 0) -> Path:
    """A random gpt-oss-20b checkpoint (bf16 safetensors shards) with the real tokenizer beside it."""
    from bench.train_speed import build_model, model_config
    from toolkit.config import build

    out = Path(out)
    if (out / "model.safetensors.index.json").is_file():
        print(f"{out}: already there", file=sys.stderr)
        return out
    cfg = build("train", "gpt-oss-20b-lora", ['train.attn_implementation="eager"', 'train.experts_implementation="auto"',
                                              "train.lowrank_experts=false", "train.offload_embeddings=false"])
    started = time.perf_counter()
    model = build_model(cfg, model_config(), device, seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    for item in Path(tokenizer).iterdir():
        if item.suffix != ".gz":
            shutil.copy2(item, tmp / item.name)
    tmp.rename(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {params / 1e9:.2f}B parameters in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return out


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What one `toolkit train` folder says about its speed and memory."""
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
    m = manifest["metrics"]
    peaks = m.get("peak_gpu_memory_gib") or {}
    steady = m.get("steady_tokens_per_second")
    return {
        "run": Path(run_dir).name,
        "parallelism": m["parallelism"],
        "processes": m["processes"],
        "steps": m["steps"],
        "tokens_seen": m["tokens_seen"],
        "tokens_per_second": m["tokens_per_second"],
        "steady_tokens_per_second": steady,
        "per_gpu": round(steady / m["processes"], 1) if steady else None,
        "peak_allocated_gib": peaks.get("allocated"),
        "peak_reserved_gib": peaks.get("reserved"),
        "train_loss": m["train_loss"],
        "eval_loss": m.get("eval_loss"),
        "adapter_bytes": next((o["bytes"] for o in manifest["outputs"] if o["path"] == "adapter_model.safetensors"),
                              None),
    }


def with_scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scaling efficiency: tokens/s per GPU against the single-process run's tokens/s (same code, same shapes)."""
    single = next((r for r in rows if r["processes"] == 1 and r["steady_tokens_per_second"]), None)
    for row in rows:
        row["scaling"] = (round(row["per_gpu"] / single["steady_tokens_per_second"], 3)
                          if single and row["per_gpu"] else None)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str = "") -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            return " / ".join(format(v, spec) for v in value)
        return format(value, spec)

    lines = [("| run | engine | GPUs | steps | tokens/s (all GPUs) | tokens/s per GPU | scaling vs 1 GPU "
              "| peak alloc GiB per GPU | peak reserved GiB per GPU | last loss |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['parallelism']} | {r['processes']} | {r['steps']} "
                     f"| {fmt(r['steady_tokens_per_second'], ',.0f')} | {fmt(r['per_gpu'], ',.0f')} "
                     f"| {fmt(r['scaling'], '.0%')} | {fmt(r['peak_allocated_gib'], '.1f')} "
                     f"| {fmt(r['peak_reserved_gib'], '.1f')} | {fmt(r['train_loss'], '.4f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-model", help="random full-size gpt-oss-20b checkpoint")
    mk.add_argument("out", type=Path)
    mk.add_argument("--tokenizer", type=Path, required=True, help="folder of the o200k_harmony tokenizer")
    mk.add_argument("--device", default="cuda")
    tb = sub.add_parser("table", help="markdown table of finished `toolkit train` folders")
    tb.add_argument("runs", type=Path, nargs="+")
    tb.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.command == "make-model":
        make_model(args.out, args.tokenizer, args.device)
        return 0
    rows = with_scaling([run_summary(r) for r in args.runs if (r / "manifest.json").is_file()])
    missing = [str(r) for r in args.runs if not (r / "manifest.json").is_file()]
    print(table(rows))
    if missing:
        print(f"\nnot finished: {', '.join(missing)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
