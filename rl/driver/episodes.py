"""Running episodes against the sampler pool, and turning them into training sequences.

Many episodes are in flight at once: every group of a step, and every episode of a group, runs concurrently,
each turn one sample request (the pool's engines batch whatever is waiting, and prefix caching reuses the
conversation's earlier turns); an environment's `step` is awaited without holding up the others. The G episodes
of a group start from the same observation in most environments, so their first turn is one request for G
samples.

An episode ends when the environment says so ("done") or at a limit, named in its `stop`: "max_turns",
"max_sampled_tokens" (the episode's sampled tokens), or "context" (the next prompt would leave no room in
model.max_model_len). An environment that raises, or answers with something that is not tokens, fails the step
with an error naming the environment, the group, the episode and the turn, before anything is trained.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from rl.config import TrainConfig
from rl.env import EnvGroupBuilder, StopCondition
from rl.sampler import SamplerPool
from rl.types import Datum, ModelInput, SampledSequence, SampleRequest, SamplingParams

STOPS = ("done", "max_turns", "max_sampled_tokens", "context")


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    """Per action (algo.max_tokens)."""
    max_turns: int
    max_sampled_tokens: int
    context: int
    """model.max_model_len: a prompt and its action fit in it."""
    vocab_size: int


@dataclass
class Turn:
    prompt: list[int]
    """Everything the sampler was given: the conversation so far."""
    action: SampledSequence
    reward: float
    metrics: dict[str, float]


@dataclass
class Episode:
    turns: list[Turn]
    stop: str
    """One of STOPS."""
    rerendered_turns: int = 0
    """Turns whose prompt did not extend the previous prompt and action (a re-rendering environment)."""
    group_reward: float = 0.0
    group_metrics: dict[str, float] = field(default_factory=dict)
    reference: str | None = None
    """The right answer, where its environment gives one (`Env.reference`): what a judge's question may quote."""

    @property
    def total_reward(self) -> float:
        return sum(turn.reward for turn in self.turns) + self.group_reward

    def rewards_to_go(self) -> list[float]:
        """Each turn's reward and those after it, the group reward included."""
        to_go, running = [], self.group_reward
        for turn in reversed(self.turns):
            running += turn.reward
            to_go.append(running)
        return to_go[::-1]

    @property
    def metrics(self) -> dict[str, float]:
        """The last turn's metrics and the group's (where `accuracy` is reported)."""
        return {**self.turns[-1].metrics, **self.group_metrics}


def episode_limits(config: TrainConfig, tokenizer) -> Limits:
    env = config.env
    return Limits(max_tokens=config.algo.max_tokens, max_turns=env.max_turns,
                  max_sampled_tokens=env.max_sampled_tokens or env.max_turns * config.algo.max_tokens,
                  context=config.model.max_model_len, vocab_size=len(tokenizer))


def episode_seed(base: int, episode: int) -> int:
    """The sampling seed of an episode's first turn, from its group's seed (turn t samples with this + t):
    distinct up to 32-bit collisions. (The trailing ":0" kept the seeds of the runs docs/environments.md reports;
    since `group_seed` their shared first turns sample differently.)"""
    return zlib.crc32(f"{base}:{episode}:0".encode())


def group_seed(base: int | None) -> int | None:
    """The seed of a group's one request for all its first turns. vLLM seeds that request's n samples with seed,
    seed + 1, ..., so groups seeded base, base + 1, ... would share n - 1 of their samples' noise (on one prompt,
    the same samples); hashed, they share none up to 32-bit collisions."""
    return None if base is None else zlib.crc32(f"{base}:group".encode())


