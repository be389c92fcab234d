"""Training checkpoints for `toolkit train --resume`: written atomically, resumed from the newest complete one,
and the metrics of a resumed run computed over the whole run.

transformers writes `checkpoint-N/` file by file, so a run killed while saving leaves a folder that looks
like a checkpoint and is not one (`--resume` then fails with "Can't find a valid checkpoint"). Here each
checkpoint is written as `tmp-checkpoint-N/checkpoint-N/` and renamed to `checkpoint-N/` when complete;
transformers' own rotation and `get_last_checkpoint` only see `checkpoint-N` names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
STAGING = "tmp-"
TRAINER_STATE = "trainer_state.json"  # transformers writes it last into a checkpoint
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class AtomicCheckpoints:
    """Trainer mixin (`class T(AtomicCheckpoints, SFTTrainer)`): checkpoints appear complete or not at all."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING}{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        # transformers saves into `_get_output_dir()/checkpoint-N` (every process, for sharded states) and
        # rotates there: pointed at the staging folder, it writes the checkpoint and rotates nothing else.
        # (A best-model path it records would name the staging folder; the toolkit keeps no best model.)
        self._get_output_dir = lambda trial=None: str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():  # an incomplete one of an earlier run at this step
                shutil.rmtree(final)
            os.rename(staging / name, final)
            staging.rmdir()
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def _complete(path: Path) -> bool:
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_complete(folder: Path, *, clean: bool = True) -> str | None:
    """The newest complete `checkpoint-N` under `folder`, or None. With `clean` (the main process), the
    partial ones a killed run left (staging folders, and `checkpoint-N` without its trainer state, as
    transformers' own writer leaves them) are removed, with a warning, so the resumed run can write them."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith(STAGING):
            if clean:
                log.warning("%s: partial checkpoint of an interrupted run, removed", path)
                shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and (match := _CHECKPOINT.fullmatch(path.name)):
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        if _complete(path):
            return str(path)
        log.warning("%s: incomplete (no readable %s; killed while it was written), %s", path, TRAINER_STATE,
                    "removed; resuming from an earlier checkpoint" if clean else "skipped")
        if clean:
            shutil.rmtree(path, ignore_errors=True)
    return None


def step_of(checkpoint: str | None) -> int | None:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else None


def mean_train_loss(history: list[dict[str, Any]], session_mean: float, steps: int, resumed_from: int | None) -> float:
    """Mean training loss over every step of the run. transformers' `training_loss` averages the steps of
    its own `train()` call only; after a resume the steps before the checkpoint are weighted in from the
    losses logged up to it (each the mean since the log before, restored from the checkpoint)."""
    if not resumed_from:
        return session_mean
    total = covered = last = 0
    for entry in history:
        if "loss" in entry and last < entry["step"] <= resumed_from:
            total += entry["loss"] * (entry["step"] - last)
            covered += entry["step"] - last
            last = entry["step"]
    session_steps = steps - resumed_from
    if covered + session_steps <= 0:
        return session_mean
    return (total + session_mean * session_steps) / (covered + session_steps)
