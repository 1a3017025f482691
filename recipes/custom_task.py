"""Your own task in the RL loop: a verifier in a dozen lines, trained with the arithmetic_rl settings.

    .venv/bin/python recipes/custom_task.py                 # SmolLM2-135M-Instruct, 30 steps
    .venv/bin/python recipes/custom_task.py model=tiny steps=2 eval_prompts=4 algo.prompts_per_step=4

A task is any object with `name`, `problems(count, seed=, split=)`, `reward(problem, completion)` and
`accuracy(problem, completion)` (rl.tasks.Task). Arguments are the same `key=value` overrides `rl-train`
takes; the run folder is outputs/custom_task/DATE_TIME.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from rl.answers import strict_answer
from rl.tasks import INSTRUCTION, Problem
from rl.train import run_from_python


@dataclass(frozen=True)
class Multiplication:
    """One-digit multiplication, scored strictly; 0.2 for the right format with a wrong number."""

    name: str = "multiplication"

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        rng = random.Random(f"{split}:{seed}")
        pairs = [(rng.randrange(2, 10), rng.randrange(2, 10)) for _ in range(count)]
        return [Problem(prompt=f"What is {a} * {b}? {INSTRUCTION}", answer=str(a * b)) for a, b in pairs]

    def reward(self, problem: Problem, completion: str) -> float:
        value = strict_answer(completion)
        return 0.0 if value is None else 1.0 if str(value) == problem.answer else 0.2

    def accuracy(self, problem: Problem, completion: str) -> float:
        return float(str(strict_answer(completion)) == problem.answer)


if __name__ == "__main__":
    run_from_python(Multiplication(), name="custom_task", overrides=["recipe=arithmetic_rl", *sys.argv[1:]])
