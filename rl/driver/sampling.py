"""Sampling prompts from the pool and scoring what comes back: the part rollouts and evaluations share."""

from __future__ import annotations

import asyncio

from rl.chat import chat_tokens, completion_text
from rl.sampler import SamplerPool
from rl.tasks import Problem, Task
from rl.types import ModelInput, SampleRequest, SampleResponse, SamplingParams


def sample_requests(prompts_P: list[list[int]], *, model_path: str | None, group_size: int,
                    params: SamplingParams) -> list[SampleRequest]:
    """A request for `group_size` samples of each prompt; each draws from its own seed (one seed for all would
    correlate the samples of different prompts)."""
    return [SampleRequest(prompt=ModelInput.from_ints(prompt), num_samples=group_size, model_path=model_path,
                          sampling_params=params if params.seed is None else
                          params.model_copy(update={"seed": params.seed + index}))
            for index, prompt in enumerate(prompts_P)]


async def sample_all(pool: SamplerPool, prompts_P: list[list[int]], *, model_path: str | None, group_size: int,
                     params: SamplingParams) -> list[SampleResponse]:
    requests = sample_requests(prompts_P, model_path=model_path, group_size=group_size, params=params)
    return await asyncio.gather(*(pool.sample(request) for request in requests))


def score(task: Task, scorer, problem: Problem, completion: str, *, where: str) -> float:
    """The task's reward or accuracy for one completion; a scorer that fails is named with its input."""
    try:
        return float(scorer(problem, completion))
    except Exception as error:
        raise RuntimeError(f"task {task.name!r}: {scorer.__name__} raised on {where} (prompt {problem.prompt!r}, "
                           f"completion {completion!r}): {error!r}") from error


async def greedy_accuracy(pool: SamplerPool, tokenizer, task: Task, problems: list[Problem], model_path: str | None,
                          max_tokens: int) -> float:
    """The task's unshaped score of greedy answers to held-out problems, averaged."""
    prompts_P = [chat_tokens(tokenizer, problem.prompt) for problem in problems]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    responses = await sample_all(pool, prompts_P, model_path=model_path, group_size=1, params=greedy)
    scores = [score(task, task.accuracy, problem, completion_text(tokenizer, response.sequences[0].tokens),
                    where="evaluation") for problem, response in zip(problems, responses, strict=True)]
    return sum(scores) / len(scores)
