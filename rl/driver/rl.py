"""The RL loop, top to bottom: rollout -> reward -> advantages -> forward_backward -> optim_step -> publish.

Group-relative advantages (GRPO-style, without a learned critic): each problem is a group of `group_size`
episodes (of one turn, for a task; rl/env.py), and an episode's advantage is its return minus its group's mean
(optionally divided by the group's standard deviation), so only groups whose episodes differ teach anything.
The loss is normalised by the number of sampled tokens through the advantages, because Tinker's losses sum over
tokens.

Rewards come from the environment, or from a judge (`judge.adapter`: rl/judge.py), the probability that it calls
each episode's last reply right. Options: a KL penalty against the reference (`algo.kl_coef`; `algo.reference`: the
weights the run starts from, or the base model), folded into each token's advantage as -kl_coef * (sampler logprob -
reference logprob); on-policy distillation, the same penalty against a teacher (an adapter, `algo.teacher`, or
another model with the same tokenizer, `algo.teacher_model`), the rewards weighted by `algo.reward_coef` (0: the
teacher alone); and one-step off-policy (`algo.off_policy`): the rollout of step k+1 is sampled, from the weights of
step k, while step k trains, and step k's weights are published once it has finished (so every turn of its episodes
comes from one version, which merge mode's replicas need: they serve one). The sampler's logprobs come from the
weights that sampled (each response names them), so the importance ratio corrects for the lag. And several optimizer
steps per rollout (`algo.num_substeps`), one per minibatch of the step's sequences, as tinker-cookbook's: the ratio
corrects the later minibatches likewise. With a loss over pairs (`dpo`, `ipo`, `simpo`) in place of a policy loss,
each group's best and worst episode are a (chosen, rejected) pair: online DPO (`group_pairs`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from rl.config import TrainConfig
from rl.driver.episodes import (
    STOPS,
    Episode,
    TrainingSequence,
    episode_limits,
    episode_sequences,
    mean_metrics,
    run_group,
)
from rl.driver.run import (
    Run,
    Shared,
    adam_params,
    evaluates,
    held_out_groups,
    steps,
    timed_evaluation,
    wait_for_sampler,
)
from rl.env import Environment, as_environment
from rl.judge import judge_episodes
from rl.losses import PAIR_METRICS
from rl.metrics import timed
from rl.sampler import AdapterVersion
from rl.tasks import Task
from rl.types import Datum, ForwardBackwardInput, SamplingParams


def turn_advantages(episodes_G: list[Episode], *, reward_to_go: bool, normalize: bool) -> list[list[float]]:
    """Each episode's advantage on each of its turns: its total reward relative to the group's mean (on every turn
    alike), or, with `reward_to_go`, the reward from that turn on relative to the same mean; divided by the
    group's spread with `normalize`: the standard deviation of its totals, or with `reward_to_go` the root mean
    square of every turn's value less that mean (the totals of a group can agree while its rewards to go differ,
    and dividing those by a zero standard deviation would blow them up a millionfold)."""
    totals_G = [episode.total_reward for episode in episodes_G]
    # Totals that agree are their own mean: a sum's rounding would leave advantages of 1e-17, which would train.
    mean = totals_G[0] if len(set(totals_G)) == 1 else sum(totals_G) / len(totals_G)
    returns_G = [episode.rewards_to_go() if reward_to_go else [episode.total_reward] * len(episode.turns)
                 for episode in episodes_G]
    centered_G = [[value - mean for value in returns] for returns in returns_G]
    scale = 1.0
    if normalize:
        spread = [value for centered in centered_G for value in centered] if reward_to_go else [
            total - mean for total in totals_G]
        scale = math.sqrt(sum(value * value for value in spread) / len(spread)) + 1e-6
    return [[value / scale for value in centered] for centered in centered_G]


def kl_penalty(sequences: list[TrainingSequence], reference_S: list[list[float]], coef: float,
               discount: float = 0.0) -> float:
    """Subtracts coef * (sampler logprob - reference logprob) from each action token's advantage, or with
    `discount` the discounted sum of those differences from that token to the sequence's end (tinker-cookbook's
    kl_discount_factor: a token also pays for the KL of what follows it; tokens between turns are steps of
    difference 0); returns the differences' mean, a one-sample estimate of KL(sampler || reference) per token.
    reference_S: per target (tokens[1:])."""
    gaps = []
    for sequence, reference_T in zip(sequences, reference_S, strict=True):
        gap_T = [sequence.logprobs[index] - reference_T[index - 1] if sequence.actions[index] else 0.0
                 for index in range(1, len(sequence.tokens))]
        to_end = 0.0
        for index in range(len(sequence.tokens) - 1, 0, -1):
            to_end = gap_T[index - 1] + discount * to_end
            if sequence.actions[index]:
                sequence.advantages[index] -= coef * to_end
        gaps += [gap for gap, action in zip(gap_T, sequence.actions[1:], strict=True) if action]
    return sum(gaps) / max(len(gaps), 1)


def sampler_vs_learner(sampler_S: list[list[float]], learner_S: list[list[float]]) -> dict[str, float]:
    """How far the learner's logprobs of the sampled tokens are from the sampler's: the mean of (sampler - learner)
    and half its mean square, two estimates of KL(sampler || learner) per token (tinker-cookbook logs them as
    kl_sample_train_v1 and _v2). On-policy both weights are the same, so they measure the mismatch between the
    engines (~1e-6: other kernels) and any token that was trained but not sampled as it stands (a template or
    re-tokenisation bug); off-policy they add the one step of lag the importance ratio corrects."""
    gaps = [s - lp for sampled, learned in zip(sampler_S, learner_S, strict=True)
            for s, lp in zip(sampled, learned, strict=True)]
    return {"kl/sampler_vs_learner": sum(gaps) / len(gaps),
            "kl/sampler_vs_learner_sq": sum(gap * gap for gap in gaps) / (2 * len(gaps))}


def action_values(sequence: TrainingSequence, per_target: list[float]) -> list[float]:
    """The values of `per_target` (one per token after the first) at the sequence's action tokens."""
    return [value for value, action in zip(per_target, sequence.actions[1:], strict=True) if action]


