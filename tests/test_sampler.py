"""The sampler pool on the tiny model: real vLLM engines in real Ray actors, adapters from a real learner.

The engines are shared by every test in this module (starting one takes seconds), so tests publish weights
under names of their own and never assume a fresh pool.

Two ways of computing the same logprobs (vLLM and PEFT, merged weights and a LoRA, a batch of six and a batch
of one) agree within a tolerance, not to the bit, so a near-tie can pick another token: tests compare the
logprobs of the SAME tokens (scored by the learner, or teacher-forced as prompt logprobs), never two engines'
token choices.
"""

import asyncio
import dataclasses
import itertools
import json
import re
import subprocess
import sys
import tempfile
import unittest.mock
from pathlib import Path

import pytest
import ray
import torch
from pydantic import ValidationError
from waiting import wait_until

from rl.learner import PROBE_LENGTH, LearnerActor, probe_tokens
from rl.sampler import SYNC_TOLERANCE, SamplerPool, WeightSyncError, vllm_merge
from rl.sampler.replica import AdapterVersion, VersionTurns, output_lora_refusal
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig, ModelInput, SampleRequest, SamplingParams

PROMPT = ModelInput.from_ints([1, 382, 201, 289, 270, 223, 20, 294, 223, 21])
LESSON = [600, 601, 602, 603, 604, 605]
"""What the `trained` adapter learns to say after PROMPT: each token with probability ~0.96, a margin of 3 nats
over any other, which no kernel's rounding flips (so greedy decoding must give it)."""
APART = 0.05
"""Mean |logprob difference| above which two sets of weights count as different (measured: 0.3 and more)."""


def run(coroutine):
    return asyncio.run(coroutine)


def run_all(coroutines, *, return_exceptions=False):
    async def together():
        return await asyncio.gather(*coroutines, return_exceptions=return_exceptions)

    return asyncio.run(together())


@pytest.fixture(scope="module")
def pool(ray_local, tiny_model_dir):
    pool = SamplerPool(str(tiny_model_dir), replicas=2, max_model_len=256, max_lora_rank=8, max_loras=2,
                       dtype="float32")
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def learner(ray_local, tiny_model_dir, tmp_path_factory):
    actor = LearnerActor.options(num_cpus=1).remote(str(tiny_model_dir), storage=str(tmp_path_factory.mktemp("s")))
    yield actor
    ray.kill(actor)


@pytest.fixture(scope="module")
def trained(learner, tiny_model_dir):
    """A run trained hard enough that its samples differ clearly from the base model's. Like every run here it
    adapts lm_head too (Tinker's default), so each test below also checks the output layer's LoRA is served."""
    model_id = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=0)))
    teach_lesson(learner, model_id)
    return model_id


@pytest.fixture(scope="module")
def base_run(learner, tiny_model_dir):
    """A fresh adapter: B = 0, so its logprobs are the base model's."""
    return ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=1)))


def teach_lesson(learner, model_id: str, lesson: list[int] = LESSON, steps: int = 30,
                 learning_rate: float = 3e-3) -> None:
    tokens = PROMPT.to_ints() + lesson
    datum = Datum.next_token(tokens, weights=[1.0] * len(tokens))
    for _ in range(steps):
        ray.get(learner.forward_backward.remote(model_id, ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")))
        ray.get(learner.optim_step.remote(model_id, AdamParams(learning_rate=learning_rate)))


def another_run(learner, tiny_model_dir, seed: int) -> str:
    """A run taught another lesson, briefly: weights apart from the base model's and from `trained`'s."""
    model_id = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=4, seed=seed)))
    teach_lesson(learner, model_id, LESSON[::-1], steps=3, learning_rate=1e-2)
    return model_id


def publish(pool: SamplerPool, learner, model_id: str, name: str):
    """What the driver and the service do: save for sampling on the learner, publish what it saved."""
    return run(pool.publish(ray.get(learner.save_weights_for_sampler.remote(model_id, name, overwrite=True))))


def momentum_batch() -> ForwardBackwardInput:
    """A batch whose loss has no gradient: an optimizer step after it moves the weights by momentum alone."""
    tokens = probe_tokens(2048)
    return ForwardBackwardInput(data=[Datum.next_token(tokens, weights=[0.0] * PROBE_LENGTH)], loss_fn="cross_entropy")


def request(**params) -> SampleRequest:
    num_samples = params.pop("num_samples", 1)
    model_path = params.pop("model_path", None)
    topk = params.pop("topk_sample_logprobs", 0)
    return SampleRequest(prompt=PROMPT, num_samples=num_samples, model_path=model_path, topk_sample_logprobs=topk,
                         sampling_params=SamplingParams(**{"max_tokens": 12, **params}))


def learner_logprobs(learner, model_id, prompt: list[int], sampled: list[int]) -> list[float]:
    return ray.get(learner.logprobs.remote(model_id, [prompt + sampled]))[0][len(prompt) - 1:]


