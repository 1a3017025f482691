"""The RL loop, top to bottom: rollout -> reward -> advantages -> forward_backward -> optim_step -> publish.

Group-relative advantages (GRPO-style, without a learned critic): each prompt is sampled `group_size` times,
and a sample's advantage is its reward minus its group's mean (optionally divided by the group's standard
deviation), so only groups whose samples differ teach anything. The loss is normalised by the number of
sampled tokens through the advantages, because Tinker's losses sum over tokens.

Options: a KL penalty against the base model (`algo.kl_coef`), folded into each token's advantage as
-kl_coef * (sampler logprob - base logprob); and one-step off-policy (`algo.off_policy`): the rollout of step
k+1 is sampled, from the weights of step k, while step k trains. The sampler's logprobs come from the weights
that sampled (each response names them), so the importance ratio corrects for the lag.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from rl.chat import chat_tokens, completion_text
from rl.config import TrainConfig
from rl.driver.run import Run, steps
from rl.driver.sampling import greedy_accuracy, sample_all, score
from rl.metrics import timed
from rl.sampler import AdapterVersion
from rl.tasks import Problem, Task, checked_problems
from rl.types import AdamParams, Datum, ForwardBackwardInput, SampledSequence, SampleResponse, SamplingParams


def policy_datum(prompt_T: list[int], sequence: SampledSequence, advantages: list[float]) -> Datum:
    """One sample as a datum: prompt tokens carry weight 0 (no loss in any policy loss: dro's penalty would pull
    their logprobs toward the 0 given here), sampled tokens weight 1, the sampler's logprobs and the advantages."""
    prompt_zeros, sampled_ones = [0.0] * len(prompt_T), [1.0] * len(sequence.tokens)
    return Datum.next_token(prompt_T + sequence.tokens, weights=prompt_zeros + sampled_ones,
                            logprobs=prompt_zeros + sequence.logprobs, advantages=prompt_zeros + advantages)


def group_advantages(rewards_G: list[float], normalize: bool) -> list[float]:
    mean = sum(rewards_G) / len(rewards_G)
    scale = statistics.pstdev(rewards_G) + 1e-6 if normalize else 1.0
    return [(reward - mean) / scale for reward in rewards_G]


def kl_penalty(advantages_S: list[list[float]], logprobs_S: list[list[float]], base_S: list[list[float]],
               coef: float) -> tuple[list[list[float]], float]:
    """Per-token advantages minus coef * (sampler logprob - base logprob), and that difference's mean: a
    one-sample estimate of KL(sampler || base) per token."""
    kl_S = [[a - b for a, b in zip(lp, base, strict=True)] for lp, base in zip(logprobs_S, base_S, strict=True)]
    penalized_S = [[a - coef * k for a, k in zip(adv, kl, strict=True)] for adv, kl in zip(advantages_S, kl_S,
                                                                                            strict=True)]
    return penalized_S, sum(map(sum, kl_S)) / max(sum(map(len, kl_S)), 1)


def sampler_vs_learner(sampler_S: list[list[float]], learner_S: list[list[float]]) -> dict[str, float]:
    """How far the learner's logprobs of the sampled tokens are from the sampler's: the mean of (sampler - learner)
    and half its mean square, two estimates of KL(sampler || learner) per token (tinker-cookbook logs them as
    kl_sample_train_v1 and _v2). On-policy both weights are the same, so they measure the mismatch between the
    engines (~1e-6: other kernels); off-policy they add the one step of lag the importance ratio corrects."""
    gaps = [s - lp for sampled, learned in zip(sampler_S, learner_S, strict=True)
            for s, lp in zip(sampled, learned, strict=True)]
    return {"kl/sampler_vs_learner": sum(gaps) / len(gaps),
            "kl/sampler_vs_learner_sq": sum(gap * gap for gap in gaps) / (2 * len(gaps))}


