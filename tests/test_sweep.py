"""Sweeps (rl/sweep.py) on the tiny model: a sweep's runs at once on one learner and one sampler pool, each run as
it would be alone, a failing run failing alone, a dead shared learner replaced, and resume=true continuing the
unfinished ones."""

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import ray
from safetensors.torch import load_file
from test_rl_loop import metrics, samples, tiny_config

from rl.config import AlgoConfig, LearnerConfig, ModelConfig, SamplerConfig, SweepConfig, TaskConfig, TrainConfig
from rl.driver.run import Shared
from rl.driver.state import read_state, write_state
from rl.learner import LearnerActor
from rl.learner.batching import CoalescedCalls
from rl.sweep import Job, run_sweep, share_key, write_summary
from rl.train import run
from rl.types import Datum, ForwardBackwardInput, LoraConfig


def adapter(folder: Path, checkpoint: str) -> dict:
    """The LoRA tensors of a run's training checkpoint."""
    (weights,) = (folder / "checkpoints").glob(f"*/weights/{checkpoint}/adapter_model.safetensors")
    return load_file(weights)


def assert_close(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    assert max((a[key] - b[key]).abs().max().item() for key in a) < tolerance


def test_runs_share_actors_when_only_what_each_run_owns_differs():
    base = TrainConfig()
    alike = [replace(base, seed=3), replace(base, algo=AlgoConfig(learning_rate=1e-3, loss_fn="ppo")),
             replace(base, sampler=SamplerConfig(kv_cache_gib=0.5)),  # the shared pool's is the largest asked for
             replace(base, model=replace(base.model, lora_rank=8), steps=5, task=TaskConfig(name="digits"))]
    assert {share_key(config) for config in alike} == {share_key(base)}
    unlike = [replace(base, model=ModelConfig(name="tiny")), replace(base, model=replace(base.model, dtype="float32")),
              replace(base, learner=LearnerConfig(num_gpus=1)), replace(base, sampler=SamplerConfig(replicas=2)),
              replace(base, algo=AlgoConfig(off_policy=True)), replace(base, storage_uri="file:///shared"),
              replace(base, learner=LearnerConfig(batch_runs=False)),
              replace(base, sampler=SamplerConfig(publish_mode="adapter"))]
    assert len({share_key(config) for config in [base, *unlike]}) == len(unlike) + 1


def test_ray_is_never_started_from_a_sweep_groups_thread():
    """Ray's processes die with the thread that started them (PR_SET_PDEATHSIG): started from the first group's
    thread, they died when that group finished and took the other groups down (CI, stop 56)."""
    script = """if True:
        import threading
        import ray
        from rl.config import ClusterConfig
        from rl.driver.run import connect
        errors = []
        def start():
            try:
                connect(ClusterConfig())
            except RuntimeError as error:
                errors.append(error)
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        print(ray.is_initialized(), errors)
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("False [RuntimeError('Ray must be started from the main thread")


def test_runs_calls_that_arrive_while_the_learner_is_busy_share_a_pass_and_each_gets_its_own_result(
        tiny_model_dir, ray_local, tmp_path):
    learner = LearnerActor.remote(str(tiny_model_dir), storage=str(tmp_path))
    runs = ray.get([learner.create.remote(str(tiny_model_dir), LoraConfig(rank=4, seed=seed)) for seed in range(4)])
    batches = [ForwardBackwardInput(data=[Datum.next_token(list(range(5 + i, 30 + 2 * i)), weights=[1.0] * (25 + i))],
                                    loss_fn="cross_entropy") for i in range(3)]
    batches.append(ForwardBackwardInput(data=[Datum.next_token([1, 2048, 3], weights=[1.0] * 3)],
                                        loss_fn="cross_entropy"))  # a token outside the vocabulary
    alone = ray.get([learner.forward.remote(run, batch) for run, batch in zip(runs[:3], batches, strict=False)])
    calls = CoalescedCalls(learner)
    # The learner is busy with large calls (seconds of work) when the first run's call is sent, which queues behind
    # them; the others arrive meanwhile and wait together for the next pass.
    large = ForwardBackwardInput(data=[Datum.next_token(list(range(10, 250)), weights=[1.0] * 240)] * 48,
                                 loss_fn="cross_entropy")
    busy = [learner.forward_backward.remote(runs[0], large) for _ in range(12)]
    results: dict[int, object] = {}

    def run_loop(index: int) -> None:
        try:
            results[index] = asyncio.run(calls.forward_backward(runs[index], batches[index]))[0]
        except ValueError as error:
            results[index] = error

    threads = [threading.Thread(target=run_loop, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=120)
    ray.get(busy)
    assert calls.passes == 2, "the first call alone, then the three that arrived while the learner was busy"
    for index, expected in enumerate(alone):
        assert results[index].metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
    assert isinstance(results[3], ValueError) and "data[0].model_input holds token id 2048" in str(results[3])
    ray.kill(learner)


@pytest.mark.slow
def test_a_sweep_shares_one_learner_and_pool_and_each_run_is_as_alone(tiny_model_dir, ray_local, tmp_path):
    def jobs(sweep: str, **fields) -> list[Job]:  # each run in SWEEP/N, as rl-train -m names them
        return [Job([f"algo.learning_rate={rate}"], tiny_config(
            tiny_model_dir, tmp_path / sweep / str(index), steps=2, eval_every=2, eval_prompts=4, checkpoint_every=1,
            task=TaskConfig(name="digits"), algo={"learning_rate": rate, "prompts_per_step": 4, "group_size": 4},
            sweep=SweepConfig(share=True), **fields))
            for index, rate in enumerate((1e-2, 3e-3, -1.0))]

    swept = run_sweep(jobs("sweep"), tmp_path / "sweep")
    assert "algo.learning_rate=-1.0: more than 0" in swept[2].error and swept[2].history is None
    assert [job.error for job in swept[:2]] == [None, None]
    for job in swept[:2]:
        assert [record["step"] for record in job.history] == [0, 1, 2] and "eval/accuracy" in job.history[0]
        assert {record["learner/runs_in_pass"] for record in job.history[:2]} <= {1, 2}  # their calls coalesce
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record[0]["learner"] == record[1]["learner"] is not None and record[2]["learner"] is None, record
    with open(tmp_path / "sweep" / "sweep.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["overrides"] for row in rows] == [job.overrides[0] for job in swept]
    assert [row["status"][:6] for row in rows] == ["done", "done", "failed"]
    assert rows[0]["eval/accuracy"] == str(swept[0].history[-1]["eval/accuracy"])
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    # Each run's folder holds its own metrics and checkpoints, and its adapter is the one it trains alone.
    folders = [Path(job.config.output_dir) for job in swept[:2]]
    alone = [replace(job.config, output_dir=str(tmp_path / "alone" / folder.name))
             for folder, job in zip(folders, swept, strict=False)]
    # One run at a time (nothing of the other's in its passes), on actors started as the sweep's were (a core each).
    shared = Shared.start(alone)
    try:
        for folder, job, config in zip(folders, swept, alone, strict=False):
            assert len(list((folder / "checkpoints").iterdir())) == 1 and (folder / "curves.png").is_file()
            history = run(config, shared)
            assert [r["reward/mean"] for r in history[:2]] == [r["reward/mean"] for r in job.history[:2]]
            assert_close(adapter(folder, "step-2"), adapter(Path(config.output_dir), "step-2"))
    finally:
        shared.close()
    assert not adapter(folders[0], "step-2").keys() - adapter(folders[1], "step-2").keys()
    first_finals = [adapter(folder, "step-2") for folder in folders]

    # Killed after step 1's checkpoint (as state.json says), run 0 continues from there, in its folder, when the
    # sweep is run again with resume=true (in a new sweep folder); run 1 had finished and is not run again.
    state = read_state(folders[0])
    write_state(folders[0], {**state, "step": 1, "checkpoint": state["checkpoint"].replace("step-2", "step-1")})
    finished_log = (folders[1] / "metrics.jsonl").read_text()
    resumed = run_sweep(jobs("sweep-again", resume=True), tmp_path / "sweep-again")
    assert [Path(job.config.output_dir) for job in resumed[:2]] == folders
    assert [job.error for job in resumed[:2]] == [None, None] and "more than 0" in resumed[2].error
    assert [record["step"] for record in resumed[0].history] == [0, 1, 2]
    assert read_state(folders[0])["step"] == 2 and (folders[1] / "metrics.jsonl").read_text() == finished_log
    assert_close(adapter(folders[0], "step-2"), first_finals[0])

    # steps=0 evaluates each run's adapter, the sweep's runs sharing a learner and a pool: each gives the greedy
    # answers of its run's final evaluation.
    def evaluation(folder: Path) -> Job:
        config = tiny_config(tiny_model_dir, tmp_path / "evaluated" / folder.name, steps=0, eval_prompts=4,
                             task=TaskConfig(name="digits"), sweep=SweepConfig(share=True))
        return Job([f"model.adapter={folder}"], replace(config, model=replace(config.model, adapter=str(folder))))

    evaluated = run_sweep([evaluation(folder) for folder in folders], tmp_path / "evaluated")
    assert json.loads((tmp_path / "evaluated" / "sweep.json").read_text())[0]["learner"] is not None
    for job, folder in zip(evaluated, folders, strict=True):
        assert [record["step"] for record in job.history] == [0] and job.error is None
        assert job.history[0]["eval/accuracy"] == metrics(folder)[-1]["eval/accuracy"]
        assert eval_answers(Path(job.config.output_dir), 0) == eval_answers(folder, 2)


def eval_answers(folder: Path, step: int) -> list[str]:
    return [line["turns"][0]["action"] for line in samples(folder) if line["split"] == "eval" and line["step"] == step]


@pytest.mark.slow
def test_a_shared_learner_that_dies_is_replaced_and_its_runs_go_on_from_their_checkpoints(
        tiny_model_dir, ray_local, tmp_path, capsys):
    jobs = [Job([f"algo.learning_rate={rate}"], tiny_config(
        tiny_model_dir, tmp_path / "sweep" / str(index), steps=4, eval_every=0, checkpoint_every=1,
        task=TaskConfig(name="digits"), algo={"learning_rate": rate, "prompts_per_step": 2, "group_size": 4},
        sweep=SweepConfig(share=True))) for index, rate in enumerate((1e-2, 3e-3))]
    folders = [Path(job.config.output_dir) for job in jobs]
    def learner_processes() -> set[int]:  # Ray titles an actor's process after its class
        return {process.pid for process in psutil.process_iter(["cmdline"])
                if (process.info["cmdline"] or [""])[0].startswith("ray::Learner")}

    earlier = learner_processes()
    killed: dict = {}

    def kill_the_learner_after_both_checkpoints() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            learners = learner_processes() - earlier
            steps = [(read_state(folder) or {}).get("step", 0) for folder in folders]
            if learners and min(steps) >= 1:
                (pid,) = learners
                os.kill(pid, signal.SIGKILL)
                killed["steps"] = steps
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_learner_after_both_checkpoints, daemon=True)
    killer.start()
    swept = run_sweep(jobs, tmp_path / "sweep")
    killer.join()
    assert max(killed["steps"]) < 4, killed  # killed while both were still training
    assert [job.error for job in swept] == [None, None]
    printed = capsys.readouterr()
    assert "learner of 2 runs died; they go on from their last checkpoints on a new one (restart 1 of 3)" in (
        printed.out)
    assert "failed" not in printed.err, "a run that goes on is not reported as failed"
    assert swept[0].learner == swept[1].learner, "both on one new learner"
    for folder in folders:
        # Steps after a run's last checkpoint were redone, and the log keeps each step once.
        assert [record["step"] for record in metrics(folder)] == [0, 1, 2, 3]
        assert read_state(folder)["step"] == 4 and len(adapter(folder, "step-4")) > 0


def test_the_summary_lists_the_final_metrics_its_runs_logged(tmp_path, capsys):
    # An SFT sweep on your own file logs a held-out loss and no accuracy or reward: the table and plot show what
    # there is, and a failed run's row stays empty.
    jobs = [Job([f"algo.learning_rate={rate}"], TrainConfig(output_dir=str(tmp_path / str(index))),
                history=[{"step": 0, "loss": 2.0, "eval/loss": 2.5}, {"step": 1, "loss": loss, "eval/loss": 1.5,
                                                                      "time_total/minutes": 0.1}])
            for index, (rate, loss) in enumerate([(1e-3, 1.25), (1e-2, 0.5)])]
    jobs.append(Job(["algo.learning_rate=1"], TrainConfig(output_dir=str(tmp_path / "2")), error="loss is NaN"))
    write_summary(jobs, tmp_path)
    with open(tmp_path / "sweep.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["run", "overrides", "status", "output_dir", "eval/loss", "loss", "time_total/minutes"]
    assert [(row["status"], row["eval/loss"], row["loss"]) for row in rows] == [
        ("done", "1.5", "1.25"), ("done", "1.5", "0.5"), ("failed: loss is NaN", "", "")]
    assert "1: algo.learning_rate=0.01 | done | eval/loss 1.5 | loss 0.5 | time_total/minutes 0.1" in \
        capsys.readouterr().out
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_the_summary_gives_each_runs_best_held_out_accuracy_and_its_step(tmp_path, capsys):
    accuracies = {0: 0.0, 5: 0.75, 10: 0.75, 15: 0.5}  # the best twice: the earliest counts
    jobs = [Job(["seed=0"], TrainConfig(output_dir=str(tmp_path / "0")),
                history=[{"step": step, "eval/accuracy": value} for step, value in accuracies.items()]),
            Job(["seed=1"], TrainConfig(output_dir=str(tmp_path / "1")),
                history=[{"step": 0, "eval/accuracy": 0.25, "eval/pass@4": 0.5, "reward/mean": 0.1}])]
    write_summary(jobs, tmp_path)
    with open(tmp_path / "sweep.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0])[4:] == ["eval/accuracy", "eval/pass@4", "reward/mean", "eval/accuracy:best",
                                 "eval/accuracy:best_step"], "pass@k beside the accuracy it comes with"
    assert [(row["eval/accuracy"], row["eval/accuracy:best"], row["eval/accuracy:best_step"]) for row in rows] == [
        ("0.5", "0.75", "5"), ("0.25", "0.25", "0")]
    printed = capsys.readouterr().out
    assert "0: seed=0 | done | eval/accuracy 0.5 | eval/accuracy:best 0.75 | eval/accuracy:best_step 5" in printed
    assert "1: seed=1 | done | eval/accuracy 0.25 | eval/pass@4 0.5 | reward/mean 0.1 | eval/accuracy:best" in printed
