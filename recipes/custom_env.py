"""Your own multi-turn environment in the RL loop: an `Env` and a group maker in thirty lines (docs/environments.md).

    .venv/bin/python recipes/custom_env.py                  # SmolLM2-135M-Instruct, 30 steps
    .venv/bin/python recipes/custom_env.py model=tiny steps=2 eval_prompts=4 algo.prompts_per_step=4

The user says a number and the model answers with the next one, three times; an episode ends at the first
wrong answer. An environment is any object with `name` and `groups(count, seed=, split=, group_size=,
tokenizer=)` (rl.env.Environment). Arguments are the same `key=value` overrides `rl-train` takes; the run folder
is outputs/custom_env/DATE_TIME.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from functools import partial

from rl.chat import chat_tokens, completion_text, message_tokens
from rl.env import EnvGroup, StepResult
from rl.train import run_from_python


@dataclass
class CountUp:
    start: int
    tokenizer: object
    turn: int = 0

    async def initial_observation(self):
        return chat_tokens(self.tokenizer, f"Count up from {self.start}: reply with the next number only."), []

    async def step(self, action: list[int]) -> StepResult:
        self.turn += 1
        right = completion_text(self.tokenizer, action).strip() == str(self.start + self.turn)
        if self.turn == 3 or not right:  # a third of the reward for each number in a row
            return StepResult(reward=(self.turn - (not right)) / 3, episode_done=True,
                              metrics={"accuracy": float(right)})
        return StepResult(reward=0.0, episode_done=False,
                          next_observation=message_tokens(self.tokenizer, {"role": "user", "content": "Next."}))


@dataclass(frozen=True)
class Counting:
    name: str = "counting"

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[EnvGroup]:
        rng = random.Random(f"{split}:{seed}")
        return [EnvGroup(partial(CountUp, rng.randrange(1, 90), tokenizer), group_size) for _ in range(count)]


if __name__ == "__main__":
    run_from_python(Counting(), name="custom_env", overrides=["recipe=arithmetic_rl", "algo.max_tokens=8",
                                                              *sys.argv[1:]])
