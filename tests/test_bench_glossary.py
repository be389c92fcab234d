"""bench/glossary_measure.sh report: the comparisons and the summary table of issue 19's grid, from eval folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("chosen", "analysis", "hints", "both")
BIASES = {"hints reverse": 0}  # every other adapter and direction: copy_bias 2


def _as_model_run(copy_run: Path, out: Path, oracle: bool) -> None:
    """A copy-baseline eval folder made to read as a model's run (an oracle's, translating as the reference)."""
    shutil.copytree(copy_run, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["baseline"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    if oracle:
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        (out / "predictions.jsonl").write_text("".join(
            json.dumps({**r, "hypothesis": r["reference"]}, ensure_ascii=False) + "\n" for r in rows))


def test_report_tables_every_run_and_takes_greedy_for_a_tuned_bias_of_zero(tmp_path):
    test = tmp_path / "test.tsv"
    test.write_text("zh\tnan\n我要吃飯\t我欲食飯\n他很高\t伊真懸\n這個東西很便宜\t這个物件真俗\n", encoding="utf-8")
    work = tmp_path / "gg"
    toolkit = [sys.executable, "-m", "toolkit"]
    for s in ("news", "moe"):
        for d in ("forward", "reverse"):
            sets = work / "eval" / f"{s}-{d}"
            subprocess.run(toolkit + ["eval", str(test), "--baseline", "copy", "--direction", d,
                                      "--out", str(sets / "copy")], check=True, capture_output=True)
            for v in VARIANTS:
                for dec in ("greedy", "tuned"):
                    if dec == "tuned" and BIASES.get(f"{v} {d}", 2) == 0:
                        continue  # a bias of 0 is the greedy run: the grid does not run it twice
                    _as_model_run(sets / "copy", sets / f"{v}-{dec}", oracle=v == "hints")
    (work / "tuned_biases.txt").write_text("".join(
        f"{v} {d}: copy_bias {BIASES.get(f'{v} {d}', 2)}\n" for v in VARIANTS for d in ("forward", "reverse")))
    (work / "logs").mkdir()

    env = {**os.environ, "WORK": str(work), "TOOLKIT": " ".join(toolkit), "WITH_BASE": "0"}
    proc = subprocess.run(["bash", "bench/glossary_measure.sh", "report"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]

    header, _, *rows = (work / "summary.md").read_text(encoding="utf-8").splitlines()
    assert header.split(" | ")[4] == "chrF ± 95%"
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert len(cells) == 8 * 5  # 2 sets x 2 directions x 2 decodings, each: copy + the four adapters
    by_key = {tuple(c[:4]): c for c in cells}
    # the hint adapter's tuned bias Taigi -> Mandarin is 0: its tuned row is its greedy run, tested as such
    assert ("news", "reverse", "tuned", "hints-greedy") in by_key
    assert ("news", "forward", "tuned", "hints-tuned (bias 2)") in by_key
    oracle = by_key[("moe", "forward", "greedy", "hints-greedy")]
    assert oracle[4].startswith("100.0 ±")
    assert oracle[6].startswith("+") and oracle[7].startswith("+")  # above the chosen run and above copy
    same = by_key[("moe", "forward", "greedy", "analysis-greedy")]  # as the chosen run: no difference
    assert same[6].startswith("+0.0") or same[6].startswith("-0.0")