def served_logprobs(pool, model_path: str | None, sampled: list[int]) -> list[float]:
    """The pool's logprobs of `sampled` after PROMPT, teacher-forced (prompt logprobs of one prefill)."""
    response = run(pool.sample(SampleRequest(prompt=ModelInput.from_ints(PROMPT.to_ints() + sampled),
                                             prompt_logprobs=True, model_path=model_path,
                                             sampling_params=SamplingParams(max_tokens=1, temperature=0.0))))
    return response.prompt_logprobs[PROMPT.length:]


def mean_abs_difference(a, b) -> float:
    assert len(a) == len(b)
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_seeded_samples_repeat_and_n_samples_differ(pool):
    # First on the pool's fresh engines (this is the module's first test to sample): an unseeded request draws
    # from each engine's own stream, so two replicas started alike do not answer it alike.
    unseeded = [ray.get(replica.actor.sample.remote(request(num_samples=4, temperature=1.0))).sequences
                for replica in pool._replicas]
    assert [s.tokens for s in unseeded[0]] != [s.tokens for s in unseeded[1]]
    first = run(pool.sample(request(num_samples=4, seed=3, temperature=1.0)))
    again = run(pool.sample(request(num_samples=4, seed=3, temperature=1.0)))
    other = run(pool.sample(request(num_samples=4, seed=4, temperature=1.0)))
    tokens = [sequence.tokens for sequence in first.sequences]
    assert len(tokens) == 4 and all(len(t) == 12 for t in tokens)
    assert tokens == [sequence.tokens for sequence in again.sequences]
    assert len({tuple(t) for t in tokens}) > 1, "the n samples of one request differ"
    assert tokens != [sequence.tokens for sequence in other.sequences]
    assert first.model_path is None and first.content_hash is None
    assert all(s.stop_reason == "length" and len(s.logprobs) == 12 for s in first.sequences)


def test_a_replica_on_a_cpu_compiles_nothing(pool):
    """vLLM compiles a few sampling helpers with inductor even in an eager engine, and an engine's first request paid
    for it (~2 s, ~10 s on a fresh machine); a replica on a CPU runs torch.compile'd code eagerly instead."""
    def compile_something(replica) -> tuple[list[float], int, str]:
        graphs = []

        def backend(graph, inputs):
            graphs.append(graph)
            return graph.forward

        doubled = torch.compile(lambda x: x * 2, backend=backend)(torch.ones(2))
        return doubled.tolist(), len(graphs), str(replica._engine.llm.llm_engine.vllm_config.device_config.device)

    doubled, graphs, device = ray.get(pool._replicas[0].actor.__ray_call__.remote(compile_something))
    assert doubled == [2.0, 2.0]
    assert graphs == (0 if device == "cpu" else 1), device


def test_sampled_logprobs_match_the_learner(pool, learner, tiny_model_dir):
    # A fresh adapter has B = 0: its logprobs are the base model's.
    base_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=1)))
    response = run(pool.sample(request(num_samples=2, seed=0, temperature=1.0)))
    for sequence in response.sequences:
        expected = learner_logprobs(learner, base_run, PROMPT.to_ints(), sequence.tokens)
        assert mean_abs_difference(sequence.logprobs, expected) < 1e-3


def test_prompt_logprobs_and_top_k(pool, learner, tiny_model_dir):
    base_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=1)))
    response = run(pool.sample(SampleRequest(prompt=PROMPT, prompt_logprobs=True, topk_prompt_logprobs=3,
                                             sampling_params=SamplingParams(max_tokens=1, temperature=0.0))))
    prompt = PROMPT.to_ints()
    assert response.prompt_logprobs[0] is None and len(response.prompt_logprobs) == len(prompt)
    expected = learner_logprobs(learner, base_run, prompt[:1], prompt[1:])
    assert mean_abs_difference(response.prompt_logprobs[1:], expected) < 1e-3
    assert response.topk_prompt_logprobs[0] is None
    for top, actual in zip(response.topk_prompt_logprobs[1:], response.prompt_logprobs[1:], strict=True):
        assert len(top) == 3 and top == sorted(top, key=lambda pair: -pair[1])
        assert top[0][1] >= actual - 1e-6