async def run_group(pool: SamplerPool, builder: EnvGroupBuilder, *, name: str, where: str, model_path: str | None,
                    params: SamplingParams, limits: Limits) -> list[Episode]:
    """The episodes of one group, run concurrently, with the group's rewards added. `params.seed` seeds them."""
    envs = await _env_call(builder.make_envs(), name, f"{where}: make_envs")
    starts = await asyncio.gather(*(_env_call(env.initial_observation(), name, f"{where}, episode {index}, "
                                              "initial_observation") for index, env in enumerate(envs)))
    for index, (prompt, _) in enumerate(starts):
        _check_tokens(prompt, limits, name, f"{where}, episode {index}: initial observation")
        if len(prompt) >= limits.context:
            raise ValueError(f"environment {name!r}, {where}, episode {index}: the initial observation has "
                             f"{len(prompt)} tokens, no room in the context of {limits.context} "
                             "(model.max_model_len)")
    first_actions = [None] * len(envs)
    if len(envs) > 1 and all(start == starts[0] for start in starts):
        prompt, stop = starts[0]
        response = await pool.sample(_request(prompt, stop, len(envs), model_path, params, group_seed(params.seed),
                                              _room(prompt, 0, limits)))
        first_actions = response.sequences
    episodes = await asyncio.gather(*(
        run_episode(pool, env, start, first_action=first, name=name, where=f"{where}, episode {index}",
                    model_path=model_path, params=params, seed=episode_seed(params.seed or 0, index),
                    limits=limits)
        for index, (env, start, first) in enumerate(zip(envs, starts, first_actions, strict=True))))
    group = await _env_call(builder.compute_group_rewards(episodes, envs), name, f"{where}: compute_group_rewards")
    if len(group) != len(episodes):
        raise ValueError(f"environment {name!r}, {where}: compute_group_rewards gave {len(group)} rewards for "
                         f"{len(episodes)} episodes")
    for env, episode, (reward, metrics) in zip(envs, episodes, group, strict=True):
        episode.group_reward, episode.group_metrics = float(reward), dict(metrics)
        episode.reference = getattr(env, "reference", None)
    return episodes


async def run_episode(pool: SamplerPool, env, start: tuple[list[int], StopCondition], *,
                      first_action: SampledSequence | None, name: str, where: str, model_path: str | None,
                      params: SamplingParams, seed: int, limits: Limits) -> Episode:
    prompt, stop = start
    turns: list[Turn] = []
    sampled = rerendered = 0
    while True:
        here = f"{where}, turn {len(turns)}"
        if turns or first_action is None:
            response = await pool.sample(_request(prompt, stop, 1, model_path, params, seed + len(turns),
                                                  _room(prompt, sampled, limits)))
            action = response.sequences[0]
        else:
            action = first_action
        sampled += len(action.tokens)
        result = await _env_call(env.step(list(action.tokens)), name, f"{here}: step")
        turns.append(Turn(prompt, action, float(result.reward), dict(result.metrics)))
        if result.episode_done:
            return Episode(turns, "done", rerendered)
        so_far = prompt + action.tokens
        if result.next_prompt is not None:
            next_prompt = _check_tokens(result.next_prompt, limits, name, f"{here}: next_prompt")
            rerendered += next_prompt[:len(so_far)] != so_far
        else:
            next_prompt = so_far + _check_tokens(result.next_observation, limits, name, f"{here}: next_observation")
        if result.next_stop_condition is not None:
            stop = result.next_stop_condition
        for limit, reached in (("max_turns", len(turns) >= limits.max_turns),
                               ("max_sampled_tokens", sampled >= limits.max_sampled_tokens),
                               ("context", len(next_prompt) >= limits.context)):
            if reached:
                return Episode(turns, limit, rerendered)
        prompt = next_prompt


async def held_out_episodes(pool: SamplerPool, name: str, groups: list[EnvGroupBuilder], model_path: str | None,
                            limits: Limits, params: SamplingParams) -> list[list[Episode]]:
    """The episodes of each held-out group (a problem's eval_samples answers), sampled with `params` (greedy, or
    seeded by the group's index: every evaluation draws the same noise)."""
    return list(await asyncio.gather(*(
        run_group(pool, builder, name=name, where=f"evaluation, group {index}", model_path=model_path,
                  params=params.model_copy(update={"seed": index}) if params.temperature else params, limits=limits)
        for index, builder in enumerate(groups))))


def mean_metrics(episodes: list[Episode], prefix: str) -> dict[str, float]:
    """The environment's own metrics (of each episode's last turn and its group reward), each averaged over the
    episodes that report it, as PREFIX/NAME."""
    metrics = {}
    for name in sorted({name for episode in episodes for name in episode.metrics}):
        values = [episode.metrics[name] for episode in episodes if name in episode.metrics]
        metrics[f"{prefix}/{name}"] = sum(values) / len(values)
    return metrics


