"""`toolkit run CORPUS --config PRESET`: the whole pipeline in one place, stage after stage.

    prep -> train -> merge -> export (GGUF + Modelfile) -> eval (the GGUF on a test set)

Each stage writes `export/<run>/<stage>/` exactly as its own command would, so a run that stops half
way is continued by running the same command again: finished stages are no-ops (when their config and
input are unchanged), an interrupted train resumes from its newest complete checkpoint, an interrupted
eval from its last prediction, and an interrupted prep, merge or export is done again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from toolkit import config as cfgmod
from toolkit import runs
from toolkit.errors import ConfigError

log = logging.getLogger(__name__)
STAGES = runs.STAGES


def run(corpus: Path, run_dir: Path, *, config: str | Path | None = None, overrides: tuple[str, ...] = (),
        test_file: Path | None = None, until: str = "eval", force: bool = False) -> dict[str, Any]:
    """Run the stages up to `until`; returns {stage: manifest}. The eval set defaults to the prep dev split."""
    from toolkit import corpus as corpus_mod
    from toolkit import evaluate, gguf, merge, train

    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}")
    # Build every config first: a typo in any section fails before hours of training, not after.
    cfgs = {s: cfgmod.build(s, config, overrides) for s in STAGES}
    prep = cfgs["prep"]
    if STAGES.index(until) >= STAGES.index("eval") and test_file is None and not prep.dev_file and not prep.dev_fraction:
        raise ConfigError("prep.dev_fraction = 0 holds out no dev split, and the final eval scores that split: pass "
                          "--test TEST.tsv, or keep a dev fraction (e.g. --set prep.dev_fraction=0.05).")
    if cfgs["export"].name in (None, "", "model"):  # GGUF files and the Ollama model are named after the run
        cfgs["export"] = dataclasses.replace(cfgs["export"], name=Path(run_dir).name)
    dirs = {s: runs.stage_dir(Path(run_dir), s) for s in STAGES}
    manifests: dict[str, Any] = {}
    steps = {
        "prep": lambda: corpus_mod.prepare(cfgs["prep"], corpus, dirs["prep"], force=force),
        "train": lambda: train.run(cfgs["train"], dirs["prep"], dirs["train"], force=force, resume=not force),
        "merge": lambda: merge.run(cfgs["merge"], dirs["train"], dirs["merge"], force=force),
        "export": lambda: gguf.run(cfgs["export"], dirs["merge"], dirs["export"], force=force),
        "eval": lambda: _evaluate(evaluate, cfgs["eval"], dirs, test_file, force),
    }
    for stage in STAGES:
        start = time.perf_counter()
        manifests[stage] = steps[stage]()
        log.info("run: %s done in %.1fs -> %s", stage, time.perf_counter() - start, dirs[stage])
        if stage == until:
            break
    return manifests


def _evaluate(evaluate, cfg, dirs: dict[str, Path], test_file: Path | None, force: bool):
    model = runs.export_gguf(dirs["export"])  # the one the Modelfile uses
    cfg = dataclasses.replace(cfg, backend="llama-cpp", model=str(model))
    test = Path(test_file) if test_file else dirs["prep"] / "dev.jsonl"
    return evaluate.run(cfg, test, dirs["eval"], force=force)
