"""`rl-train`: compose a run's configuration with Hydra, check it, and launch its recipe's loop.

    rl-train recipe=arithmetic_rl                          # the main job
    rl-train recipe=arithmetic_rl model=tiny steps=2       # a smoke run on the tiny model
    rl-train -m recipe=arithmetic_rl algo.learning_rate=1e-4,3e-4   # a sweep: one folder and wandb run each
    rl-train recipe=arithmetic_rl resume=true              # continue the latest arithmetic_rl run
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from rl.config import TrainConfig, check, hydra_schema, load
from rl.driver.state import STATE, LearnerLost, read_state
from rl.environments import make_environment
from rl.tasks import Task, file_task, make_task

if TYPE_CHECKING:
    from rl.driver.run import Shared
    from rl.env import Environment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

ConfigStore.instance().store(name="schema", node=hydra_schema(TrainConfig))


def resume_folder(config: TrainConfig) -> Path:
    """output_dir if it holds a run's state; else the most recent run beside it (same recipe) that does."""
    folder = Path(config.output_dir)
    if (folder / STATE).exists():
        return folder
    runs = sorted(folder.parent.glob(f"*/{STATE}"), key=lambda path: path.stat().st_mtime)
    if not runs:
        raise ValueError(f"resume=true: no run with a checkpoint ({STATE}) in {folder} or beside it in "
                         f"{folder.parent}; name the run's folder with hydra.run.dir=FOLDER")
    return runs[-1].parent


def run(config: TrainConfig, shared: Shared | None = None) -> list[dict]:
    """Runs `config`'s recipe; a run whose learner dies restarts from its last checkpoint (`learner.max_restarts`),
    unless the learner was a sweep's, `shared` with other runs (`rl.sweep`)."""
    check(config)  # every bad value is named before Ray, wandb or a model starts
    if config.resume:
        config = replace(config, output_dir=str(resume_folder(config)))
    source = source_of(config)
    # Imported here, not at the top: the loops import torch and transformers (~6 s), which a refused
    # configuration does not wait for.
    loop = importlib.import_module(f"rl.driver.{config.algo.loop}")
    restarts = 0
    while True:
        try:
            return loop.train(config, source, shared)
        except LearnerLost as lost:
            if shared is not None:  # the learner held other runs too: the sweep restarts them together (rl.sweep)
                raise
            state = read_state(Path(config.output_dir))
            if restarts == config.learner.max_restarts:
                failed(config, state)
                raise
            restarts += 1
            # The steps after the checkpoint are redone: the log drops their records, so none counts twice.
            origin = f"step {state['step']} ({state['checkpoint']})" if state else "the start"
            print(f"rl-train: {lost}; restart {restarts} of {config.learner.max_restarts}, from {origin}",
                  file=sys.stderr, flush=True)
            config = replace(config, resume=state is not None)
        except Exception:
            failed(config, read_state(Path(config.output_dir)))
            raise


def source_of(config: TrainConfig) -> Task | Environment:
    """What the loop trains on: the task, or for RL your problems in data.train (rl.tasks.FileTask), or an
    environment."""
    if config.env.name != "task":
        return make_environment(config.env.name, config.env.params)
    if config.data.given and config.algo.loop == "rl":  # SFT and DPO read their files themselves
        from rl.driver.run import check_prompts  # with the tokenizer: after the configuration is checked

        data = config.data
        # Distillation alone trains on no reward, and a judge that does not quote the answer gives the rewards, so
        # their problems need no answers; held-out accuracy still does.
        judged = config.judge.adapter is not None and not config.judge.quotes_answer
        answers = not ((config.algo.distills and config.algo.reward_coef == 0) or judged)
        task = file_task(data.train, data.eval, config.held_out_examples, format_reward=config.task.format_reward,
                         answer_format=data.answer_format, instruction=data.instruction, fields=data.fields,
                         reward_fn=data.reward_fn, reward_workers=data.reward_workers,
                         reward_timeout=data.reward_timeout, answers=answers)
        unanswered = sum(problem.answer is None for problem in task.held_out)
        # Held out without answers, a pairwise judge's win rate is the measure; with some, accuracy needs them all.
        if unanswered and config.eval_every and not (config.judge.pairwise and unanswered == len(task.held_out)):
            key = "data.eval" if data.eval else "data.train"
            raise ValueError(f"{key}: {unanswered} of the held-out problems have no \"answer\", which held-out "
                             "accuracy needs: give data.eval=FILE of problems with answers, or eval_every=0" + (
                                 "" if not config.judge.pairwise else ", or none with answers (the pairwise "
                                 "judge's eval/win_rate is then the measure)"))
        check_prompts(config, [*task.train, *task.held_out[:config.eval_prompts]])
        return task
    return make_task(config.task.name, format_reward=config.task.format_reward)


def failed(config: TrainConfig, state: dict | None) -> None:
    where = (f"its last checkpoint is {state['checkpoint']} (step {state['step']}); continue with `rl-train "
             f"recipe={config.recipe} resume=true hydra.run.dir={config.output_dir}`" if state else
             "it had saved no checkpoint yet")
    print(f"rl-train: the run in {config.output_dir} failed; {where}", file=sys.stderr)


def run_from_python(source, *, name: str, overrides: list[str]) -> list[dict]:
    """The RL loop on `source`, a task or an environment made in Python, configured as `rl-train` is: `overrides`
    (recipe=NAME, key=value, ...) composed with configs/; the run folder is outputs/NAME/DATE_TIME."""
    from hydra import compose, initialize_config_dir

    from rl.driver import rl as rl_loop

    folder = f"outputs/{name}/{datetime.now():%Y-%m-%d_%H-%M-%S}"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        config = load(compose("config", overrides=[f"output_dir={folder}", *overrides]))
    check(config)
    return rl_loop.train(config, source)


@hydra.main(config_path=str(CONFIGS), config_name="config", version_base="1.3")
def main(composed: DictConfig) -> None:
    run(load(composed))


if __name__ == "__main__":
    main()
