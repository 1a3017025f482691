"""What a run leaves behind: metrics.jsonl, a wandb run (offline unless asked), one line per step, curves.png."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from rl.config import TrainConfig

CURVES = {"reward": ("reward/mean", "eval/accuracy", "dpo/accuracy"), "loss": ("loss",)}


class RunLog:
    """Appends each step's record to metrics.jsonl, sends it to wandb and prints a one-line summary."""

    def __init__(self, config: TrainConfig):
        self.folder = Path(config.output_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.json").write_text(json.dumps(asdict(config), indent=1))
        self._file = open(self.folder / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.history: list[dict] = []
        self._wandb = None
        mode = os.environ.get("WANDB_MODE", config.logger.wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", config.logger.project),
                                     group=config.logger.group or config.recipe, dir=str(self.folder), mode=mode,
                                     config=asdict(config), reinit="finish_previous")

    def log(self, record: dict) -> None:
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=record["step"])
        print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in record.items()), flush=True)

    def close(self) -> None:
        self._file.close()
        plot_curves(self.history, self.folder / "curves.png")
        if self._wandb is not None:
            self._wandb.finish()


def plot_curves(history: list[dict], path: Path) -> None:
    """Reward/accuracy and loss against step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(10, 3.5))
    for axis, (title, keys) in zip(axes, CURVES.items(), strict=True):
        for key in keys:
            points = [(record["step"], record[key]) for record in history if key in record]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval") else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
