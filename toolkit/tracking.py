"""Local run tracking for `toolkit train`: metrics.jsonl, TensorBoard, a quiet progress bar, the loss curve.

Nothing here needs an account or a network. Only the main process writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class MetricsCallback(TrainerCallback):
    """Append every log record (train loss, lr, grad norm, eval loss) as one JSON line.

    On resume the lines written after the checkpoint's step by the interrupted run are dropped, so the
    file reads as one uninterrupted run.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

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
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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
