"""Sweeps: the runs of one `rl-train -m ...` at once, sharing a learner and a sampler pool per base model.

LoRA makes runs on one base model cheap to run together: one learner holds every run's adapter and optimizer
side by side (as it does for the service's users), and one vLLM engine serves every run's weights: in merge mode
(the default) one run's version folded in at a time, its requests batched together; in adapter mode every run's
adapter in the same batches. So the runs of a sweep that agree on what `share_key` names share one learner actor
and one sampler pool (`rl.driver.run.Shared`); each keeps its own adapter, optimizer, data order, seeds, run folder,
checkpoints, metrics.jsonl, curves.png and wandb run (the sweep's folder names their wandb group). Runs that
cannot share (another base model, `sweep.share=false`) each get their own actors; those the cluster has no room
for yet wait in Ray's queue.

Each run's loop runs in a thread of its own, so a run waiting for room or saving a checkpoint holds up no other,
and a run that fails (a bad value, a NaN) fails alone; if a shared learner dies, its runs go on from their last
checkpoints on a new one (`learner.max_restarts`). The sweep's folder gets `sweep.json` (each job's overrides
and folder), `sweep.csv` and `sweep.png` (every run's curves); the same command with `resume=true` continues each
unfinished run from its last checkpoint, in the folder of the latest sweep that ran it.
"""

from __future__ import annotations

import csv
import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from rl.config import TrainConfig, check
from rl.driver.state import STATE, LearnerLost, read_state
from rl.metrics import FINAL_METRICS, best_accuracy, final, final_metrics
from rl.train import failed, run


@dataclass
class Job:
    overrides: list[str]
    """The job's own command-line overrides (what its runs differ in)."""
    config: TrainConfig
    history: list[dict] | None = None
    error: str | None = None
    learner: str | None = None
    """The id of the learner actor it ran on last (runs that shared one have the same)."""
    learner_lost: bool = False
    """It failed because its learner died: it can go on from its last checkpoint on a new one."""


def share_key(config: TrainConfig) -> tuple:
    """What runs must agree on to share a learner and a sampler pool: the base model and the settings of those
    actors (not the learning rate, loss, seed, LoRA rank, data or steps: each run has its own)."""
    model, learner, sampler = config.model, config.learner, config.sampler
    return (model.name, model.dtype, model.max_model_len, learner.num_cpus, learner.num_gpus,
            tuple(sorted(learner.resources.items())), learner.micro_batch_tokens, learner.threads, learner.batch_runs,
            sampler.replicas, sampler.publish_mode,
            sampler.num_cpus, sampler.num_gpus, tuple(sorted(sampler.resources.items())), sampler.threads,
            config.algo.off_policy, config.algo.teacher_model, config.storage_uri, config.cluster.placement_strategy)


def run_sweep(jobs: list[Job], folder: Path) -> list[Job]:
    """Runs the jobs at once, grouped by `share_key` (each alone with sweep.share=false); returns them with their
    histories or errors, after writing the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {len(jobs)} runs in {folder}", flush=True)
    groups: dict[tuple, list[Job]] = {}
    for index, job in enumerate(jobs):
        if job.config.logger.group is None:  # one wandb group per sweep
            group = f"{job.config.recipe}/{folder.name}"
            job.config = replace(job.config, logger=replace(job.config.logger, group=group))
        try:
            check(job.config)
            job.config = resumed(job, folder) if job.config.resume else job.config
        except ValueError as error:
            job.error = str(error)
            continue
        if job.config.resume and (read_state(Path(job.config.output_dir)) or {}).get("step") == job.config.steps:
            job.history = finished_history(job.config)
            continue
        groups.setdefault(share_key(job.config) if job.config.sweep.share else (index,), []).append(job)
    write_record(jobs, folder)  # now, for a resume=true after the sweep is killed; again at the end
    if groups:  # here, in the main thread: Ray's processes die with the thread that starts them (connect says why)
        from rl.driver.run import connect  # the loops' imports (torch, transformers) wait for checked configs

        connect(next(iter(groups.values()))[0].config.cluster)
    all_at_once([lambda group=group: run_group(group) for group in groups.values()])
    write_record(jobs, folder)
    write_summary(jobs, folder)
    return jobs


def run_group(group: list[Job]) -> None:
    """The group's runs on one learner and sampler pool; if the learner dies, the runs it took down go on from
    their last checkpoints on a new one, as a run alone does (`learner.max_restarts`)."""
    max_restarts = min(job.config.learner.max_restarts for job in group)
    run_together(group)
    for restart in range(1, max_restarts + 1):
        group = [job for job in group if job.learner_lost]
        if not group:
            return
        print(f"sweep: the learner of {len(group)} runs died; they go on from their last checkpoints on a new "
              f"one (restart {restart} of {max_restarts})", flush=True)
        for job in group:
            job.error, job.learner_lost = None, False
            job.config = replace(job.config, resume=read_state(Path(job.config.output_dir)) is not None)
        run_together(group)
    for job in group:
        if job.learner_lost:  # the restarts are spent: where each run can resume from
            failed(job.config, read_state(Path(job.config.output_dir)))


def run_together(group: list[Job]) -> None:
    """The group's runs at once, on one learner and sampler pool of their own."""
    from rl.driver.run import Shared  # the loops' imports (torch, transformers) wait until the configs are checked

    shared = None
    try:
        shared = Shared.start([job.config for job in group])
        for job in group:
            job.learner = shared.learner._actor_id.hex()
        if len(group) > 1:
            print(f"sweep: {len(group)} runs share a learner and a sampler pool: "
                  + "; ".join(" ".join(job.overrides) or "(no overrides)" for job in group), flush=True)
        all_at_once([lambda job=job: run_job(job, shared) for job in group])
    except Exception as error:
        for job in group:
            job.error = job.error or f"{type(error).__name__}: {error}"
    finally:
        if shared is not None:
            shared.close()


