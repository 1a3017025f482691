"""tinker-cookbook environments in rl's RL loop, unchanged, through a thin adapter (needs the `compat` extra).

The cookbook's `Env` speaks `tinker.ModelInput` and gives each next observation as the whole next prompt, often
re-rendered from its own message history; rl's speaks tokens. So each cookbook observation becomes a
`next_prompt`, and the loop checks that it extends the tokens that were sampled: a cookbook environment whose
renderer changes the model's own turn (drops reasoning, re-tokenises text) is trained as one sequence per turn
and counted in `env/rerendered_turns`, instead of silently training tokens that were never sampled.

    train, test = asyncio.run(SomeCookbookDatasetBuilder(...)())
    rl_loop.train(config, CookbookEnvironment("name", train, test))

The cookbook's dataset fixes its groups' sizes and its batches' contents: a step's groups are the dataset's
batches from index (seed mod its length) on, `algo.prompts_per_step` of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rl.env import StepResult


@dataclass
class CookbookEnv:
    env: Any
    """A tinker_cookbook.rl.types.Env."""

    async def initial_observation(self) -> tuple[list[int], list]:
        start = await self.env.initial_observation()
        if not isinstance(start, tuple):  # the cookbook's InitialObservationOverflow
            raise ValueError(f"the initial observation overflows the cookbook environment's budget: {start!r}")
        observation, stop = start
        return observation.to_ints(), list(stop)

    async def step(self, action: list[int]) -> StepResult:
        result = await self.env.step(action)
        return StepResult(reward=result.reward, episode_done=result.episode_done,
                          next_prompt=None if result.episode_done else result.next_observation.to_ints(),
                          next_stop_condition=list(result.next_stop_condition), metrics=dict(result.metrics))


@dataclass
class CookbookGroup:
    builder: Any
    """A tinker_cookbook.rl.types.EnvGroupBuilder."""

    async def make_envs(self) -> list[CookbookEnv]:
        return [CookbookEnv(env) for env in await self.builder.make_envs()]

    async def compute_group_rewards(self, episodes: list, envs: list[CookbookEnv]) -> list[tuple[float, dict]]:
        """The cookbook's group rewards, given its own Trajectory records of the episodes."""
        from tinker import ModelInput
        from tinker_cookbook.completers import TokensWithLogprobs
        from tinker_cookbook.rl.types import Trajectory, Transition

        trajectories = [Trajectory(transitions=[
            Transition(ob=ModelInput.from_ints(turn.prompt), reward=turn.reward, metrics=turn.metrics,
                       ac=TokensWithLogprobs(turn.action.tokens, turn.action.logprobs, turn.action.stop_reason),
                       episode_done=index == len(episode.turns) - 1) for index, turn in enumerate(episode.turns)],
            final_ob=ModelInput.empty()) for episode in episodes]
        return list(await self.builder.compute_group_rewards(trajectories, [env.env for env in envs]))


@dataclass
class CookbookEnvironment:
    """A cookbook RLDataset (and its test set, for evaluation) as an rl Environment."""

    name: str
    train: Any
    test: Any | None = None

    def groups(self, count: int, *, seed: int, split: str, group_size: int, tokenizer) -> list[CookbookGroup]:
        dataset = self.train if split == "train" else self.test
        if dataset is None:
            raise ValueError(f"cookbook environment {self.name!r} has no test set to evaluate on: set eval_every=0")
        builders: list = []
        index = seed % len(dataset)
        while len(builders) < count:
            builders += dataset.get_batch(index)
            index = (index + 1) % len(dataset)
        return [CookbookGroup(builder) for builder in builders[:count]]