def test_prompt_logprobs_of_the_last_n_and_limits_named(pool):
    full = run(pool.sample(SampleRequest(prompt=PROMPT, prompt_logprobs=True, topk_prompt_logprobs=2,
                                         sampling_params=SamplingParams(max_tokens=1, temperature=0.0))))
    last = run(pool.sample(SampleRequest(prompt=PROMPT, prompt_logprobs=True, topk_prompt_logprobs=2,
                                         prompt_logprobs_last_n=3,
                                         sampling_params=SamplingParams(max_tokens=1, temperature=0.0))))
    cut = PROMPT.length - 3
    assert last.prompt_logprobs[:cut] == [None] * cut and last.topk_prompt_logprobs[:cut] == [None] * cut
    assert last.prompt_logprobs[cut:] == pytest.approx(full.prompt_logprobs[cut:], abs=1e-5)
    assert [[token for token, _ in top] for top in last.topk_prompt_logprobs[cut:]] == \
        [[token for token, _ in top] for top in full.topk_prompt_logprobs[cut:]]
    for field, value, message in (("prompt_logprobs_last_n", PROMPT.length, "the prompt has 9 tokens with a"),
                                  ("topk_sample_logprobs", 21, "at most 20 are served"),
                                  ("topk_prompt_logprobs", 21, "at most 20 are served")):
        with pytest.raises(ValueError, match=f"{field}={value}: {message}"):
            run(pool.sample(SampleRequest(prompt=PROMPT, prompt_logprobs=True, **{field: value},
                                          sampling_params=SamplingParams(max_tokens=1))))


@pytest.mark.parametrize("truncation", [{}, {"top_k": 5}, {"top_p": 0.5}])
def test_sampled_logprobs_are_those_of_the_distribution_sampled(pool, tiny_model_dir, truncation):
    # Tinker's convention: temperature applied, truncation renormalised. Checked against the base model's logits
    # from transformers, and the top-k of each sampled position against the same distribution.
    from transformers import AutoModelForCausalLM

    temperature = 0.5
    response = run(pool.sample(request(num_samples=2, seed=1, temperature=temperature, topk_sample_logprobs=4,
                                       **truncation)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for sequence in response.sequences:
        tokens = PROMPT.to_ints() + sequence.tokens
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, PROMPT.length - 1 : -1] / temperature
        if "top_k" in truncation:
            logits = logits.masked_fill(logits < logits.topk(truncation["top_k"], dim=-1).values[:, -1:], -torch.inf)
        if "top_p" in truncation:  # keep the most likely tokens whose mass reaches top_p (the sampled one at least)
            probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
            dropped = (probs.cumsum(-1) - probs) >= truncation["top_p"]
            logits = logits.scatter(-1, order, logits.gather(-1, order).masked_fill(dropped, -torch.inf))
        expected = logits.log_softmax(-1)
        sampled = expected.gather(-1, torch.tensor(sequence.tokens)[:, None])[:, 0]
        assert max(abs(a - b) for a, b in zip(sequence.logprobs, sampled.tolist(), strict=True)) < 1e-3
        for top, row in zip(sequence.topk_logprobs, expected, strict=True):
            values, ids = row.topk(4)
            kept = [(int(i), float(v)) for i, v in zip(ids, values, strict=True) if v > -torch.inf]
            assert [token for token, _ in top] == [token for token, _ in kept]
            assert [value for _, value in top] == pytest.approx([value for _, value in kept], abs=1e-3)


def test_published_weights_change_samples_and_match_the_new_learner(pool, learner, trained, base_run):
    base = run(pool.sample(request(temperature=0.0)))
    version = publish(pool, learner, trained, "published")
    assert version.tinker_path == f"tinker://{trained}/sampler_weights/published"
    tuned = run(pool.sample(request(temperature=0.0, model_path=version.tinker_path)))
    assert tuned.model_path == version.tinker_path and tuned.content_hash == version.weights.content_hash
    assert tuned.sequences[0].tokens[:6] == LESSON, "the adapter's lesson is served"
    assert tuned.sequences[0].tokens != base.sequences[0].tokens
    expected = learner_logprobs(learner, trained, PROMPT.to_ints(), tuned.sequences[0].tokens)
    assert mean_abs_difference(tuned.sequences[0].logprobs, expected) < 1e-3
    base_expected = learner_logprobs(learner, base_run, PROMPT.to_ints(), tuned.sequences[0].tokens)
    assert mean_abs_difference(tuned.sequences[0].logprobs, base_expected) > APART, "the check tells weights apart"

    # Every replica serves it, including one that first sees it on demand, in batches of six: each sample's
    # logprobs are the learner's for the tokens it drew.
    responses = run_all([pool.sample(request(temperature=0.0, model_path=version.tinker_path)) for _ in range(6)])
    session = pool.create_sampling_session(version.tinker_path)
    by_session = run(pool.sample(SampleRequest(prompt=PROMPT, sampling_session_id=session, seq_id=0,
                                               sampling_params=SamplingParams(max_tokens=12, temperature=0.0))))
    assert by_session.model_path == version.tinker_path
    for response in responses + [by_session]:
        assert response.content_hash == version.weights.content_hash
        sequence = response.sequences[0]
        expected = learner_logprobs(learner, trained, PROMPT.to_ints(), sequence.tokens)
        assert mean_abs_difference(sequence.logprobs, expected) < 1e-3


def test_stale_or_corrupted_weights_are_caught(pool, learner, trained, tiny_model_dir):
    good = publish(pool, learner, trained, "good")
    weights = ray.get(learner.sampler_weights.remote(good.tinker_path))
    assert weights == dataclasses.replace(good.weights, files=weights.files), "what the learner recorded at saving"
    fresh_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=2)))
    stale_probe = ray.get(learner.logprobs.remote(fresh_run, [weights.probe_tokens]))[0]

    def loaded() -> list[list[int]]:  # each replica's adapters in vLLM (adapter mode)
        return ray.get([replica.actor.__ray_call__.remote(lambda sampler: sorted(sampler._loaded))
                        for replica in pool._replicas])

    before = loaded()
    with pytest.raises(WeightSyncError, match="disagrees with the learner on the probe"):
        # the learner says "base model", the replica serves the adapter
        run(pool.publish(dataclasses.replace(weights, probe_logprobs=stale_probe)))
    wait_until(lambda: loaded() == before, timeout=60)  # nothing can sample the version that failed: it goes

    corrupted = dict(ray.get(weights.files))
    corrupted["adapter_model.safetensors"] = corrupted["adapter_model.safetensors"][:-8] + b"\0" * 8
    with pytest.raises(WeightSyncError, match=f"loaded {good.tinker_path} with content hash .*, expected"):
        run(pool.publish(dataclasses.replace(weights, files=ray.put(corrupted))))

    # vLLM serves the old weights when a LoRA id is reused: the verification must notice.
    retrained = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=0)))
    newer = ray.get(learner.save_weights_for_sampler.remote(retrained, "newer"))
    ids = pool._lora_ids
    pool._lora_ids = itertools.repeat(good.lora_int_id)
    try:
        with pytest.raises(WeightSyncError):
            run(pool.publish(newer))
    finally:
        pool._lora_ids = ids
    served = run(pool.sample(request(temperature=0.0, model_path=good.tinker_path)))
    assert served.content_hash == good.weights.content_hash