STEPS_PER_SEED = 100_003
"""Step seeds are seed * STEPS_PER_SEED + step: distinct for every (seed, step) of runs under 100,003 steps."""
PROMPTS_PER_STEP_SEED = 1_000
"""A group's sampling seed is step seed * PROMPTS_PER_STEP_SEED + group index: distinct for steps of up to 1,000
groups."""


@dataclass
class Rollout:
    episodes_P: list[list[Episode]]
    """A group of episodes for each of the step's problems."""
    weights_step: int
    """The loop step of the weights that sampled: how many steps had trained them."""
    seconds: float
    """How long the rollout took (off-policy, the step that uses it waits only for what is left of it)."""

    @property
    def episodes(self) -> list[Episode]:
        return [episode for episodes_G in self.episodes_P for episode in episodes_G]


async def rollout(run: Run, environment: Environment, step: int, version: AdapterVersion, weights_step: int) -> Rollout:
    """The step's groups of episodes (seeded by seed and step), from weights `version`, those of step
    `weights_step`."""
    algo = run.config.algo
    step_seed = run.config.seed * STEPS_PER_SEED + step
    groups_P = environment.groups(algo.prompts_per_step, seed=step_seed, split="train", group_size=algo.group_size,
                                  tokenizer=run.tokenizer)
    params = SamplingParams(max_tokens=algo.max_tokens, temperature=algo.temperature)
    limits = episode_limits(run.config, run.tokenizer)
    started = time.perf_counter()
    episodes_P = await asyncio.gather(*(
        run_group(run.pool, builder, name=environment.name, where=f"step {step}, group {index}",
                  model_path=version.tinker_path, limits=limits,
                  params=params.model_copy(update={"seed": step_seed * PROMPTS_PER_STEP_SEED + index}))
        for index, builder in enumerate(groups_P)))
    return Rollout(episodes_P, weights_step, time.perf_counter() - started)


