"""The RL loop end to end on the tiny model: real learner actor, real vLLM pool, verified publishing; and
`rl-train` as a user launches it."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rl.config import AlgoConfig, LoggerConfig, ModelConfig, TrainConfig
from rl.driver.rl import train
from rl.metrics import RunLog
from rl.tasks import Problem

RL_TRAIN = str(Path(sys.executable).parent / "rl-train")


@dataclass(frozen=True)
class LetterTask:
    """Rewards completions by how many of their characters are 'e': random text scores a spread of rewards."""

    name: str = "letters"

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        return [Problem(prompt=f"Write something ({split} {seed} {index}).", answer="e") for index in range(count)]

    def reward(self, problem: Problem, completion: str) -> float:
        return completion.count(problem.answer) / max(len(completion), 1)

    def accuracy(self, problem: Problem, completion: str) -> float:
        return float(problem.answer in completion)


def test_two_steps_train_publish_and_log(ray_local, tiny_model_dir, tmp_path):
    config = TrainConfig(steps=2, eval_every=1, eval_prompts=4, output_dir=str(tmp_path),
                         model=ModelConfig(name=str(tiny_model_dir), dtype="float32", lora_rank=8, max_model_len=256),
                         algo=AlgoConfig(prompts_per_step=4, group_size=4, max_tokens=8, learning_rate=1e-3),
                         logger=LoggerConfig(wandb_mode="disabled"))
    log = RunLog(config)
    history = train(config, LetterTask(), log)
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history and [record["step"] for record in lines] == [0, 1, 2]
    assert lines[2].keys() == {"step", "eval/accuracy"}, "the final weights are evaluated after the last step"
    for record in lines[:2]:
        assert {"loss", "step_time_s", "reward/mean", "eval/accuracy", "grad_norm:mean"} <= record.keys()
        assert 0.0 <= record["reward/mean"] <= 1.0 and record["datums"] > 0
        assert 0 < record["tokens/sampled"] <= 4 * 4 * 8 and record["tokens/trained"] > 0
    assert lines[1]["step:max"] == 2.0, "one optimizer step per loop step"
    run_folder = next((tmp_path / "checkpoints").iterdir())
    assert sorted(p.name for p in (run_folder / "sampler_weights").iterdir()) == ["step-0", "step-1", "step-2"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def rl_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([RL_TRAIN, *overrides], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def test_rl_train_smoke_run_on_the_tiny_model(tmp_path):
    result = rl_train("recipe=arithmetic_rl", "model=tiny", "steps=2", "eval_prompts=4", "algo.prompts_per_step=4",
                      "algo.max_tokens=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "arithmetic_rl").iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and "eval/accuracy" in records[0]
    assert (run / "curves.png").is_file() and (run / "wandb").is_dir()
    assert json.loads((run / "config.json").read_text())["model"]["name"] == "tiny"


def test_rl_train_names_what_is_wrong(tmp_path):
    unknown_recipe = rl_train("recipe=nope", cwd=tmp_path)
    assert unknown_recipe.returncode != 0 and "recipe/nope" in unknown_recipe.stderr
    assert "arithmetic_rl" in unknown_recipe.stderr, "the known recipes are listed"
    unknown_key = rl_train("algo.learning_rat=1e-3", cwd=tmp_path)
    assert unknown_key.returncode != 0 and "Key 'learning_rat' is not in struct" in unknown_key.stderr
    added_key = rl_train("+algo.learning_rat=1e-3", cwd=tmp_path)  # past Hydra, caught by the typed schema
    assert added_key.returncode != 0 and "bad configuration at algo.learning_rat" in added_key.stderr
    wrong_type = rl_train("steps=many", cwd=tmp_path)
    assert wrong_type.returncode != 0 and "bad configuration at steps: Value 'many'" in wrong_type.stderr


def test_a_sweep_gives_each_run_its_own_folder_and_wandb_run(tmp_path):
    result = rl_train("-m", "recipe=arithmetic_rl", "model=tiny", "steps=1", "eval_prompts=2",
                      "algo.prompts_per_step=2", "algo.max_tokens=4", "algo.learning_rate=1e-4,3e-4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "arithmetic_rl").iterdir()
    runs = sorted(sweep.iterdir())
    assert [run.name for run in runs if run.is_dir() and run.name != ".hydra"] == ["0", "1"]
    rates = [json.loads((sweep / name / "config.json").read_text())["algo"]["learning_rate"] for name in "01"]
    assert rates == [1e-4, 3e-4]
    assert all(len(list((sweep / name / "wandb").glob("offline-run-*"))) == 1 for name in "01")