def write_record(jobs: list[Job], folder: Path) -> None:
    """sweep.json: each job's overrides, run folder, learner actor and outcome so far."""
    (folder / "sweep.json").write_text(json.dumps([
        {"overrides": job.overrides, "output_dir": job.config.output_dir, "learner": job.learner,
         "status": status(job)} for job in jobs], indent=1))


def status(job: Job) -> str:
    if job.error:
        return "failed: " + " ".join(job.error.split())
    return "done" if job.history is not None else "not finished"


def all_at_once(functions: list) -> None:
    """Calls each function in a thread of its own, all at once; returns when every one has."""
    threads = [threading.Thread(target=function, daemon=True) for function in functions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_job(job: Job, shared) -> None:
    try:
        job.history = run(job.config, shared)
    except Exception as error:  # this run fails alone; run() said where its last checkpoint is
        job.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        job.learner_lost = isinstance(error, LearnerLost)


def resumed(job: Job, folder: Path) -> TrainConfig:
    """The job continued from the folder of the latest earlier sweep (beside `folder`) that ran the same
    overrides and saved a checkpoint; started afresh (resume off) when none did."""
    own = [item for item in job.overrides if not item.startswith("resume=")]
    for record in sorted(folder.parent.glob("*/sweep.json"), key=lambda path: path.stat().st_mtime, reverse=True):
        for earlier in json.loads(record.read_text()):
            if [item for item in earlier["overrides"] if not item.startswith("resume=")] == own and (
                    Path(earlier["output_dir"]) / STATE).exists():
                return replace(job.config, output_dir=earlier["output_dir"])
    return replace(job.config, resume=False)


def finished_history(config: TrainConfig) -> list[dict]:
    metrics = Path(config.output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def write_summary(jobs: list[Job], folder: Path) -> None:
    """One row per run (its overrides, status, folder, final metrics and best held-out accuracy with its step) on the
    console and in sweep.csv; every run's first two metrics (accuracy and reward in RL) against the step in
    sweep.png."""
    common = set.intersection(*(set(job.overrides) for job in jobs)) if len(jobs) > 1 else set()
    metrics = final_metrics([job.history or [] for job in jobs])
    rows = [{"run": index, "overrides": " ".join(item for item in job.overrides if item not in common),
             "status": status(job), "output_dir": job.config.output_dir,
             **{key: final(job.history or [], key) for key in metrics}} for index, job in enumerate(jobs)]
    columns = list(metrics)
    if "eval/accuracy" in metrics:  # and where each run was at its best (its run keeps those weights)
        columns += ["eval/accuracy:best", "eval/accuracy:best_step"]
        for row, job in zip(rows, jobs, strict=True):
            best = best_accuracy(job.history or [])
            row["eval/accuracy:best"], row["eval/accuracy:best_step"] = best if best else (None, None)
    with open(folder / "sweep.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"sweep: {sum(not job.error for job in jobs)} of {len(jobs)} runs finished ({folder / 'sweep.csv'}); "
          f"common to all: {' '.join(sorted(common)) or 'nothing'}")
    for row in rows:
        figures = " | ".join(f"{key} {row[key]:.3g}" if isinstance(row[key], float) else f"{key} {row[key]}"
                             for key in columns if row[key] is not None)
        print(f"  {row['run']}: {row['overrides'] or '(no overrides)'} | {row['status'][:200]} | {figures}")
    plot_sweep(jobs, [row["overrides"] or "(no overrides)" for row in rows], folder / "sweep.png",
               [key for key in metrics if key in FINAL_METRICS and key != "time_total/minutes"][:2])


def plot_sweep(jobs: list[Job], labels: list[str], path: Path, keys: list[str]) -> None:
    """Every run's `keys` (the first two metrics of the summary: accuracy and reward in RL) against the step."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    for axis, key in zip(figure.subplots(1, 2), keys, strict=False):
        for job, label in zip(jobs, labels, strict=True):
            points = [(record["step"], record[key]) for record in job.history or [] if key in record]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval") else None, label=label)
        axis.set_title(key)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
