"""A request's samples do not depend on what the engine batches it with, on CPU: the same seeded request gives the
same tokens and the same logprobs, to the bit, alone and beside other requests.

Without it two runs of one seed part wherever a decode step found one sequence running in one run and several in
the other (which requests arrive before the engine's next step is a matter of timing), and a sweep's runs or a
service's users change each other's samples. vLLM's CPU matrix product sums a lone row in another order than a row
among others once the inner dimension passes ~1,024 (`rl.sampler.engine.compute_single_rows_as_pairs`), so the
model here has SmolLM2's kind of MLP width (2,048; the shared tiny model's 512 does not show it).
"""

import pytest
import torch

from rl.learner import Learner
from rl.models import build_tiny_model
from rl.sampler import vllm_lora_fastpath
from rl.sampler.engine import start_vllm_engine
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU engine's property (CUDA's GEMMs are not "
                                                                   "batch-invariant and are not made so here)")

PROMPT = [1, 382, 201, 289, 270, 223, 20, 294, 223, 21]
OTHERS = [[1, 50, 60, 70], [1, 9, 8, 7, 6, 5, 4, 3]]


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide-tiny-model")
    build_tiny_model(folder, seed=0, intermediate_size=2048)
    return folder


@pytest.fixture(scope="module")
def llm(wide_model_dir):
    return start_vllm_engine(wide_model_dir, dtype="float32", max_model_len=128)


@pytest.fixture(scope="module")
def lora_llm(ray_local, wide_model_dir, tmp_path_factory):
    """An engine that serves adapters through rl's LoRA path (rl-serve's publish mode), and two trained adapters
    (saving for sampling puts the weights in Ray's object store: the session's Ray, not one started on demand)."""
    from vllm.lora.request import LoRARequest

    learner = Learner(str(wide_model_dir), storage=tmp_path_factory.mktemp("wide-runs"))
    adapters = []
    for seed, lesson in ((0, [600, 601, 602]), (1, [700, 701, 702])):
        model_id = learner.create(str(wide_model_dir), LoraConfig(rank=8, seed=seed))
        datum = Datum.next_token(PROMPT + lesson, weights=[1.0] * (len(PROMPT) + len(lesson)))
        for _ in range(3):
            learner.forward_backward(model_id, ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"))
            learner.optim_step(model_id, AdamParams(learning_rate=1e-2))
        folder = learner.store.folder(learner.save_weights_for_sampler(model_id, "v").tinker_path)
        adapters.append(LoRARequest(f"run{seed}", seed + 1, str(folder)))
    with vllm_lora_fastpath.fastpath(enabled=True):  # as the sampler replica installs it; undone after the module
        yield (start_vllm_engine(wide_model_dir, dtype="float32", max_model_len=128, max_lora_rank=8, max_loras=2),
               adapters)


def sample(llm, temperature: float, loras=(None, None, None)) -> list:
    """PROMPT's samples (tokens and logprobs), alone and then beside OTHERS' longer ones (all in one batch from
    the first step, so PROMPT's decode steps never run alone there); `loras`: each request's adapter."""
    from vllm import SamplingParams, TokensPrompt

    def params(seed: int, max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, logprobs=0, ignore_eos=True)

    def ours(outputs) -> list:
        sampled = outputs[0].outputs[0]
        return list(sampled.token_ids), [step[t].logprob for step, t in zip(sampled.logprobs, sampled.token_ids,
                                                                             strict=True)]

    prompts = [TokensPrompt(prompt_token_ids=p) for p in [PROMPT, *OTHERS]]
    # Each from an empty prefix cache: a cached prompt is computed in other row counts (its last token alone), where
    # an adapter's LoRA products sum in another order; what it is batched with is the question here
    llm.reset_prefix_cache()
    alone = llm.generate(prompts[:1], [params(5, 24)], lora_request=list(loras[:1]), use_tqdm=False)
    llm.reset_prefix_cache()
    beside = llm.generate(prompts, [params(5, 24), params(6, 40), params(7, 32)], lora_request=list(loras),
                          use_tqdm=False)
    return [ours(alone), ours(beside)]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_request_samples_the_same_bits_alone_and_beside_others(llm, temperature):
    (tokens, logprobs), (tokens_beside, logprobs_beside) = sample(llm, temperature)
    assert len(tokens) == 24 and tokens == tokens_beside
    assert logprobs == logprobs_beside  # exactly



def test_a_request_through_an_adapter_samples_the_same_bits_beside_other_adapters_and_the_base_model(lora_llm):
    # A service's users: each samples through an adapter of their own. (Requests through the SAME adapter share
    # its LoRA products, whose float32 sums change with their row count: docs/benchmarks.md.)
    llm, (ours, theirs) = lora_llm
    (tokens, logprobs), (tokens_beside, logprobs_beside) = sample(llm, 1.0, (ours, theirs, None))
    assert len(tokens) == 24 and tokens == tokens_beside
    assert logprobs == logprobs_beside
    (_, base_logprobs), _ = sample(llm, 1.0)
    assert base_logprobs != logprobs, "the adapter is applied"