def test_bad_requests_fail_alone(pool):
    bad = [
        SampleRequest(prompt=ModelInput.empty(), sampling_params=SamplingParams(max_tokens=4)),
        SampleRequest(prompt=ModelInput.from_ints([1, 2048]), sampling_params=SamplingParams(max_tokens=4)),
        SampleRequest(prompt=PROMPT, sampling_params=SamplingParams(max_tokens=250)),
        request(model_path="tinker://nobody/sampler_weights/x"),
        SampleRequest(prompt=PROMPT, base_model="SmolLM2-135M-Instruct", sampling_params=SamplingParams()),
    ]
    messages = ["prompt is empty", r"token id 2048, outside the vocabulary \[0, 2048\)",
                r"prompt \(10 tokens\) \+ max_tokens \(250\) exceeds the context of 256", "unknown model path",
                "this pool serves"]

    results = run_all([pool.sample(r) for r in bad + [request(temperature=0.0)]], return_exceptions=True)
    for result, message in zip(results[:-1], messages, strict=True):
        assert isinstance(result, ValueError), result
        assert re.search(message, str(result)), (message, str(result))
    assert len(results[-1].sequences[0].tokens) == 12, "the good request is unaffected"
    for field, value in (("max_tokens", 0), ("temperature", -0.5)):
        with pytest.raises(ValidationError, match=field):
            SamplingParams(**{field: value})


def test_evicted_adapters_are_reloaded_on_demand(pool, learner, trained):
    first = publish(pool, learner, trained, "lru-0")
    before = run(pool.sample(request(temperature=0.0, model_path=first.tinker_path))).sequences[0]
    for index in range(1, 4):  # max_loras is 2: these push lru-0 out of every engine
        ray.get(learner.forward_backward.remote(trained, momentum_batch()))
        ray.get(learner.optim_step.remote(trained, AdamParams(learning_rate=1e-3)))
        last = publish(pool, learner, trained, f"lru-{index}")
    # The reloaded lru-0 scores the tokens it sampled before as it did then (float32: prefill and decode agree
    # to ~1e-6), and unlike the newest version (three small steps away: 0.009 apart).
    after = served_logprobs(pool, first.tinker_path, before.tokens)
    assert mean_abs_difference(after, before.logprobs) < 1e-4
    assert mean_abs_difference(served_logprobs(pool, last.tinker_path, before.tokens), before.logprobs) > 1e-3