def held_out_metrics(episodes_P: list[list[Episode]], *, answered: bool = True) -> dict[str, float]:
    """eval/accuracy: the mean over every episode of its `accuracy` metric (its total reward where the environment
    reports none); with k > 1 episodes a problem, eval/pass@k too: the mean over problems of their best episode's;
    and the environment's other metrics as eval/NAME. `answered=False`: problems without answers (prompts alone),
    so the environment's other metrics only."""
    if not answered:
        return {name: value for name, value in mean_metrics([episode for group in episodes_P for episode in group],
                                                             "eval").items() if name != "eval/accuracy"}
    scores_P = [[episode.metrics.get("accuracy", episode.total_reward) for episode in group] for group in episodes_P]
    scores = [score for scores_G in scores_P for score in scores_G]
    metrics = {**mean_metrics([episode for group in episodes_P for episode in group], "eval"),
               "eval/accuracy": sum(scores) / len(scores)}
    per_problem = len(scores_P[0])
    if per_problem > 1:
        metrics[f"eval/pass@{per_problem}"] = sum(max(scores_G) for scores_G in scores_P) / len(scores_P)
    return metrics


def transcript(episode: Episode, decode: Callable[[list[int]], str]) -> dict:
    """An episode as text, to read: each turn's observation (the first prompt whole, then what the environment
    added after the previous action, or the whole prompt again where it re-rendered the conversation), action,
    why the action stopped ("stop": a stop token; "length": max_tokens or the room left) and reward."""
    turns, so_far = [], []
    for turn in episode.turns:
        added = turn.prompt[len(so_far):] if turn.prompt[:len(so_far)] == so_far else turn.prompt
        turns.append({"observation": decode(added), "action": decode(turn.action.tokens),
                      "stop_reason": turn.action.stop_reason, "reward": turn.reward})
        so_far = [*turn.prompt, *turn.action.tokens]
    return {"reward": episode.total_reward, "stop": episode.stop, "metrics": episode.metrics, "turns": turns}


def _room(prompt: list[int], sampled: int, limits: Limits) -> int:
    return min(limits.max_tokens, limits.max_sampled_tokens - sampled, limits.context - len(prompt))


def _request(prompt: list[int], stop: StopCondition, samples: int, model_path: str | None, params: SamplingParams,
             seed: int | None, max_tokens: int) -> SampleRequest:
    return SampleRequest(prompt=ModelInput.from_ints(prompt), num_samples=samples, model_path=model_path,
                         sampling_params=params.model_copy(update={"seed": seed, "max_tokens": max_tokens,
                                                                   "stop": stop or params.stop}))


async def _env_call(awaitable, name: str, where: str):
    try:
        return await awaitable
    except Exception as error:
        raise RuntimeError(f"environment {name!r} raised in {where}: {error!r}") from error


def _check_tokens(tokens, limits: Limits, name: str, where: str) -> list[int]:
    if not isinstance(tokens, list) or not all(type(token) is int and 0 <= token < limits.vocab_size
                                               for token in tokens):
        shown = repr(tokens)[:80]
        raise ValueError(f"environment {name!r}, {where}: not a list of token ids below {limits.vocab_size}: "
                         f"{shown}")
    return tokens


# ---- training sequences --------------------------------------------------------------------------------------


@dataclass
class TrainingSequence:
    """One training sequence: its tokens and, per token, whether it is an action token (the others are prompt
    and observation tokens), the sampler's logprob of it and its advantage (both 0 off the actions)."""

    tokens: list[int] = field(default_factory=list)
    actions: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)

    def datum(self, advantage_scale: float) -> Datum:
        """Weight 1 on action tokens, 0 elsewhere: no loss on what the policy did not sample."""
        return Datum.next_token(self.tokens, weights=[float(action) for action in self.actions],
                                logprobs=self.logprobs, advantages=[a * advantage_scale for a in self.advantages])

    def reply_datum(self) -> Datum:
        """As a side of a pair (the pair losses' layout): weight 1 on the action tokens, nothing else."""
        return Datum.next_token(self.tokens, weights=[float(action) for action in self.actions])


def episode_sequences(episode: Episode, turn_advantages: list[float]) -> list[TrainingSequence]:
    """An episode as one sequence (prompt, action, observation, action, ...) while each turn's prompt extends the
    previous turn's prompt and action; a new sequence wherever it does not (a re-rendered turn)."""
    sequences: list[TrainingSequence] = []
    for turn, advantage in zip(episode.turns, turn_advantages, strict=True):
        if not sequences or turn.prompt[:len(sequences[-1].tokens)] != sequences[-1].tokens:
            sequences.append(TrainingSequence())
        current = sequences[-1]
        observation, action = turn.prompt[len(current.tokens):], turn.action.tokens
        current.tokens += observation + action
        current.actions += [False] * len(observation) + [True] * len(action)
        current.logprobs += [0.0] * len(observation) + list(turn.action.logprobs)
        current.advantages += [0.0] * len(observation) + [advantage] * len(action)
    return sequences
