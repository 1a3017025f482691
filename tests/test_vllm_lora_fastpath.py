"""The vLLM LoRA fast path gives the unpatched engine's results, on one engine, patched and unpatched.

Patched and unpatched engines sum in different orders, and batches of different shapes use different kernel
blockings: their logprobs agree to about 1e-6 in float32, not to the bit, so a near-tie may pick another greedy
token. Each check therefore scores the SAME tokens under both configurations (teacher-forced, as prompt
logprobs) and compares logprobs with a tolerance far below what a wrong adapter changes.
"""

from contextlib import contextmanager

import pytest
import torch

from rl.learner import Learner
from rl.sampler import vllm_lora_fastpath
from rl.sampler.engine import start_vllm_engine
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig

LORA_IDS: dict = {}
PROMPTS = [[1, 382, 201, 289, 270, 223, 20, 294, 223, 21], [1, 50, 60, 70], [1, 9, 8, 7, 6, 5, 4, 3]]
TOLERANCE = 1e-4  # max |logprob difference| of the same weights in float32 (measured: 3e-6)
APART = 0.05  # mean |logprob difference| of different weights is above this (measured: 0.3 and more)
SHRINK = ("PunicaWrapperCPU", "_shrink_prefill")


@pytest.fixture(scope="module")
def adapters(ray_local, tiny_model_dir, tmp_path_factory):
    """Two different trained adapters as PEFT folders: of the decoder's layers (which vLLM's own path can serve
    with prompt logprobs, for comparison), and of those and lm_head (which only the fast path can)."""
    learner = Learner(str(tiny_model_dir), storage=tmp_path_factory.mktemp("fastpath"))
    folders = []
    for seed, target, train_unembed in ((0, [600, 601, 602], False), (1, [700, 701, 702], True)):
        model_id = learner.create(str(tiny_model_dir), LoraConfig(rank=8, seed=seed, train_unembed=train_unembed))
        tokens = PROMPTS[0] + target
        datum = Datum.next_token(tokens, weights=[1.0] * len(tokens))
        for _ in range(10):
            learner.forward_backward(model_id, ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"))
            learner.optim_step(model_id, AdamParams(learning_rate=3e-3))
        path = learner.save_weights_for_sampler(model_id, "v").tinker_path
        folders.append(learner.store.folder(path))
    return folders


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # Slots of rank 16 for adapters of rank 8: vLLM pads each adapter to the slot's rank, and the fast path
    # multiplies only the rank an adapter uses.
    return start_vllm_engine(tiny_model_dir, dtype="float32", max_model_len=128, max_lora_rank=16, max_loras=2)


def lora_requests(adapters_per_prompt):
    from vllm.lora.request import LoRARequest

    for folder in filter(None, adapters_per_prompt):  # one id per adapter: vLLM trusts ids, not paths
        LORA_IDS.setdefault(folder, len(LORA_IDS) + 1)
    return [None if folder is None else LoRARequest(f"a{LORA_IDS[folder]}", LORA_IDS[folder], str(folder))
            for folder in adapters_per_prompt]


def generate(llm, adapters_per_prompt) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuations of PROMPTS (one per prompt, decoded) and their logprobs."""
    from vllm import SamplingParams, TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                           SamplingParams(max_tokens=16, temperature=0.0, logprobs=0),
                           lora_request=lora_requests(adapters_per_prompt), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [torch.tensor([step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                                                  strict=True)]) for o in outputs]
    return tokens, logprobs


def score(llm, continuations, adapters_per_prompt) -> list[torch.Tensor]:
    """The logprobs of given continuations of PROMPTS, teacher-forced in one prefill (prompt logprobs)."""
    from vllm import SamplingParams, TokensPrompt

    sequences = [prompt + continuation for prompt, continuation in zip(PROMPTS, continuations, strict=True)]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                           SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                           lora_request=lora_requests(adapters_per_prompt), use_tqdm=False)
    return [torch.tensor([step[t].logprob for step, t in zip(o.prompt_logprobs[len(p):], s[len(p):], strict=True)])
            for o, p, s in zip(outputs, PROMPTS, sequences, strict=True)]


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


@contextmanager
def vllm_linear_kernels():
    """vLLM's own LoRA kernels for the linear layers, with the fast path's output layer: vLLM 0.32's own cannot
    give prompt logprobs on a model whose lm_head takes a LoRA (it indexes one adapter per request, not per row)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    names = ("_shrink_prefill", "_expand_slice_prefill")
    with vllm_lora_fastpath.fastpath(enabled=True):
        patched = {name: getattr(PunicaWrapperCPU, name) for name in names}
        for name in names:
            setattr(PunicaWrapperCPU, name, vllm_lora_fastpath._originals[name])
        try:
            yield
        finally:
            for name, replacement in patched.items():
                setattr(PunicaWrapperCPU, name, replacement)


def test_one_adapter_batches_match_the_unpatched_engine(llm, adapters, monkeypatch):
    calls = []
    replacement = vllm_lora_fastpath._REPLACEMENTS[SHRINK]

    def counted(*args):
        calls.append(1)
        return replacement(*args)

    monkeypatch.setitem(vllm_lora_fastpath._REPLACEMENTS, SHRINK, counted)
    first, _ = adapters
    with vllm_linear_kernels():
        expected_tokens, expected_logprobs = generate(llm, [first] * 3)
    with vllm_lora_fastpath.fastpath(enabled=True):
        tokens, logprobs = generate(llm, [first] * 3)
        patched_scores = score(llm, expected_tokens, [first] * 3)
    assert calls, "the patched engine went through the replacement"
    with vllm_linear_kernels():
        unpatched_scores = score(llm, tokens, [first] * 3)
        base_scores = score(llm, tokens, [None] * 3)
    # Each engine's decoded tokens, scored by the other: the patched prefill and decode both match vLLM's own.
    for index in range(len(PROMPTS)):
        assert max_difference(patched_scores[index], expected_logprobs[index]) < TOLERANCE
        assert max_difference(unpatched_scores[index], logprobs[index]) < TOLERANCE
        assert mean_difference(logprobs[index], base_scores[index]) > APART, "the adapter changes what is scored"


@pytest.mark.parametrize("layout", ["mixed adapters", "adapter and base"])
def test_mixed_batches_give_each_request_its_own_weights(llm, adapters, layout):
    first, second = adapters
    per_prompt = {"mixed adapters": [first, second, first], "adapter and base": [first, None, second]}[layout]
    with vllm_lora_fastpath.fastpath(enabled=True):
        tokens, logprobs = generate(llm, per_prompt)
        alone = {weights: score(llm, tokens, [weights] * 3) for weights in (first, second, None)}  # unmixed
    for index, weights in enumerate(per_prompt):
        assert max_difference(logprobs[index], alone[weights][index]) < TOLERANCE
        for other in alone.keys() - {weights}:  # and far from any other weights': the check can tell them apart
            assert mean_difference(logprobs[index], alone[other][index]) > APART, (index, other)


def test_fast_path_state_is_restored():
    assert not vllm_lora_fastpath.is_installed()
    with vllm_lora_fastpath.fastpath():
        assert vllm_lora_fastpath.is_installed()
    assert not vllm_lora_fastpath.is_installed()


def test_the_used_rank_is_worked_out_again_when_a_slot_is_loaded():
    # Slots [slots, 1, rank, in] padded to rank 16: slot 0 holds a rank-4 adapter, then (loaded in place, as
    # vLLM's set_lora copies) a rank-12 one; slot 1 stays empty.
    a = torch.zeros(2, 1, 16, 8)
    a[0, 0, :4] = 1.0
    assert vllm_lora_fastpath._used_rank(a, 0, 0) == 4 and vllm_lora_fastpath._used_rank(a, 1, 0) == 0
    a[0, 0, :12].copy_(torch.ones(12, 8))
    assert vllm_lora_fastpath._used_rank(a, 0, 0) == 12, "a cached rank would multiply only the first 4"
    b = torch.zeros(2, 1, 8, 16)  # B: [slots, 1, out, rank]
    b[1, 0, :, :6] = 1.0
    assert vllm_lora_fastpath._used_rank(b, 1, 1) == 6