def test_a_retired_version_is_refused_and_let_go(pool, learner, trained):
    version = publish(pool, learner, trained, "to-retire")
    key = version.lora_int_id

    def held() -> list[bool]:  # by each replica: its adapter folder (and vLLM's copy, removed with it)
        return ray.get([replica.actor.__ray_call__.remote(lambda self: key in self._loaded or any(
            folder.name.startswith(f"{key}-") for folder in self._adapters.iterdir())) for replica in pool._replicas])

    async def retired_while_sampling():
        under_way = asyncio.ensure_future(pool.sample(request(model_path=version.tinker_path, temperature=1.0,
                                                              seed=5, max_tokens=150, stop=[])))
        await asyncio.sleep(0)  # it has started
        pool.retire(version.tinker_path)
        still = held()
        return still, await under_way

    assert held() == [True, True]
    still, response = run(retired_while_sampling())
    assert still == [True, True], "a request under way keeps its version"
    assert len(response.sequences[0].tokens) == 150 and response.content_hash == version.weights.content_hash
    wait_until(lambda: held() == [False, False], timeout=10)  # then every replica lets it go (asked without waiting)
    assert held() == [False, False]
    with pytest.raises(ValueError, match="to-retire: retired"):
        run(pool.sample(request(model_path=version.tinker_path)))
    assert not pool.published(version.tinker_path) and pool._versions[version.tinker_path] is None, "files let go"
    with pytest.raises(ValueError, match="unknown model path"):
        pool.retire("tinker://nobody/sampler_weights/never")
    again = publish(pool, learner, trained, "to-retire")  # published again: served under a new LoRA id
    assert pool.published(again.tinker_path) and again.lora_int_id != key
    assert run(pool.sample(request(model_path=again.tinker_path))).content_hash == again.weights.content_hash


def test_a_killed_replica_loses_no_request(pool):
    victim = pool._replicas[0]

    async def scenario():
        # stop=[]: no stop token, end-of-sequence included, so every sample runs its full 240 tokens.
        tasks = [asyncio.ensure_future(pool.sample(request(max_tokens=240, num_samples=4, temperature=1.0, seed=i,
                                                           stop=[])))
                 for i in range(8)]
        while victim.outstanding == 0:  # wait until requests are in flight on the victim
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in tasks), "the requests must still be running when the replica dies"
        ray.kill(victim.actor, no_restart=True)
        return await asyncio.gather(*tasks)

    responses = run(scenario())
    assert len(responses) == 8 and all(len(s.tokens) == 240 for r in responses for s in r.sequences)
    assert victim not in pool._replicas, "the dead replica was replaced"
    assert len(pool._replicas) == 2
    assert all(ray.get([replica.actor.alive.remote() for replica in pool._replicas]))


def test_stop_tokens_stop_strings_and_top_k(pool, tiny_model_dir):
    from transformers import AutoTokenizer

    greedy = run(pool.sample(request(temperature=0.0))).sequences[0]
    stop_token = greedy.tokens[3]
    stopped = run(pool.sample(request(temperature=0.0, stop=[stop_token]))).sequences[0]
    first = greedy.tokens.index(stop_token)
    assert stopped.stop_reason == "stop" and stopped.tokens == greedy.tokens[: first + 1]

    text = AutoTokenizer.from_pretrained(tiny_model_dir).decode(greedy.tokens[4:6])
    by_string = run(pool.sample(request(temperature=0.0, stop=text))).sequences[0]
    assert by_string.stop_reason == "stop" and len(by_string.tokens) < len(greedy.tokens)
    assert by_string.tokens == greedy.tokens[: len(by_string.tokens)]

    top_one = run(pool.sample(request(temperature=1.0, top_k=1, seed=9))).sequences[0]
    assert top_one.tokens == greedy.tokens, "top_k=1 leaves only the greedy choice"
    nucleus = run(pool.sample(request(temperature=1.0, top_p=1e-6, seed=9))).sequences[0]
    assert nucleus.tokens == greedy.tokens, "a tiny top_p leaves only the most likely token"


def test_bfloat16_samples_match_the_bfloat16_learner(ray_local, tiny_model_dir, tmp_path):
    # bf16 is the recipes' dtype. vLLM and PEFT round differently in it, and AMX, AVX512-BF16 and AVX2 kernels
    # differently again, so the allowance is the pool's own bf16 verification tolerance: 0.05 plus 2% of the
    # mean |logprob|, about 0.1 here (measured on AVX512-BF16: 0.001-0.01; other weights: 4 and more).
    learner = LearnerActor.options(num_cpus=1).remote(str(tiny_model_dir), storage=str(tmp_path), dtype="bfloat16")
    adapter_folders = set(Path(tempfile.gettempdir()).glob("rl-adapters-*"))
    pool = SamplerPool(str(tiny_model_dir), max_model_len=256, max_lora_rank=8, max_loras=1, dtype="bfloat16")
    try:
        assert pool.info["dtype"] == "bfloat16" and pool.tolerance == SYNC_TOLERANCE["bfloat16"]
        model_id = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=0)))
        base_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=1)))
        teach_lesson(learner, model_id)
        version = publish(pool, learner, model_id, "bf16")  # verified on the probe
        response = run(pool.sample(request(num_samples=4, seed=0, temperature=1.0, model_path=version.tinker_path)))
        absolute, relative = SYNC_TOLERANCE["bfloat16"]
        for sequence in response.sequences:
            expected = learner_logprobs(learner, model_id, PROMPT.to_ints(), sequence.tokens)
            allowed = absolute + relative * sum(map(abs, expected)) / len(expected)
            base_expected = learner_logprobs(learner, base_run, PROMPT.to_ints(), sequence.tokens)
            assert mean_abs_difference(sequence.logprobs, expected) < allowed
            assert mean_abs_difference(sequence.logprobs, base_expected) > 4 * allowed, "the check tells weights apart"
    finally:
        pool.shutdown()
        ray.kill(learner)
    assert set(Path(tempfile.gettempdir()).glob("rl-adapters-*")) == adapter_folders, "the replica cleaned up"


