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

from rl.answers import strict_answer
from rl.chat import chat_tokens, completion_text, message_tokens
from rl.env import EnvGroup, StepResult, StopCondition
from rl.tasks import INSTRUCTION
from rl.tools import CALCULATOR, Tool, call_tool, tool_call_text, tools_prompt

EXAMPLES = ((125, 431, 268), (310, 582, 417), (733, 164, 905))
"""Worked examples shown before the question (`examples`): each a question, a call, its result, the answer."""


def sum_question(numbers) -> str:
    return f"What is {' + '.join(map(str, numbers))}? Use the calculator."


@dataclass
class CalculatorEnv:
    numbers: list[int]
    tokenizer: object
    examples: int = 3
    call_reward: float = 0.0
    """Reward (training only: evaluation reports `accuracy`) for a wrong final answer after a valid call."""
    tools: list[Tool] = field(default_factory=lambda: [CALCULATOR])
    calls: int = 0
    valid_calls: int = 0

    async def initial_observation(self) -> tuple[list[int], StopCondition]:
        # Without worked examples SmolLM2-135M-Instruct called the tool in 0 of 128 replies; with three, 62 of 64
        # (docs/environments.md).
        messages = []
        for numbers in EXAMPLES[:self.examples]:
            expression = " + ".join(map(str, numbers))
            messages += [{"role": "user", "content": sum_question(numbers)},
                         {"role": "assistant", "content": tool_call_text("calculator", {"expression": expression})},
                         {"role": "tool", "content": str(sum(numbers))},
                         {"role": "assistant", "content": f"Answer: {sum(numbers)}"}]
        messages.append({"role": "user", "content": sum_question(self.numbers)})
        messages[0]["content"] = f"{tools_prompt(self.tools)}\n{INSTRUCTION}\n{messages[0]['content']}"
        return chat_tokens(self.tokenizer, messages), []

    async def step(self, action: list[int]) -> StepResult:
        text = completion_text(self.tokenizer, action)
        call = call_tool(self.tools, text)
        if call is None:  # no tool call: the reply is final
            correct = strict_answer(text) == sum(self.numbers)
            reward = 1.0 if correct else self.call_reward if self.valid_calls else 0.0
            return StepResult(reward=reward, episode_done=True, metrics={
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
    examples: int = 3
    call_reward: float = 0.0

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[EnvGroup]:
        rng = random.Random(f"{split}:{seed}")
        low, high = 10 ** (self.digits - 1), 10 ** self.digits
        return [EnvGroup(partial(CalculatorEnv, [rng.randrange(low, high) for _ in range(self.terms)], tokenizer,
                                 self.examples, self.call_reward), group_size) for _ in range(count)]


@dataclass
class GuessNumberEnv:
    secret: int
    max_number: int
    guesses: int
    tokenizer: object
    format_reward: float = 0.0
    """Reward (training only) for an unsuccessful game, times the share of its replies that were a number in
    1..max_number: where the model rarely answers with a number at all, groups carry signal from the start."""
    taken: int = 0
    well_formed: int = 0

    async def initial_observation(self) -> tuple[list[int], StopCondition]:
        return chat_tokens(self.tokenizer, f"Let's play a game. I picked a number from 1 to {self.max_number}. "
                                           f"Guess it in {self.guesses} tries; after each guess I say higher or "
                                           "lower. Reply with the number only."), []

    async def step(self, action: list[int]) -> StepResult:
        match = re.search(r"-?\d+", completion_text(self.tokenizer, action))
        guess = int(match.group()) if match else None
        self.taken += 1
        self.well_formed += guess is not None and 1 <= guess <= self.max_number
        metrics = {"guesses": self.taken, "well_formed": self.well_formed / self.taken}
        if guess == self.secret:  # fewer guesses, more reward: 1 for the first, 0.5 for the last
            reward = 1.0 - 0.5 * (self.taken - 1) / max(self.guesses - 1, 1)
            return StepResult(reward=reward, episode_done=True, metrics={"accuracy": 1.0, **metrics})
        if self.taken == self.guesses:
            return StepResult(reward=self.format_reward * metrics["well_formed"], episode_done=True,
                              metrics={"accuracy": 0.0, **metrics})
        answer = "Reply with one number." if guess is None else "Higher." if guess < self.secret else "Lower."
        return StepResult(reward=0.0, episode_done=False,
                          next_observation=message_tokens(self.tokenizer, {"role": "user", "content": answer}))


@dataclass(frozen=True)
class GuessNumber:
    name: str = "guess_number"
    max_number: int = 8
    guesses: int = 4
    format_reward: float = 0.0

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[EnvGroup]:
        """Training draws secrets with repeats; evaluation plays each secret at most once, in an order `seed`
        shuffles: the prompt never shows the secret, so a greedy policy plays a secret's game the same way every
        time, and repeats would only weigh some secrets more than others."""
        rng = random.Random(f"{split}:{seed}")
        if split == "eval":
            if count > self.max_number:
                raise ValueError(f"guess_number has {self.max_number} games (secrets 1..{self.max_number}); "
                                 f"{count} held-out games asked for (eval_prompts <= {self.max_number})")
            secrets = rng.sample(range(1, self.max_number + 1), count)
        else:
            secrets = [rng.randint(1, self.max_number) for _ in range(count)]
        return [EnvGroup(partial(GuessNumberEnv, secret, self.max_number, self.guesses, tokenizer,
                                 self.format_reward), group_size) for secret in secrets]


ENVIRONMENTS = {"calculator": Calculator, "guess_number": GuessNumber}


def make_environment(name: str, params: dict):
    """The environment called `name` with its settings; an unknown name or setting is named."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}: known are {', '.join(ENVIRONMENTS)}")
    try:
        return ENVIRONMENTS[name](**params)
    except TypeError as error:
        raise ValueError(f"env.params for {name}: {error}") from None