def group_advantages(config: TrainConfig, sampled: Rollout) -> list[list[list[float]]]:
    """Each episode's advantage on each of its turns, per group (`turn_advantages`), times algo.reward_coef."""
    coef = config.algo.reward_coef
    return [[[coef * value for value in turns] for turns in turn_advantages(
        episodes_G, reward_to_go=config.env.advantage == "reward_to_go", normalize=config.algo.normalize_std)]
        for episodes_G in sampled.episodes_P]


def group_pairs(config: TrainConfig, sampled: Rollout) -> list[TrainingSequence]:
    """For a loss over pairs (online DPO): each group's best and worst episode, chosen then rejected, where their
    totals differ (the first of equals), each as one training sequence; an episode that hit a limit is left out
    with env.truncated=drop, as one of several sequences (a re-rendered turn) is."""
    pairs = []
    for episodes_G in sampled.episodes_P:
        scored = []  # (total reward, sequence) of each episode that may pair
        for episode in episodes_G:
            sequences = episode_sequences(episode, [0.0] * len(episode.turns))
            if trains_on(config, episode) and len(sequences) == 1:
                scored.append((episode.total_reward, sequences[0]))
        if scored:
            (best, chosen), (worst, rejected) = (max(scored, key=lambda pair: pair[0]),
                                                 min(scored, key=lambda pair: pair[0]))
            if best > worst:
                pairs += [chosen, rejected]
    return pairs