MERGE_POOL_KV_GIB = 0.01
"""Room for ~20 sequences of the tiny model's 256 tokens: requests beyond what fits at once wait their turn."""


@pytest.fixture(scope="module")
def merge_pool(ray_local, tiny_model_dir):
    pool = SamplerPool(str(tiny_model_dir), replicas=1, max_model_len=256, dtype="float32", publish_mode="merge",
                       kv_cache_gib=MERGE_POOL_KV_GIB)
    yield pool
    pool.shutdown()


def test_a_replica_holds_the_kv_cache_it_was_given(merge_pool, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4  # K and V, fp32
    expected = MERGE_POOL_KV_GIB * 2**30 / bytes_per_token
    assert expected - 32 <= merge_pool.info["kv_cache_tokens"] <= expected  # whole blocks of 32 tokens
    # more sequences at once than it holds: they queue, and every one finishes
    many = run(merge_pool.sample(request(temperature=1.0, seed=3, num_samples=40, max_tokens=200, stop=[])))
    assert [len(sequence.tokens) for sequence in many.sequences] == [200] * 40


def test_merge_mode_serves_what_adapter_mode_serves(pool, merge_pool, learner, trained, tiny_model_dir):
    # Merged weights and a LoRA on the side sum in different orders: the adapter pool scores the tokens the merge
    # pool drew, and the logprobs must agree (float32: ~1e-6).
    base = run(merge_pool.sample(request(temperature=0.0))).sequences[0]
    assert mean_abs_difference(served_logprobs(pool, None, base.tokens), base.logprobs) < 1e-4

    other = another_run(learner, tiny_model_dir, seed=5)
    first = publish(merge_pool, learner, other, "merge-first")
    version = publish(merge_pool, learner, trained, "merge-second")  # replaces, never adds up
    reference = publish(pool, learner, trained, "merge-reference")
    for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7, "num_samples": 3}):
        merged = run(merge_pool.sample(request(model_path=version.tinker_path, **params)))
        assert merged.content_hash == version.weights.content_hash
        for served in merged.sequences:
            expected = served_logprobs(pool, reference.tinker_path, served.tokens)
            assert mean_abs_difference(served.logprobs, expected) < 1e-4
            base_expected = served_logprobs(pool, None, served.tokens)
            assert mean_abs_difference(served.logprobs, base_expected) > APART, "the merged weights are not the base"

    # Every version still published is served, one at a time: requests for three sets of weights sent together
    # (a sweep's runs) each get theirs, the replica switching between them.
    first_reference = publish(pool, learner, other, "merge-first-reference")
    paths = {first.tinker_path: first_reference.tinker_path, version.tinker_path: reference.tinker_path, None: None}
    order = [first.tinker_path, version.tinker_path, None, first.tinker_path, version.tinker_path, None]
    responses = run_all(merge_pool.sample(request(model_path=path, temperature=1.0, seed=11)) for path in order)
    for path, response in zip(order, responses, strict=True):
        assert response.model_path == path
        sampled = response.sequences[0]
        assert mean_abs_difference(sampled.logprobs, served_logprobs(pool, paths[path], sampled.tokens)) < 1e-4, path
    # A merge on CPU writes lm_head into the weight of the version it replaced, not into fresh memory (which costs
    # tens of microseconds a page on a VM), and serves it right.
    def lm_head_memory(replica) -> tuple[int, list[int]]:  # (defined here: Ray sends it by value)
        """Where the replica's lm_head weight is, and where the spare weights of its shape are."""
        head = replica._merger._layers["lm_head"][0].weight
        return head.data_ptr(), [spare.data_ptr() for (shape, _), spare in replica._merger._spare.items()
                                 if shape == head.shape]

    actor = merge_pool._replicas[0].actor
    run(merge_pool.sample(request(model_path=version.tinker_path)))
    head, spares = ray.get(actor.__ray_call__.remote(lm_head_memory))
    sampled = run(merge_pool.sample(request(model_path=first.tinker_path, temperature=1.0, seed=12))).sequences[0]
    assert len(spares) == 1 and ray.get(actor.__ray_call__.remote(lm_head_memory))[0] == spares[0] != head
    assert mean_abs_difference(sampled.logprobs, served_logprobs(pool, first_reference.tinker_path,
                                                                 sampled.tokens)) < 1e-4
    # A retired version's files are let go, and nothing samples it again.
    merge_pool.retire(first.tinker_path)
    assert not merge_pool.published(first.tinker_path) and merge_pool._versions[first.tinker_path] is None
    with pytest.raises(ValueError, match="merge-first: retired"):
        run(merge_pool.sample(request(model_path=first.tinker_path)))


