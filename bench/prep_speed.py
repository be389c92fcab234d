"""Benchmark: `toolkit prep` throughput on one core, without the tokenizer length filter.

    python bench/prep_speed.py [--pairs 1000000]

Writes a synthetic TSV of N pairs (sentences drawn from the shipped sample, each made unique by a
counter so dedupe keeps them all), runs the prep stage with --length-unit chars in this process, and
prints pairs per minute. Goal (issue 3): >= 1,000,000 pairs per minute.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    from toolkit.config import PrepConfig
    from toolkit.corpus import prepare

    rows = (ROOT / "corpora" / "zh-nan-moe-sample" / "sample.tsv").read_text(encoding="utf-8").splitlines()[1:]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "synthetic.tsv"
        with open(corpus, "w", encoding="utf-8") as fh:
            fh.write("zh\tnan\tnan_tailo\n")
            for i in range(args.pairs):
                zh, nan, tailo = rows[i % len(rows)].split("\t")
                fh.write(f"{zh}{i}\t{nan}{i}\t{tailo}\n")
        size = corpus.stat().st_size
        start = time.perf_counter()
        manifest = prepare(PrepConfig(length_unit="chars"), corpus, Path(tmp) / "out")
        seconds = time.perf_counter() - start
    kept = manifest["metrics"]["pairs_kept"]
    print("| pairs | input MB | seconds | pairs/min (1 core) | goal |")
    print("|---|---|---|---|---|")
    print(f"| {kept:,} | {size / 1e6:.1f} | {seconds:.1f} | {kept / seconds * 60:,.0f} | >= 1,000,000 |")


if __name__ == "__main__":
    main()