def minibatch_datums(trained: list[TrainingSequence], count: int, *, sampled_tokens: int) -> list[list[Datum]]:
    """The sequences as datums in `count` minibatches (fewer with fewer sequences) of sizes within one of each other,
    in order. Advantages are divided by the step's sampled tokens (Tinker's losses sum over tokens) and multiplied by
    the number of minibatches: each minibatch's loss is on the scale of the whole step's, so one minibatch is the
    plain one-update step."""
    count = min(count, len(trained))
    scale = count / max(sampled_tokens, 1)
    return [[s.datum(scale) for s in trained[index * len(trained) // count:(index + 1) * len(trained) // count]]
            for index in range(count)]


def trains_on(config: TrainConfig, episode: Episode) -> bool:
    """Whether an episode trains: one that hit a limit does not with env.truncated=drop."""
    return episode.stop == "done" or config.env.truncated == "train"


def training_sequences(config: TrainConfig, sampled: Rollout,
                       advantages_P: list[list[list[float]]]) -> tuple[list[TrainingSequence], list[float]]:
    """Every episode's training sequences with its advantages (an episode that hit a limit is left out with
    env.truncated=drop), and every episode's total reward."""
    sequences, rewards = [], []
    for episodes_G, advantages_G in zip(sampled.episodes_P, advantages_P, strict=True):
        for episode, advantages in zip(episodes_G, advantages_G, strict=True):
            rewards.append(episode.total_reward)
            if trains_on(config, episode):
                sequences += episode_sequences(episode, advantages)
    return sequences, rewards


def episode_metrics(sampled: Rollout) -> dict[str, float]:
    """Turns per episode, the share of episodes ended by each limit, re-rendered turns, and the environment's own
    metrics (of each episode's last turn and its group reward) averaged over episodes."""
    episodes = sampled.episodes
    record = {"env/turns": sum(len(e.turns) for e in episodes) / len(episodes),
              "env/rerendered_turns": sum(e.rerendered_turns for e in episodes)}
    record.update({f"env/stop_{stop}": sum(e.stop == stop for e in episodes) / len(episodes) for stop in STOPS[1:]})
    return {**record, **mean_metrics(episodes, "env")}


def group_metrics(config: TrainConfig, sampled: Rollout) -> dict[str, float]:
    """The share of groups whose episodes all scored alike (`groups/uniform`): they train on no reward, being too easy
    or too hard (`groups/all_correct`, `groups/all_wrong`, where every episode reports an accuracy); and the sampler's
    entropy per token, estimated by the sampled tokens' mean -logprob (`sampler/entropy`, tinker-cookbook's
    optim/entropy): a policy collapsing onto one answer shows it falling towards 0."""
    reward_to_go = config.env.advantage == "reward_to_go"
    uniform = [not any(value for turns in turn_advantages(episodes_G, reward_to_go=reward_to_go, normalize=False)
                       for value in turns) for episodes_G in sampled.episodes_P]
    record = {"groups/uniform": sum(uniform) / len(uniform)}
    accuracy_P = [[episode.metrics.get("accuracy") for episode in episodes_G] for episodes_G in sampled.episodes_P]
    if all(value is not None for accuracy_G in accuracy_P for value in accuracy_G):
        record["groups/all_correct"] = sum(min(accuracy_G) == 1 for accuracy_G in accuracy_P) / len(accuracy_P)
        record["groups/all_wrong"] = sum(max(accuracy_G) == 0 for accuracy_G in accuracy_P) / len(accuracy_P)
    logprobs = [logprob for episode in sampled.episodes for turn in episode.turns for logprob in turn.action.logprobs]
    if logprobs:
        record["sampler/entropy"] = -sum(logprobs) / len(logprobs)
    return record


def step_metrics(record: dict, sampled: Rollout, rewards: list[float], datum_tokens: list[int]) -> dict:
    """The step's reward, sizes and throughputs; training time is every phase after sampling (the learner's)."""
    training_s = sum(record.get(f"time/{phase}_s", 0.0) for phase in ("judge", "reference", "forward_backward",
                                                                         "optim_step", "publish"))
    turns = [turn for episode in sampled.episodes for turn in episode.turns]
    sampled_tokens, trained_tokens = sum(len(turn.action.tokens) for turn in turns), sum(datum_tokens)
    return {"reward/mean": sum(rewards) / len(rewards), "datums": len(datum_tokens),
            "sampler/weights_step": sampled.weights_step, "tokens/prompt": sum(len(turn.prompt) for turn in turns),
            "tokens/sampled": sampled_tokens, "tokens/trained": trained_tokens, "time/training_s": training_s,
            "time/rollout_s": sampled.seconds,  # its whole length; time/sampling_s: the step's waits for the sampler
            "throughput/sampled_tokens_per_s": sampled_tokens / sampled.seconds,
            "throughput/trained_tokens_per_s": trained_tokens / max(training_s, 1e-9)}


async def train_async(config: TrainConfig, environment: Environment, shared: Shared | None = None) -> list[dict]:
    algo = config.algo
    # The held-out groups are made before any actor starts: an environment that gives none fails at once.
    held_out = held_out_groups(config, environment)
    with Run(config, shared) as run:
        # The weights published last and the step they come from: "sampler/weights_step" shows any lag.
        version, weights_step = await run.publish(run.start_step), run.start_step
        next_rollout = None

        def evaluate(step: int) -> Awaitable[dict]:  # the weights published last, bound now (it may run later)
            return run.answer_held_out(environment.name, held_out, version.tinker_path, step)

        for step in steps(run):
            record = await run.begin_step(step)

            # Rollout: a group of episodes per problem (off-policy: run while the previous step trained).
            with timed(record, "sampling"):
                sampled = await (next_rollout or rollout(run, environment, step, version, weights_step))
            next_rollout = (asyncio.ensure_future(rollout(run, environment, step + 1, version, weights_step))
                            if algo.off_policy and step + 1 < config.steps else None)
            # An evaluation, when due, of the weights published last: it samples beside the next rollout while the
            # learner trains (after the rollout this step waits for, never delaying it), and ends before the publish.
            evaluation = asyncio.ensure_future(timed_evaluation(evaluate(step))) if evaluates(config, step) else None

            # Rewards from the judge, where there is one: the probability that it calls each episode's last reply right
            # (pairwise: better than each other reply of its group, on average).
            if config.judge.adapter is not None:
                with timed(record, "judge"):
                    await judge_episodes(sampled.episodes_P, config.judge, run.tokenizer, run.judge_logprobs)

            # Group-relative advantages of the rewards, spread over each episode's action tokens.
            advantages_P = group_advantages(config, sampled)
            sequences, rewards = training_sequences(config, sampled, advantages_P)
            train_groups = config.logger.train_groups
            # (With a loss over pairs the advantages are not trained on: the rewards alone say which pair.)
            run.log_episodes(step, "train", sampled.episodes_P[:train_groups],
                             None if algo.pair_loss else advantages_P[:train_groups])
            record.update(episode_metrics(sampled), **group_metrics(config, sampled))

            # KL penalty: each action token's advantage pays for how far the sampler is from the reference (the
            # weights the run started from, or the base model), or with a teacher, from the teacher: distillation.
            if algo.kl_coef:
                with timed(record, "reference"):
                    reference_S = await run.reference_logprobs([s.tokens for s in sequences])
                kl_name = "kl/sampler_vs_teacher" if algo.distills else "kl/sampler_vs_reference"
                record[kl_name] = kl_penalty(sequences, reference_S, algo.kl_coef, algo.kl_discount)

            # Update: an optimizer step on each minibatch of the sequences that carry signal (with a loss over pairs,
            # on each group's best and worst episode: online DPO), then publish the weights.
            if algo.pair_loss:
                trained = group_pairs(config, sampled)
                minibatches = [[s.reply_datum() for s in trained]] if trained else []
                record["pairs"] = len(trained) // 2
            else:
                trained = [s for s in sequences if any(s.advantages)]
                minibatches = minibatch_datums(trained, algo.num_substeps,
                                               sampled_tokens=sum(map(sum, (s.actions for s in sequences))))
            datums_D = [datum for minibatch in minibatches for datum in minibatch]
            record["loss"] = 0.0  # a step in which every group scored alike has nothing to train on
            for index, minibatch in enumerate(minibatches):
                batch = await run.with_reference(ForwardBackwardInput(
                    data=minibatch, loss_fn=algo.loss_fn, loss_fn_config=algo.loss_fn_config or None), record=record)
                output = await run.train_step(batch, adam_params(config, step), record)
                if algo.pair_loss:  # one minibatch; its loss per pair, as the DPO loop's
                    record.update({"loss": output.metrics["loss:sum"] * 2 / len(minibatch),
                                   **{key: output.metrics[key] for key in PAIR_METRICS}})
                else:
                    record["loss"] += output.metrics["loss:sum"] / len(minibatches)
                record["tokens/computed"] = record.get("tokens/computed", 0) + output.metrics["computed_tokens:sum"]
                if index == 0:  # the pass that trained also scored the actions, with the weights that sampled them
                    scored = trained[:len(minibatch)]
                    record.update(sampler_vs_learner(
                        [action_values(s, s.logprobs[1:]) for s in scored],
                        [action_values(s, out["logprobs"].data) for s, out in zip(scored, output.loss_fn_outputs,
                                                                                  strict=True)]))
            if datums_D:
                # After the next rollout: it samples one version throughout (later turns too).
                version, weights_step = await run.publish(step + 1, after=(next_rollout, evaluation),
                                                          record=record), step + 1
            else:
                # Nothing to publish, yet the step ends, as one that trains does, once the next rollout has its
                # samples: ending at once would leave the next step to wait for a whole rollout and then for the
                # one after it (twice a step's time, more with an evaluation).
                await wait_for_sampler((next_rollout,), record)
            if evaluation is not None:
                record.update(await evaluation)
            record.update(step_metrics(record, sampled, rewards, [d.model_input.length for d in datums_D]))
            await run.end_step(record)  # logged, and a checkpoint when one is due
        await run.final_evaluation(evaluate)
        return run.log.history


def train(config: TrainConfig, source: Task | Environment, shared: Shared | None = None) -> list[dict]:
    """Runs the RL loop on an environment, or on a task as its one-turn environment; returns one metrics record per
    step (and one for the final evaluation). `shared`: a sweep's learner and sampler pool (`rl.sweep`)."""
    return asyncio.run(train_async(config, as_environment(source), shared))
