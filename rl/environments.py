"""Multi-turn environments that ship with rl, offline and deterministic from a seed (`env=NAME` in rl-train).

- `calculator`: the sum of three 3-digit numbers, which a small model cannot do in its head, with a calculator
  tool; strictly scored on the final answer.
- `guess_number`: find an integer in 1..max_number in at most `guesses` guesses, told "higher" or "lower" after
  each; the reward is larger the fewer guesses it took.

Each is an `Environment` (rl/env.py): `groups(...)` makes a step's groups, each of G fresh copies of one problem.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import partial

from rl.chat import chat_tokens, completion_text, message_tokens
from rl.env import EnvGroup, StepResult, StopCondition
from rl.tasks import INSTRUCTION, strict_answer
from rl.tools import CALCULATOR, Tool, call_tool, tools_prompt


@dataclass
class CalculatorEnv:
    numbers: list[int]
    tokenizer: object
    tools: list[Tool] = field(default_factory=lambda: [CALCULATOR])
    calls: int = 0
    valid_calls: int = 0

    async def initial_observation(self) -> tuple[list[int], StopCondition]:
        question = " + ".join(map(str, self.numbers))
        return chat_tokens(self.tokenizer, f"{tools_prompt(self.tools)}\nWhat is {question}? {INSTRUCTION}"), []

    async def step(self, action: list[int]) -> StepResult:
        text = completion_text(self.tokenizer, action)
        call = call_tool(self.tools, text)
        if call is None:  # no tool call: the reply is final
            correct = strict_answer(text) == sum(self.numbers)
            return StepResult(reward=float(correct), episode_done=True, metrics={
                "accuracy": float(correct), "tool_calls": self.calls, "used_tool": float(self.calls > 0),
                "valid_call_rate": self.valid_calls / self.calls if self.calls else 1.0})
        self.calls += 1
        self.valid_calls += call.valid
        return StepResult(reward=0.0, episode_done=False,
                          next_observation=message_tokens(self.tokenizer, {"role": "tool", "content": call.content}))


@dataclass(frozen=True)
class Calculator:
    name: str = "calculator"
    terms: int = 3
    digits: int = 3

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[EnvGroup]:
        rng = random.Random(f"{split}:{seed}")
        low, high = 10 ** (self.digits - 1), 10 ** self.digits
        return [EnvGroup(partial(CalculatorEnv, [rng.randrange(low, high) for _ in range(self.terms)], tokenizer),
                         group_size) for _ in range(count)]


@dataclass
class GuessNumberEnv:
    secret: int
    max_number: int
    guesses: int
    tokenizer: object
    taken: int = 0

    async def initial_observation(self) -> tuple[list[int], StopCondition]:
        return chat_tokens(self.tokenizer, f"Let's play a game. I picked a number from 1 to {self.max_number}. "
                                           f"Guess it in {self.guesses} tries; after each guess I say higher or "
                                           "lower. Reply with the number only."), []

    async def step(self, action: list[int]) -> StepResult:
        match = re.search(r"-?\d+", completion_text(self.tokenizer, action))
        self.taken += 1
        if match and int(match.group()) == self.secret:  # fewer guesses, more reward: 1 for the first, 0.5 last
            reward = 1.0 - 0.5 * (self.taken - 1) / max(self.guesses - 1, 1)
            return StepResult(reward=reward, episode_done=True, metrics={"accuracy": 1.0, "guesses": self.taken})
        if self.taken == self.guesses:
            return StepResult(reward=0.0, episode_done=True, metrics={"accuracy": 0.0, "guesses": self.taken})
        answer = ("Reply with one number." if match is None else
                  "Higher." if int(match.group()) < self.secret else "Lower.")
        return StepResult(reward=0.0, episode_done=False,
                          next_observation=message_tokens(self.tokenizer, {"role": "user", "content": answer}))


@dataclass(frozen=True)
class GuessNumber:
    name: str = "guess_number"
    max_number: int = 8
    guesses: int = 4

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[EnvGroup]:
        rng = random.Random(f"{split}:{seed}")
        return [EnvGroup(partial(GuessNumberEnv, rng.randint(1, self.max_number), self.max_number, self.guesses,
                                 tokenizer), group_size) for _ in range(count)]


ENVIRONMENTS = {"calculator": Calculator, "guess_number": GuessNumber}


def make_environment(name: str, params: dict):
    """The environment called `name` with its settings; an unknown name or setting is named."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}: known are {', '.join(ENVIRONMENTS)}")
    try:
        return ENVIRONMENTS[name](**params)
    except TypeError as error:
        raise ValueError(f"env.params for {name}: {error}") from None
