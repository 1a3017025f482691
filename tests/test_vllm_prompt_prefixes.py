"""Prompts that begin alike compute what they share once on a CPU (rl.sampler.vllm_prompt_prefixes): a request that
shares more with one being computed waits a step and copies the block it shares, and it samples what it would
have sampled alone.

A real vLLM engine in this process on the tiny model; KV blocks are 32 tokens on CPU, so a 47-token prompt ends
15 tokens into its second block, as the main job's prompts do.
"""

import pytest
import torch

from rl.sampler import vllm_prompt_prefixes
from rl.sampler.engine import EngineLoop, start_vllm_engine

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="shared prompt prefixes are turned on on CPU only")

PROMPT = [1, *range(300, 346)]  # 47 tokens
BLOCK = 32


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """An engine loop, and the token count its scheduler gave each request in each step: [{request id: tokens}]."""
    llm = start_vllm_engine(tiny_model_dir, dtype="float32", max_model_len=128)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    steps: list[dict[str, int]] = []
    schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        steps.append(dict(output.num_scheduled_tokens))
        return output

    scheduler.schedule = recording_schedule
    return EngineLoop(llm), steps


def params(n: int, seed: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(n=n, seed=seed, temperature=1.0, max_tokens=12, ignore_eos=True, logprobs=0,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def samples(output) -> list[tuple[list[int], list[float]]]:
    return [(list(sample.token_ids), [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids,
                                                                                 strict=True)])
            for sample in output.outputs]


def reset(loop: EngineLoop, steps: list) -> None:
    assert loop.call(loop.llm.reset_prefix_cache, drain=True).result(timeout=60)
    steps.clear()


def alone(loop: EngineLoop, steps: list, prompt: list[int], seed: int) -> list:
    """A one-sample request's samples, from an empty cache: the whole prompt computed."""
    reset(loop, steps)
    output = loop.generate(prompt, params(1, seed), None).result(timeout=120)
    assert list(steps[0].values()) == [len(prompt)]
    return samples(output)


def assert_same_samples(got, expected) -> None:
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for (_, logprobs), (_, alone_logprobs) in zip(got, expected, strict=True):
        assert logprobs == pytest.approx(alone_logprobs, abs=1e-4)


def test_a_prompts_later_samples_compute_only_its_last_token_and_sample_as_they_would_alone(engine):
    loop, steps = engine
    assert vllm_prompt_prefixes.is_installed()
    reset(loop, steps)
    together = loop.generate(PROMPT, params(4, seed=11), None).result(timeout=120)
    first_step, second_step = steps[0], steps[1]
    assert list(first_step.values()) == [len(PROMPT)], "the first sample alone computes the whole prompt"
    later = {request: tokens for request, tokens in second_step.items() if request not in first_step}
    assert list(later.values()) == [1, 1, 1], "each later sample computes only the prompt's last token"
    assert [sample.index for sample in together.outputs] == [0, 1, 2, 3]

    # What vLLM samples for sample `index` of a request: seed + index
    each_alone = [sample for index in range(4) for sample in alone(loop, steps, PROMPT, seed=11 + index)]
    assert_same_samples(samples(together), each_alone)
    assert len({tuple(tokens) for tokens, _ in each_alone}) > 1, "the seeds sample different sequences"


def test_prompts_that_begin_alike_share_what_they_have_in_common_inside_a_block(engine):
    loop, steps = engine
    within_the_block = PROMPT[:20] + [900, 901, 902, 903, 904]  # 20 of its 25 tokens shared, no block whole
    past_the_block = PROMPT[:40] + [910, 911, 912]
    expected = [alone(loop, steps, prompt, seed=5) for prompt in (PROMPT, within_the_block, past_the_block)]
    reset(loop, steps)
    futures = [loop.generate(prompt, params(1, seed=5), None) for prompt in (PROMPT, within_the_block, past_the_block)]
    outputs = [future.result(timeout=120) for future in futures]
    assert sorted(steps[0].values()) == [len(PROMPT)], "the others wait for the first"
    later = sorted(tokens for request, tokens in steps[1].items() if request not in steps[0])
    assert later == [len(past_the_block) - 40, len(within_the_block) - 20], "each computes what it does not share"
    assert [output.num_cached_tokens for output in outputs] == [0, 20, 40]
    for output, expected_samples in zip(outputs, expected, strict=True):
        assert_same_samples(samples(output), expected_samples)


def test_identical_prompts_scheduled_in_one_step_compute_their_own_blocks(engine):
    """vLLM registers a partial block's cache entries when its tokens are scheduled: a request scheduled beside it
    would copy the block before it was written. Registered once computed, the second request computes its own."""
    from vllm import TokensPrompt

    loop, steps = engine
    expected = alone(loop, steps, PROMPT, seed=3)
    reset(loop, steps)
    both = loop.call(lambda: loop.llm.generate([TokensPrompt(prompt_token_ids=PROMPT)] * 2, params(1, seed=3),
                                               use_tqdm=False)).result(timeout=120)  # at once, as vLLM adds them
    assert sorted(steps[0].values()) == [len(PROMPT) - BLOCK, len(PROMPT)], "the first block shared, as vLLM does"
    for output in both:
        assert_same_samples(samples(output), expected)

    again = loop.generate(PROMPT, params(1, seed=3), None).result(timeout=120)  # the prompt is in the cache by now
    assert again.num_cached_tokens == len(PROMPT) - 1
    assert_same_samples(samples(again), expected)
