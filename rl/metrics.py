"""What a run leaves behind: metrics.jsonl, a wandb run (offline unless asked), one line per step, curves.png."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from rl.config import TrainConfig

SUMMARY = {"reward/mean": "reward", "eval/accuracy": "eval acc", "dpo/accuracy": "dpo acc",
           "eval/dpo_accuracy": "eval dpo acc", "loss": "loss", "eval/loss": "eval loss",
           "throughput/sampled_tokens_per_s": "sampled tok/s", "throughput/trained_tokens_per_s": "trained tok/s",
           "throughput/pairs_per_s": "pairs/s", "time/sampling_s": "sampling s", "time/training_s": "training s",
           "step_time_s": "step s"}
"""The keys of the line printed per step, with their labels; metrics.jsonl and wandb get every key."""
CURVES = {"reward / accuracy": ("reward/mean", "eval/accuracy", "dpo/accuracy", "eval/dpo_accuracy"),
          "loss": ("loss", "eval/loss")}


class RunLog:
    """Appends each step's record to metrics.jsonl, sends it to wandb and prints a one-line summary.

    A resumed run (`start_step` > 0) keeps the records of the steps before `start_step`, drops any later ones
    (they are about to be redone) and continues the same wandb run (`wandb_id`).
    """

    def __init__(self, config: TrainConfig, *, start_step: int = 0, wandb_id: str | None = None):
        self.folder = Path(config.output_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.json").write_text(json.dumps(asdict(config), indent=1))
        metrics = self.folder / "metrics.jsonl"
        kept = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        self.history: list[dict] = [record for record in kept if record["step"] < start_step]
        metrics.write_text("".join(json.dumps(record) + "\n" for record in self.history))
        self._file = open(metrics, "a")  # noqa: SIM115 (closed in close())
        self._wandb = None
        mode = os.environ.get("WANDB_MODE", config.logger.wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", config.logger.project),
                                     group=config.logger.group or config.recipe, dir=str(self.folder), mode=mode,
                                     config=asdict(config), reinit="finish_previous", id=wandb_id,
                                     resume="allow" if wandb_id else None)

    @property
    def wandb_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def log(self, record: dict) -> None:
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=record["step"])
        tqdm.write(summary_line(record))  # above the progress bar, not through it

    def close(self) -> None:
        self._file.close()
        plot_curves(self.history, self.folder / "curves.png")
        if self._wandb is not None:
            self._wandb.finish()


def summary_line(record: dict) -> str:
    """The step's headline numbers (SUMMARY's keys that it has), e.g. `step 3 | reward 0.41 | loss -0.012 | ...`."""
    parts = [f"step {record['step']}"]
    for key, label in SUMMARY.items():
        if key in record:
            value = record[key]
            parts.append(f"{label} {value:.3g}" if isinstance(value, float) else f"{label} {value}")
    return " | ".join(parts)


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
