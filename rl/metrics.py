"""What a run leaves behind: metrics.jsonl, samples.jsonl (episodes as text), a wandb run (offline unless asked), one
line per step, curves.png."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from rl.config import TrainConfig

SUMMARY = {"reward/mean": "reward", "env/task_reward": "task reward", "eval/accuracy": "eval acc",
           "eval/judge_reward": "eval judge", "eval/win_rate": "eval win rate", "pairs": "pairs",
           "dpo_accuracy:mean": "dpo acc", "eval/dpo_accuracy:mean": "eval dpo acc",
           "eval/pair_accuracy": "eval pair acc", "loss": "loss",
           "eval/loss": "eval loss", "kl/sampler_vs_teacher": "teacher kl",
           "throughput/sampled_tokens_per_s": "sampled tok/s", "throughput/trained_tokens_per_s": "trained tok/s",
           "throughput/pairs_per_s": "pairs/s", "step_time_s": "step s", "time/sampling_s": "sampling",
           "time/judge_s": "judge", "time/reference_s": "reference", "time/forward_backward_s": "fwd-bwd",
           "time/optim_step_s": "optim", "time/publish_s": "publish", "time/eval_s": "eval"}
"""The keys of the line printed per step, with their labels, then each process's resident GiB (`memory/*_gib`);
metrics.jsonl and wandb get every key."""
FINAL_METRICS = ("eval/accuracy", "eval/win_rate", "eval/dpo_accuracy:mean", "eval/pair_accuracy", "eval/loss",
                 "reward/mean", "loss", "kl/sampler_vs_teacher", "time_total/minutes")
"""The metrics a run ends by printing (its last value of each) and a sweep's summary lists, those it logged, with
eval/pass@k after eval/accuracy where it was logged (`final_metrics`)."""
PHASES = ("sampling", "judge", "reference", "forward_backward", "optim_step", "publish", "eval")
"""The parts of a step timed as `time/{phase}_s` (judge: the judge's rewards; reference: the reference's or the
teacher's logprobs for a KL penalty)."""
CURVES = {"reward / accuracy": ("reward/mean", "env/task_reward", "eval/accuracy", "eval/judge_reward",
                                "eval/win_rate", "dpo_accuracy:mean", "eval/dpo_accuracy:mean", "eval/pair_accuracy"),
          "loss": ("loss", "eval/loss"),
          "entropy and KL per token (nats)": ("sampler/entropy", "kl/sampler_vs_teacher", "kl/sampler_vs_reference")}
"""Panels against the step; curves.png adds accuracy against minutes, seconds per phase, and memory."""


@contextmanager
def timed(record: dict, phase: str) -> Iterator[None]:
    """Adds the seconds the block takes to `record["time/{phase}_s"]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        key = f"time/{phase}_s"
        record[key] = record.get(key, 0.0) + time.perf_counter() - started


class RunLog:
    """Appends each step's record to metrics.jsonl, sends it to wandb and prints a one-line summary.

    A resumed run (`start_step` > 0) keeps the records of the steps before `start_step`, drops any later ones
    (they are about to be redone) and continues the same wandb run (`wandb_id`).
    """

    def __init__(self, config: TrainConfig, *, start_step: int = 0, wandb_id: str | None = None,
                 label: str | None = None):
        """`label` begins each printed line (a sweep's runs print side by side)."""
        self.folder = Path(config.output_dir)
        self.prefix = f"[{label}] " if label else ""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.json").write_text(json.dumps(asdict(config), indent=1))
        tqdm.write(f"{self.prefix}run folder: {self.folder}")
        self.history: list[dict] = _before(self.folder / "metrics.jsonl", start_step)
        self._file = open(self.folder / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        _before(self.folder / "samples.jsonl", start_step)
        self._samples = open(self.folder / "samples.jsonl", "a")  # noqa: SIM115 (closed in close())
        self._wandb = None
        mode = os.environ.get("WANDB_MODE", config.logger.wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", config.logger.project),
                                     group=config.logger.group or config.recipe, dir=str(self.folder), mode=mode,
                                     config=asdict(config), reinit="create_new", id=wandb_id,
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
        tqdm.write(self.prefix + summary_line(record))  # above the progress bar, not through it

    def samples(self, lines: list[dict]) -> None:
        """Appends episodes as text (`rl.driver.episodes.transcript`, with their step, split, group and index) to
        samples.jsonl; an evaluation's go to wandb too, as a table."""
        self._samples.write("".join(json.dumps(line) + "\n" for line in lines))
        self._samples.flush()
        evaluated = [line for line in lines if line["split"] == "eval"]
        if self._wandb is not None and evaluated:
            import wandb

            rows = [[line["step"], line["group"], line["turns"][0]["observation"], "".join(
                turn["action"] if index == 0 else turn["observation"] + turn["action"]
                for index, turn in enumerate(line["turns"])), line["reward"]] for line in evaluated]
            table = wandb.Table(columns=["step", "group", "prompt", "completion", "reward"], data=rows)
            self._wandb.log({"samples/eval": table}, step=evaluated[0]["step"])

    def close(self) -> None:
        """Closes the files, draws curves.png and prints where the run's files are, with its final metrics."""
        self._file.close()
        self._samples.close()
        plot_curves(self.history, self.folder / "curves.png")
        tqdm.write(self.prefix + closing_line(self.history, self.folder))
        if self._wandb is not None:
            self._wandb.finish()


def final(history: list[dict], key: str) -> float | None:
    """The last value of `key` in the records of `history`; None if none has it."""
    values = [record[key] for record in history if key in record]
    return values[-1] if values else None


def closing_line(history: list[dict], folder: Path) -> str:
    """`FOLDER: metrics.jsonl, ... | eval/accuracy 0.781 (best 0.969 at step 20) | reward/mean 0.917 | ...`: the
    files a run leaves and the last value of each of its `final_metrics`."""
    files = ", ".join(name for name in ("metrics.jsonl", "samples.jsonl", "curves.png", "checkpoints", "wandb")
                      if (folder / name).exists())
    parts = [f"{folder}: {files}"]
    for key in final_metrics([history]):
        parts.append(f"{key} {final(history, key):.3g}")
        if key == "eval/accuracy" and sum("eval/accuracy" in record for record in history) > 1:
            parts[-1] += " (best {:.3g} at step {})".format(*best_accuracy(history))
    return " | ".join(parts)


def final_metrics(histories: list[list[dict]]) -> list[str]:
    """The keys of FINAL_METRICS that a record of `histories` has, eval/pass@k keys and each data source's
    eval/SOURCE/accuracy after eval/accuracy."""
    logged = {key for history in histories for record in history for key in record}
    passes = sorted((key for key in logged if key.startswith("eval/pass@")), key=lambda key: int(key.split("@")[1]))
    keys = [key for key in FINAL_METRICS if key in logged]
    at = keys.index("eval/accuracy") + 1 if "eval/accuracy" in keys else 0
    return keys[:at] + passes + sorted(filter(is_source_accuracy, logged)) + keys[at:]


def is_source_accuracy(key: str) -> bool:
    """Whether `key` is one data source's held-out accuracy, eval/SOURCE/accuracy (rl.tasks.FileTask.metrics)."""
    return key.startswith("eval/") and key.endswith("/accuracy") and key.count("/") == 2


def best_accuracy(history: list[dict]) -> tuple[float, int] | None:
    """The best eval/accuracy in the records of `history` and the step of the earliest record with it."""
    evaluated = [(record["eval/accuracy"], -record["step"]) for record in history if "eval/accuracy" in record]
    if not evaluated:
        return None
    best, step = max(evaluated)
    return best, -step


def _before(path: Path, step: int) -> list[dict]:
    """The lines of the JSONL file `path` from before `step`, to which it is cut back: a resumed run redoes the rest."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    kept = [line for line in lines if line["step"] < step]
    path.write_text("".join(json.dumps(line) + "\n" for line in kept))
    return kept


def summary_line(record: dict) -> str:
    """The step's headline numbers, e.g. `step 3 | reward 0.41 | ... | fwd-bwd 2.1 | learner 1.9 GiB | ...`."""
    parts = [f"step {record['step']}"]
    for key, label in SUMMARY.items():
        if key in record:
            value = record[key]
            parts.append(f"{label} {value:.3g}" if isinstance(value, float) and abs(value) < 1000 else
                         f"{label} {value:.0f}" if isinstance(value, float) else f"{label} {value}")
    parts += [f"{key.removeprefix('eval/')} {record[key]:.3g}" for key in record
              if key.startswith("eval/pass@") or is_source_accuracy(key)]
    parts += [f"{key.removeprefix('memory/').removesuffix('_gib')} {value:.2f} GiB" for key, value in record.items()
              if key.startswith("memory/") and key.endswith("_gib") and not key.endswith("peak_gib")]
    return " | ".join(parts)


def _x(record: dict, key: str, x_label: str) -> float:
    """Where a record's `key` goes on the x axis: its step, or the minutes of steps when it was measured; an
    evaluation's when the weights it measures were there: its step's start (it runs during the step, on the weights
    published before it)."""
    if x_label == "step":
        return record["step"]
    before = record["step_time_s"] if key.startswith("eval/") else 0.0
    return record["time_total/minutes"] - before / 60


def curve_panels(history: list[dict]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(title, x axis, keys) of each panel of curves.png that has data: reward/accuracy (with each data source's
    accuracy) and loss against step, accuracy (or, in a run that has none, loss) against minutes of steps, seconds
    per phase, memory."""

    def logged(keys: tuple[str, ...]) -> bool:
        return any(key in record for record in history for key in keys)

    memory_keys = sorted({key for record in history for key in record if key.startswith("memory/")})
    # Each data source's accuracy beside the whole held-out set's (rl.tasks.FileTask.metrics).
    curves = {**CURVES, "reward / accuracy": CURVES["reward / accuracy"] + tuple(sorted(
        {key for record in history for key in record if is_source_accuracy(key)}))}
    accuracy = logged(curves["reward / accuracy"])
    panels = [(title, "step", keys) for title, keys in curves.items()] + [
        ("accuracy against time" if accuracy else "loss against time", "minutes of steps",
         curves["reward / accuracy" if accuracy else "loss"]),
        ("seconds per phase", "step", tuple(f"time/{phase}_s" for phase in PHASES)),
        ("resident memory (GiB)", "step", tuple(memory_keys))]
    return [panel for panel in panels if logged(panel[2])]


def plot_curves(history: list[dict], path: Path) -> None:
    """curves.png: the `curve_panels` of `history`."""
    from matplotlib.figure import Figure  # not pyplot, whose global state a sweep's runs (threads) would share

    panels = curve_panels(history)
    figure = Figure(figsize=(15, 7))
    axes = figure.subplots(2, 3)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    for axis, (title, x_label, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(_x(record, key, x_label), record[key]) for record in history if key in record]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval") else None, label=key,
                          linestyle="--" if key.endswith("peak_gib") else "-")
        axis.set_title(title)
        axis.set_xlabel(x_label)
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