STEPS_PER_SEED = 100_003
"""Step seeds are seed * STEPS_PER_SEED + step: distinct for every (seed, step) of runs under 100,003 steps."""
PROMPTS_PER_STEP_SEED = 1_000
"""A step's sampling seeds are step seed * PROMPTS_PER_STEP_SEED + prompt index (`sample_requests`): distinct
for steps of up to 1,000 prompts."""


def step_prompts(config: TrainConfig, task: Task, tokenizer, step: int):
    """The step's problems, their prompt tokens, and the sampling parameters (seeded by seed and step)."""
    algo = config.algo
    step_seed = config.seed * STEPS_PER_SEED + step
    problems_P = checked_problems(task, algo.prompts_per_step, seed=step_seed)
    prompts_P = [chat_tokens(tokenizer, problem.prompt) for problem in problems_P]
    params = SamplingParams(max_tokens=algo.max_tokens, temperature=algo.temperature,
                            seed=step_seed * PROMPTS_PER_STEP_SEED)
    return problems_P, prompts_P, params


@dataclass
class Rollout:
    problems_P: list[Problem]
    prompts_P: list[list[int]]
    responses_P: list[SampleResponse]
    """A group of samples for each prompt."""
    weights_step: int
    """The learner step of the weights that sampled."""
    seconds: float
    """How long the sampling took (off-policy, the step that uses it waits only for what is left of it)."""


async def rollout(run: Run, task: Task, step: int, version: AdapterVersion) -> Rollout:
    """The step's problems, their prompt tokens and a group of samples for each, from weights `version`."""
    algo = run.config.algo
    problems_P, prompts_P, params = step_prompts(run.config, task, run.tokenizer, step)
    started = time.perf_counter()
    responses_P = await sample_all(run.pool, prompts_P, model_path=version.tinker_path,
                                   group_size=algo.group_size, params=params)
    return Rollout(problems_P, prompts_P, responses_P, version.step, time.perf_counter() - started)


async def base_logprobs(run: Run, prompts_S: list[list[int]], sequences_S: list[SampledSequence]) -> list[list[float]]:
    """The base model's logprobs of each sampled sequence's tokens."""
    logprobs_S = await run.learner.logprobs.remote(run.model_id, [p + s.tokens for p, s in zip(prompts_S, sequences_S,
                                                                                                  strict=True)],
                                                   adapter=False)
    return [logprobs[len(p) - 1:] for logprobs, p in zip(logprobs_S, prompts_S, strict=True)]


def rewards_and_advantages(run: Run, task: Task, sampled: Rollout, step: int):
    """Each sample's prompt, sequence, reward and per-token advantages (its group-relative advantage on each of
    its tokens), flattened over the groups."""
    prompts_S, sequences_S, rewards_S, advantages_S = [], [], [], []
    for index, (problem, prompt_T, response) in enumerate(zip(sampled.problems_P, sampled.prompts_P,
                                                              sampled.responses_P, strict=True)):
        rewards_G = [score(task, task.reward, problem, completion_text(run.tokenizer, s.tokens),
                           where=f"step {step}, prompt {index}") for s in response.sequences]
        rewards_S += rewards_G
        for sequence, advantage in zip(response.sequences, group_advantages(rewards_G, run.config.algo.normalize_std),
                                       strict=True):
            prompts_S.append(prompt_T)
            sequences_S.append(sequence)
            advantages_S.append([advantage] * len(sequence.tokens))
    return prompts_S, sequences_S, rewards_S, advantages_S


def step_metrics(record: dict, sampled: Rollout, rewards_S: list[float], sampled_tokens: int,
                 datums_D: list[Datum]) -> dict:
    """The step's reward, sizes and throughputs; training time is every phase after sampling."""
    training_s = sum(record.get(f"time/{phase}_s", 0.0) for phase in ("reference", "forward_backward", "optim_step",
                                                                         "publish"))
    trained_tokens = sum(d.model_input.length for d in datums_D)
    return {"reward/mean": sum(rewards_S) / len(rewards_S), "datums": len(datums_D),
            "sampler/weights_step": sampled.weights_step,
            "tokens/prompt": sum(len(prompt) * len(response.sequences)
                                 for prompt, response in zip(sampled.prompts_P, sampled.responses_P, strict=True)),
            "tokens/sampled": sampled_tokens, "tokens/trained": trained_tokens, "time/training_s": training_s,
            "throughput/sampled_tokens_per_s": sampled_tokens / sampled.seconds,
            "throughput/trained_tokens_per_s": trained_tokens / max(training_s, 1e-9)}