def test_a_merge_prepared_while_the_engine_samples_waits_for_its_switch(merge_pool, learner, trained,
                                                                          tiny_model_dir):
    """`SamplerPool.prepare` (what a run does while its next rollout samples): the replica merges the new weights
    beside the engine, the requests under way finish on the weights they began with, and the switch installs that
    merge rather than computing another."""
    def count_merges(replica):
        merges = replica._merger.prepare

        def counted(files):
            replica.merges_computed = getattr(replica, "merges_computed", 0) + 1
            return merges(files)

        replica._merger.prepare = counted

    actor = merge_pool._replicas[0].actor
    ray.get(actor.__ray_call__.remote(count_merges))
    try:
        old = publish(merge_pool, learner, trained, "prepared-old")
        other = another_run(learner, tiny_model_dir, seed=9)
        new_weights = ray.get(learner.save_weights_for_sampler.remote(other, "prepared-new"))

        async def prepare_while_sampling():
            long_request = request(model_path=old.tinker_path, temperature=1.0, seed=4, num_samples=8,
                                   max_tokens=200, stop=[])
            sampling = asyncio.ensure_future(merge_pool.sample(long_request))
            await asyncio.sleep(0.2)  # under way
            merge_pool.prepare(new_weights)
            response = await sampling
            return response, await merge_pool.publish(new_weights)

        response, new = run(prepare_while_sampling())
        assert ray.get(actor.__ray_call__.remote(lambda replica: replica.merges_computed)) == 2  # old, then new
        assert response.content_hash == old.weights.content_hash
        # Every sampled token was scored by the old weights, none by the new ones merged meanwhile.
        checked = response.sequences[-1]
        scored_new = served_logprobs(merge_pool, new.tinker_path, checked.tokens)
        scored_old = served_logprobs(merge_pool, old.tinker_path, checked.tokens)
        assert mean_abs_difference(checked.logprobs, scored_old) < 1e-4
        assert mean_abs_difference(checked.logprobs, scored_new) > APART
    finally:
        ray.get(actor.__ray_call__.remote(lambda replica: delattr(replica._merger, "prepare")))


def test_a_merge_whose_prefix_cache_stays_fails_rather_than_serve_stale_prompts(merge_pool, learner, trained):
    def keep_prefix_cache(replica):
        replica._engine.llm.reset_prefix_cache = lambda *args, **kwargs: False  # as vLLM answers when it declines

    def restore(replica):
        del replica._engine.llm.reset_prefix_cache

    actor = merge_pool._replicas[0].actor
    ray.get(actor.__ray_call__.remote(keep_prefix_cache))
    try:
        with pytest.raises(Exception, match="kept its prefix cache after the weights changed"):
            publish(merge_pool, learner, trained, "stale-prefix")
    finally:
        ray.get(actor.__ray_call__.remote(restore))
    version = publish(merge_pool, learner, trained, "stale-prefix")  # the next switch merges from scratch
    assert run(merge_pool.sample(request(model_path=version.tinker_path))).content_hash == version.weights.content_hash


def test_versions_take_turns_and_none_starves():
    """Merge mode's schedule (`VersionTurns`), with a switch that only records: requests for the merged version run
    together, others wait for them to finish, versions go in the order they first asked, late requests for the
    merged version queue behind a waiting one, and a failed switch fails its own requests only."""
    events: list[str] = []

    def version(lora_int_id: int) -> AdapterVersion:
        return AdapterVersion(weights=None, lora_int_id=lora_int_id)  # the switch below never reads the weights

    async def scenario() -> None:
        running: set[str] = set()

        async def switch(to: AdapterVersion | None) -> None:
            assert not running, "switched under a running request"
            await asyncio.sleep(0.01)
            if to is not None and to.lora_int_id == 4:
                raise RuntimeError("merge failed")
            events.append(f"switch {to and to.lora_int_id}")

        turns = VersionTurns(switch)

        async def request(name: str, to: AdapterVersion | None, delay: float = 0.0, work: float = 0.05) -> None:
            await asyncio.sleep(delay)
            async with turns.turn(to):
                assert {other.split()[0] for other in running} <= {str(to and to.lora_int_id)}, running
                running.add(f"{to and to.lora_int_id} {name}")
                await asyncio.sleep(work)
                running.discard(f"{to and to.lora_int_id} {name}")
                events.append(f"{name} done")

        one, two, failing = version(1), version(2), version(4)
        results = await asyncio.gather(
            request("base", None),  # the base model is merged to begin with: no switch
            request("a1", one, 0.001), request("b1", two, 0.002), request("a2", one, 0.003),
            request("x", failing, 0.004),
            request("base-late", None, 0.02),  # the base still runs, but versions 1, 2 and 4 wait: it queues
            request("a3", one, 0.2),  # after everything: version 1 merged again
            return_exceptions=True)
        assert [type(result).__name__ for result in results] == ["NoneType"] * 4 + ["RuntimeError"] + ["NoneType"] * 2
        assert turns.serving == 1 and turns.switches == 4

    asyncio.run(scenario())
    assert events == ["base done", "switch 1", "a1 done", "a2 done", "switch 2", "b1 done", "switch None",
                      "base-late done", "switch 1", "a3 done"], events


