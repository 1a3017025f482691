"""The RL loop, top to bottom: rollout -> reward -> advantages -> forward_backward -> optim_step -> publish.

Group-relative advantages (GRPO-style, without a learned critic): each prompt is sampled `group_size` times,
and a sample's advantage is its reward minus its group's mean, so only groups whose samples differ teach
anything. The loss is normalised by the number of trained tokens through the advantages, because Tinker's
losses sum over tokens.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import ray
from tqdm import tqdm
from transformers import AutoTokenizer

from rl.config import TrainConfig
from rl.learner import LearnerActor
from rl.metrics import RunLog
from rl.models import resolve_model
from rl.sampler import SamplerPool
from rl.tasks import Problem, Task
from rl.types import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    LoraConfig,
    ModelInput,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
)


def chat_tokens(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)


def policy_datum(prompt_T: list[int], sequence: SampledSequence, advantage: float) -> Datum:
    """One sample as a datum: prompt tokens carry no advantage; sampled tokens carry the sampler's logprobs."""
    tokens_T = prompt_T + sequence.tokens
    prompt_zeros = [0.0] * (len(prompt_T) - 1)
    return Datum(model_input=ModelInput.from_ints(tokens_T[:-1]), loss_fn_inputs={
        "target_tokens": tokens_T[1:],
        "logprobs": prompt_zeros + sequence.logprobs,
        "advantages": prompt_zeros + [advantage] * len(sequence.tokens),
    })


async def sample_all(pool: SamplerPool, prompts_P: list[list[int]], *, model_path: str | None, group_size: int,
                     params: SamplingParams) -> list[SampleResponse]:
    # Each request draws from its own seed: one seed for all would correlate the samples of different prompts.
    requests = [SampleRequest(prompt=ModelInput.from_ints(prompt), num_samples=group_size, model_path=model_path,
                              sampling_params=params if params.seed is None else
                              params.model_copy(update={"seed": params.seed + index}))
                for index, prompt in enumerate(prompts_P)]
    return await asyncio.gather(*(pool.sample(request) for request in requests))


def evaluate(pool, tokenizer, task: Task, problems: list[Problem], model_path: str | None, max_tokens: int) -> float:
    """Greedy accuracy (the task's strict score) on held-out problems."""
    prompts_P = [chat_tokens(tokenizer, problem.prompt) for problem in problems]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    responses = asyncio.run(sample_all(pool, prompts_P, model_path=model_path, group_size=1, params=greedy))
    scores = [task.accuracy(problem, tokenizer.decode(response.sequences[0].tokens, skip_special_tokens=True))
              for problem, response in zip(problems, responses, strict=True)]
    return sum(scores) / len(scores)


def train(config: TrainConfig, task: Task, log: RunLog) -> list[dict]:
    """Runs the RL loop; `log` receives one metrics record per step. Returns them all."""
    model, algo = config.model, config.algo
    folder = str(resolve_model(model.name))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    learner = LearnerActor.options(num_cpus=config.learner.num_cpus, num_gpus=config.learner.num_gpus).remote(
        folder, storage=str(Path(config.output_dir) / "checkpoints"), dtype=model.dtype,
        micro_batch_tokens=config.learner.micro_batch_tokens)
    pool = SamplerPool(folder, replicas=config.sampler.replicas, num_cpus=config.sampler.num_cpus,
                       num_gpus=config.sampler.num_gpus, max_model_len=model.max_model_len,
                       max_lora_rank=model.lora_rank, dtype=model.dtype, seed=config.seed)
    try:
        model_id = ray.get(learner.create.remote(folder, LoraConfig(rank=model.lora_rank, seed=config.seed,
                                                                    train_unembed=False)))
        version = asyncio.run(pool.publish_from_learner(learner, model_id, "step-0"))
        held_out = task.problems(config.eval_prompts, seed=config.seed, split="eval")
        adam = AdamParams(learning_rate=algo.learning_rate, grad_clip_norm=algo.grad_clip_norm)
        for step in tqdm(range(config.steps), desc=config.recipe, unit="step", disable=None):
            started = time.perf_counter()
            record: dict = {"step": step}
            if step % config.eval_every == 0:
                record["eval/accuracy"] = evaluate(pool, tokenizer, task, held_out, version.tinker_path,
                                                   algo.max_tokens)

            # Rollout: a group of samples per prompt, from the weights just published.
            problems_P = task.problems(algo.prompts_per_step, seed=config.seed * 100_003 + step)
            prompts_P = [chat_tokens(tokenizer, problem.prompt) for problem in problems_P]
            params = SamplingParams(max_tokens=algo.max_tokens, temperature=algo.temperature,
                                    seed=(config.seed * 100_003 + step) * 1_000)
            responses_P = asyncio.run(sample_all(pool, prompts_P, model_path=version.tinker_path,
                                                 group_size=algo.group_size, params=params))
            sampled = time.perf_counter()

            # Reward and group-relative advantages, scaled so the summed loss is a mean over sampled tokens.
            sampled_tokens = sum(len(s.tokens) for r in responses_P for s in r.sequences)
            datums_D, rewards = [], []
            for problem, prompt_T, response in zip(problems_P, prompts_P, responses_P, strict=True):
                rewards_G = [task.reward(problem, tokenizer.decode(s.tokens, skip_special_tokens=True))
                             for s in response.sequences]
                mean_reward = sum(rewards_G) / len(rewards_G)
                advantages_G = [reward - mean_reward for reward in rewards_G]
                rewards += rewards_G
                datums_D += [policy_datum(prompt_T, sequence, advantage / sampled_tokens)
                             for sequence, advantage in zip(response.sequences, advantages_G, strict=True)
                             if advantage != 0.0]

            # Update: one optimizer step on the groups that carry signal, then publish the new weights.
            if datums_D:
                batch = ForwardBackwardInput(data=datums_D, loss_fn=algo.loss_fn,
                                             loss_fn_config=algo.loss_fn_config or None)
                record["loss"] = ray.get(learner.forward_backward.remote(model_id, batch)).metrics["loss:sum"]
                record.update(ray.get(learner.optim_step.remote(model_id, adam)).metrics)
                version = asyncio.run(pool.publish_from_learner(learner, model_id, f"step-{step + 1}"))

            record.update({"reward/mean": sum(rewards) / len(rewards), "datums": len(datums_D),
                           "tokens/prompt": sum(map(len, prompts_P)) * algo.group_size,
                           "tokens/sampled": sampled_tokens,
                           "tokens/trained": sum(d.model_input.length for d in datums_D),
                           "time/sampling_s": sampled - started, "time/training_s": time.perf_counter() - sampled,
                           "step_time_s": time.perf_counter() - started})
            log.log(record)
        log.log({"step": config.steps, "eval/accuracy": evaluate(pool, tokenizer, task, held_out,
                                                                 version.tinker_path, algo.max_tokens)})
    finally:
        pool.shutdown()
        ray.kill(learner)
    return log.history
