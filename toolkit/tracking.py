"""Local run tracking for `toolkit train`: metrics.jsonl, TensorBoard, a quiet progress bar, the loss curve.

Nothing here needs an account or a network. Only the main process writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from toolkit import artifacts

log = logging.getLogger(__name__)


class MetricsCallback(TrainerCallback):
    """Append every log record (train loss, lr, grad norm, eval loss) as one JSON line.

    On resume the lines written after the checkpoint's step by the interrupted run are dropped, so the
    file reads as one uninterrupted run; so is a line the kill cut off (with a warning).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.global_step]
        artifacts.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class QuietProgressCallback(ProgressCallback):
    """The progress bar (stderr) with the latest losses as its postfix, instead of dict dumps on stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if k in logs}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def tensorboard_callback(log_dir: Path) -> TrainerCallback:
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(log_dir)  # instead of OUTPUT_DIR/runs/DATE_HOST inside the checkpoints
    return callback


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; an unreadable line (cut off by a kill while written) is dropped with a warning."""
    if not Path(path).is_file():
        return []
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line dropped (the run was interrupted while writing it)", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_loss(metrics_path: Path, png_path: Path) -> Path | None:
    """Train and eval loss against the step, as a PNG (None when nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    dev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not dev:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for points, label, style in ((train, "train", "-"), (dev, "dev", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("toolkit train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
