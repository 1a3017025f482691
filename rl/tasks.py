"""Tasks: where prompts come from and how answers are scored. Offline and deterministic from a seed.

A task hands out `Problem`s (a user message and its reference answer) and scores a completion with a reward
in [0, 1]. Rewards come from the task's verifier, never from a model.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol

INSTRUCTION = "Put the final answer after 'Answer:'."


@dataclass(frozen=True)
class Problem:
    prompt: str
    """The user's message."""
    answer: str
    """The reference answer the verifier compares against."""


class Task(Protocol):
    name: str

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]: ...

    def reward(self, problem: Problem, completion: str) -> float: ...

    def accuracy(self, problem: Problem, completion: str) -> float:
        """The unshaped score that evaluation reports."""
        ...


def strict_answer(completion: str) -> int | None:
    """The integer that starts the text after the last 'Answer:', if any."""
    if "Answer:" not in completion:
        return None
    match = re.match(r"\s*(-?\d+)", completion.rsplit("Answer:", 1)[1])
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Addition:
    """One-digit addition, scored strictly: the text after the last 'Answer:' must start with the sum.

    `format_reward` (training only) pays part of the reward for the right format ('Answer:' then an integer)
    even when the integer is wrong: with strict scoring alone the base SmolLM2 is almost never right, so groups
    of samples would all score 0 and carry no signal at first.
    """

    name: str = "addition"
    format_reward: float = 0.0

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        # Disjoint seeds per split keep held-out prompts held out.
        rng = random.Random(f"{split}:{seed}")
        pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(count)]
        return [Problem(prompt=f"What is {a} + {b}? {INSTRUCTION}", answer=str(a + b)) for a, b in pairs]

    def reward(self, problem: Problem, completion: str) -> float:
        value = strict_answer(completion)
        if value is None:
            return 0.0
        return 1.0 if str(value) == problem.answer else self.format_reward

    def accuracy(self, problem: Problem, completion: str) -> float:
        """The strict score, without shaping: what evaluation reports."""
        return float(str(strict_answer(completion)) == problem.answer)


def make_task(name: str, *, format_reward: float = 0.0) -> Task:
    """The task called `name`; an unknown name lists the known ones."""
    tasks = {"addition": lambda: Addition(format_reward=format_reward)}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(tasks)}")
    return tasks[name]()
