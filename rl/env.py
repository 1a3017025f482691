"""Environments: what the RL loop rolls out. An episode is a conversation in tokens between the policy and an
environment, over one or more turns.

The shapes are tinker-cookbook's (rl/types.py there), in tokens: an `Env` gives an initial observation (the
prompt's tokens) and a stop condition; the policy's action is exactly the tokens the sampler produced; `step`
answers with a reward, whether the episode is done, and the next observation's tokens, which the loop appends to
the conversation (prompt + action + observation: the model's own tokens are never re-rendered from text). An
environment that keeps its own history format may instead give the whole next prompt (`next_prompt`); the loop
then checks whether it still extends what was sampled, and counts the turns where it does not.

An `EnvGroupBuilder` makes the G episodes of one problem (the group that advantages are relative to) and may add
a reward per episode once the whole group has finished (`compute_group_rewards`, e.g. a pairwise judge). An
`Environment` hands out group builders for a step, deterministically from a seed, as a `Task` hands out
problems. A single-turn task is the one-step case (`TaskEnvironment`), so the RL loop has one rollout path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from rl.chat import chat_tokens, completion_text
from rl.tasks import Problem, Task, checked_problems

StopCondition = list[str] | list[int]
"""Stop strings or stop token ids for the next action; empty: the tokenizer's end of sequence only."""


@dataclass
class StepResult:
    reward: float
    episode_done: bool
    next_observation: list[int] = field(default_factory=list)
    """Tokens the loop appends to the conversation after the action (unused once the episode is done)."""
    next_stop_condition: StopCondition | None = None
    """None keeps the current one."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Averaged over episodes into the step's metrics as env/NAME. On the last step, `accuracy` (0 or 1) is what
    evaluation reports; without it, evaluation reports the episode's total reward."""
    next_prompt: list[int] | None = None
    """A re-rendering environment's whole next prompt, instead of `next_observation`."""


class Env(Protocol):
    """May also have `reference`: the right answer, as text, which a judge's question quotes as {answer}
    (rl/judge.py); a task's episodes give their problem's."""

    async def initial_observation(self) -> tuple[list[int], StopCondition]: ...

    async def step(self, action: list[int]) -> StepResult: ...


class EnvGroupBuilder(Protocol):
    async def make_envs(self) -> Sequence[Env]: ...

    async def compute_group_rewards(self, episodes: list, envs: Sequence[Env]) -> list[tuple[float, dict]]:
        """A reward (and metrics) per finished episode that depends on the whole group; added to its return."""
        ...


class Environment(Protocol):
    name: str

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[EnvGroupBuilder]:
        """`count` groups of `group_size` episodes each, the same for the same arguments."""
        ...


# ---- a single-turn task as the one-step environment ----------------------------------------------------------


@dataclass
class TaskEnv:
    """One problem of a task: the user's message rendered with the chat template, one reply, scored."""

    task: Task
    problem: Problem
    tokenizer: object

    @property
    def reference(self) -> str | None:
        return self.problem.answer

    async def initial_observation(self) -> tuple[list[int], StopCondition]:
        return chat_tokens(self.tokenizer, self.problem.messages), []

    async def step(self, action: list[int]) -> StepResult:
        completion = completion_text(self.tokenizer, action)
        if hasattr(self.task, "score"):  # all three at once (your files' scorer: rl.tasks.FileTask)
            reward, accuracy, metrics = await self.task.score(self.problem, completion)
        else:
            reward, accuracy = self.task.reward(self.problem, completion), self.task.accuracy(self.problem, completion)
            metrics = self.task.metrics(self.problem, completion) if hasattr(self.task, "metrics") else {}
        return StepResult(reward=float(reward), episode_done=True, metrics={**metrics, "accuracy": float(accuracy)})


@dataclass
class EnvGroup:
    """`size` episodes of environments made by `make_env` (one problem, fresh state each), rewarded per episode
    only."""

    make_env: Callable[[], Env]
    size: int

    async def make_envs(self) -> list[Env]:
        return [self.make_env() for _ in range(self.size)]

    async def compute_group_rewards(self, episodes: list, envs: Sequence[Env]) -> list[tuple[float, dict]]:
        return [(0.0, {}) for _ in episodes]


@dataclass
class TaskEnvironment:
    """A `Task` as an environment: each problem is a group of one-turn episodes."""

    task: Task

    @property
    def name(self) -> str:
        return self.task.name

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[EnvGroup]:
        return [EnvGroup(partial(TaskEnv, self.task, problem, tokenizer), group_size)
                for problem in checked_problems(self.task, count, seed=seed, split=split)]


def as_environment(source: Task | Environment) -> Environment:
    """An environment as it is; a task as its one-step environment."""
    return source if hasattr(source, "groups") else TaskEnvironment(source)
