"""The vLLM LoRA fast path gives the unpatched engine's results, on one engine, patched and unpatched."""

import pytest
import torch

from rl import vllm_lora_fastpath
from rl.engine import start_vllm_engine
from rl.learner import Learner
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig, ModelInput

LORA_IDS: dict = {}
PROMPTS = [[1, 382, 201, 289, 270, 223, 20, 294, 223, 21], [1, 50, 60, 70], [1, 9, 8, 7, 6, 5, 4, 3]]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two different trained adapters (decoder layers only), as PEFT folders."""
    learner = Learner(str(tiny_model_dir), storage=tmp_path_factory.mktemp("fastpath"))
    folders = []
    for seed, target in ((0, [600, 601, 602]), (1, [700, 701, 702])):
        model_id = learner.create(str(tiny_model_dir), LoraConfig(rank=8, seed=seed, train_unembed=False))
        tokens = PROMPTS[0] + target
        datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                      loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        for _ in range(10):
            learner.forward_backward(model_id, ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"))
            learner.optim_step(model_id, AdamParams(learning_rate=3e-3))
        path = learner.save_weights_for_sampler(model_id, "v").path
        folders.append(learner.store.folder(path))
    return folders


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return start_vllm_engine(tiny_model_dir, dtype="float32", max_model_len=128, max_lora_rank=8, max_loras=2)


def generate(llm, adapters_per_prompt):
    from vllm import SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    for folder in filter(None, adapters_per_prompt):  # one id per adapter: vLLM trusts ids, not paths
        LORA_IDS.setdefault(folder, len(LORA_IDS) + 1)
    lora = [None if folder is None else LoRARequest(f"a{LORA_IDS[folder]}", LORA_IDS[folder], str(folder))
            for folder in adapters_per_prompt]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                           SamplingParams(max_tokens=16, temperature=0.0, logprobs=0), lora_request=lora,
                           use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                for o in outputs]
    return tokens, torch.tensor(logprobs)


def test_one_adapter_batches_match_the_unpatched_engine(llm, adapters, monkeypatch):
    calls = []
    replacement = vllm_lora_fastpath._REPLACEMENTS["_shrink_prefill"]

    def counted(*args):
        calls.append(1)
        return replacement(*args)

    monkeypatch.setitem(vllm_lora_fastpath._REPLACEMENTS, "_shrink_prefill", counted)
    first, _ = adapters
    with vllm_lora_fastpath.fastpath(enabled=False):
        expected_tokens, expected_logprobs = generate(llm, [first] * 3)
        base_tokens, _ = generate(llm, [None] * 3)
    with vllm_lora_fastpath.fastpath(enabled=True):
        tokens, logprobs = generate(llm, [first] * 3)
    assert calls, "the patched engine went through the replacement"
    assert tokens == expected_tokens and torch.allclose(logprobs, expected_logprobs, atol=1e-5)
    assert tokens != base_tokens, "the adapter changes what is generated"


@pytest.mark.parametrize("layout", ["mixed adapters", "adapter and base"])
def test_mixed_batches_give_each_request_its_own_weights(llm, adapters, layout):
    first, second = adapters
    per_prompt = {"mixed adapters": [first, second, first], "adapter and base": [first, None, second]}[layout]
    with vllm_lora_fastpath.fastpath(enabled=True):
        tokens, logprobs = generate(llm, per_prompt)
        alone = [generate(llm, [weights] * 3) for weights in per_prompt]  # each prompt's weights, unmixed
    for index, (alone_tokens, alone_logprobs) in enumerate(alone):
        assert tokens[index] == alone_tokens[index]
        assert torch.allclose(logprobs[index], alone_logprobs[index], atol=1e-5)


def test_fast_path_state_is_restored():
    assert not vllm_lora_fastpath.is_installed()
    with vllm_lora_fastpath.fastpath():
        assert vllm_lora_fastpath.is_installed()
    assert not vllm_lora_fastpath.is_installed()