def test_merge_mode_catches_stale_weights(merge_pool, learner, trained, tiny_model_dir):
    good = publish(merge_pool, learner, trained, "merge-good")
    fresh_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=2)))
    stale_probe = ray.get(learner.logprobs.remote(fresh_run, [good.weights.probe_tokens]))[0]
    with pytest.raises(WeightSyncError, match="disagrees with the learner on the probe"):
        run(merge_pool.publish(dataclasses.replace(good.weights, probe_logprobs=stale_probe)))
    served = run(merge_pool.sample(request(temperature=0.0, model_path=good.tinker_path)))
    assert served.content_hash == good.weights.content_hash, "the rejected weights were replaced by the last good ones"
    assert served.sequences[0].tokens[:6] == LESSON


def test_a_merged_weight_is_base_plus_the_lora_update_rounded_once():
    # Against the formula in float64: packed parts stacked in order, a part without factors left as its base, the
    # padding rows zero, and chunk boundaries (17 rows a chunk here) inside every part.
    torch.manual_seed(0)
    columns = 64
    bases = [torch.randn(rows, columns).bfloat16() for rows in (40, 23, 35)]
    factors = [(torch.randn(40, 4) * 0.1, torch.randn(4, columns), 2.0), None,
               (torch.randn(35, 4), torch.randn(4, columns), 0.5)]
    terms = [(base.double(), 0.0 if f is None else f[2] * f[0].double() @ f[1].double()) for base, f in
             zip(bases, factors, strict=True)]
    exact = torch.cat([base + update for base, update in terms])
    size = torch.cat([base.abs() + (0.0 if f is None else f[2] * f[0].double().abs() @ f[1].double().abs())
                      for (base, _), f in zip(terms, factors, strict=True)])
    with unittest.mock.patch.object(vllm_merge, "CHUNK_VALUES", 17 * columns):
        merged32 = vllm_merge.merged_weight(bases, factors, torch.float32, rows=100)
        merged16 = vllm_merge.merged_weight(bases, factors, torch.bfloat16, rows=100)
    assert merged32.shape == merged16.shape == (100, columns) and merged16.dtype == torch.bfloat16
    assert ((merged32[:98].double() - exact).abs() <= 8 * 2**-24 * size).all()  # float32's own error bound
    # Rounded once from float32: the correctly rounded value, save where float32's error straddles a rounding
    # boundary (summing in bfloat16, or rounding the update before adding it, misses on a large share)
    assert (merged16[:98] != exact.to(torch.bfloat16)).double().mean() < 1e-3
    assert (merged16[40:63] == bases[1]).all() and (merged32[98:] == 0).all() and (merged16[98:] == 0).all()


def test_which_engines_serve_an_lm_head_adapter():
    assert output_lora_refusal("merge", False, "Qwen2ForCausalLM", False) is None
    assert output_lora_refusal("adapter", True, "LlamaForCausalLM", True) is None
    assert "does not serve for Qwen2ForCausalLM" in output_lora_refusal("adapter", True, "Qwen2ForCausalLM", False)
    # CUDA, or CPU with lora_fast_path=false: vLLM's own output-layer LoRA gives prompt rows the wrong adapter
    assert "wrong adapter" in output_lora_refusal("adapter", False, "LlamaForCausalLM", True)


def test_auto_dtype_is_resolved_where_the_sampler_runs(tiny_model_dir, tmp_path):
    # The tiny model's folder is float32, so vLLM's own "auto" would serve float32: on a CPU with native bf16 our
    # "auto" must mean bfloat16. A child process, since the CPU flags are faked by patching (and an engine holds
    # its KV cache until its process ends).
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    script = f"""
from pathlib import Path
from rl import models
from rl.sampler.replica import Sampler
models.CPUINFO = Path({str(tmp_path / "cpuinfo")!r})
sampler = Sampler({str(tiny_model_dir)!r}, max_model_len=256, max_lora_rank=8, max_loras=1, dtype="auto",
                  lora_fast_path=False)
print("DTYPE", sampler.describe()["dtype"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "DTYPE bfloat16" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