async def train_async(config: TrainConfig, task: Task) -> list[dict]:
    algo = config.algo
    held_out = checked_problems(task, config.eval_prompts, seed=config.seed, split="eval")  # before any actor starts
    with Run(config) as run:
        # Weight versions carry the learner's optimizer step: "sampler/weights_step" shows any lag.
        version = await run.publish()
        adam = AdamParams(learning_rate=algo.learning_rate, grad_clip_norm=algo.grad_clip_norm)
        next_rollout = None

        async def evaluate(step: int) -> dict:  # the weights sampled last: `version` as it is at the call
            return {"eval/accuracy": await greedy_accuracy(run.pool, run.tokenizer, task, held_out,
                                                           version.tinker_path, algo.max_tokens)}

        for step in steps(run):
            record = await run.begin_step(step, evaluate)  # an evaluation first, when one is due

            # Rollout: a group of samples per prompt (off-policy: sampled while the previous step trained).
            with timed(record, "sampling"):
                sampled = await (next_rollout or rollout(run, task, step, version))
            if algo.off_policy and step + 1 < config.steps:
                next_rollout = asyncio.ensure_future(rollout(run, task, step + 1, version))

            # Reward and group-relative advantages, one per sample, spread over its tokens.
            prompts_S, sequences_S, rewards_S, advantages_S = rewards_and_advantages(run, task, sampled, step)

            # KL penalty: each token's advantage pays for how far the sampler has moved from the base model.
            if algo.kl_coef:
                with timed(record, "reference"):
                    base_S = await base_logprobs(run, prompts_S, sequences_S)
                advantages_S, record["kl/sampler_vs_base"] = kl_penalty(
                    advantages_S, [s.logprobs for s in sequences_S], base_S, algo.kl_coef)

            # Update: one optimizer step on the samples that carry signal, then publish the new weights.
            sampled_tokens = sum(len(s.tokens) for s in sequences_S)
            trained_D = [s for s, advantages in enumerate(advantages_S) if any(advantages)]
            datums_D = [policy_datum(prompts_S[s], sequences_S[s], [a / sampled_tokens for a in advantages_S[s]])
                        for s in trained_D]
            record["loss"] = 0.0  # a step in which every group scored alike has nothing to train on
            if datums_D:
                batch = ForwardBackwardInput(data=datums_D, loss_fn=algo.loss_fn,
                                             loss_fn_config=algo.loss_fn_config or None)
                output = await run.train_step(batch, adam, record)
                record.update({"loss": output.metrics["loss:sum"],
                               "tokens/computed": output.metrics["computed_tokens:sum"]})
                # The forward pass that trained also scored the sampled tokens: the targets after the prompt's.
                learner_D = [out["logprobs"].data[len(prompts_S[s]) - 1:]
                             for s, out in zip(trained_D, output.loss_fn_outputs, strict=True)]
                record.update(sampler_vs_learner([sequences_S[s].logprobs for s in trained_D], learner_D))
                with timed(record, "publish"):
                    version = await run.publish()
            record.update(step_metrics(record, sampled, rewards_S, sampled_tokens, datums_D))
            await run.end_step(record)  # logged, and a checkpoint when one is due
        await run.final_evaluation(evaluate)
        return run.log.history


def train(config: TrainConfig, task: Task) -> list[dict]:
    """Runs the RL loop; returns one metrics record per step (and one for the final evaluation)."""
    return asyncio.run(train_async(config, task))

