"""The sampler pool on the tiny model: real vLLM engines in real Ray actors, adapters from a real learner.

The engines are shared by every test in this module (starting one takes seconds), so tests publish weights
under names of their own and never assume a fresh pool.
"""

import asyncio
import dataclasses
import itertools
import re

import pytest
import ray
from pydantic import ValidationError

from rl.checkpoints import SamplerWeights
from rl.learner import LearnerActor
from rl.sampler import SamplerPool, WeightSyncError, probe_batch
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig, ModelInput, SampleRequest, SamplingParams

PROMPT = ModelInput.from_ints([1, 382, 201, 289, 270, 223, 20, 294, 223, 21])


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
    """A run trained hard enough that its samples differ clearly from the base model's."""
    model_id = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=0, train_unembed=False)))
    tokens = PROMPT.to_ints() + [600, 601, 602, 603, 604, 605]
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for _ in range(30):
        ray.get(learner.forward_backward.remote(model_id, ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")))
        ray.get(learner.optim_step.remote(model_id, AdamParams(learning_rate=3e-3)))
    return model_id


def request(**params) -> SampleRequest:
    num_samples = params.pop("num_samples", 1)
    model_path = params.pop("model_path", None)
    return SampleRequest(prompt=PROMPT, num_samples=num_samples, model_path=model_path,
                         sampling_params=SamplingParams(**{"max_tokens": 12, **params}))


def learner_logprobs(learner, model_id, prompt: list[int], sampled: list[int]) -> list[float]:
    tokens = prompt + sampled
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)})
    output = ray.get(learner.forward.remote(model_id, ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")))
    return output.loss_fn_outputs[0]["logprobs"].data[len(prompt) - 1:]


def mean_abs_difference(a, b) -> float:
    assert len(a) == len(b)
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_seeded_samples_repeat_and_n_samples_differ(pool):
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


def test_sampled_logprobs_match_the_learner(pool, learner, tiny_model_dir):
    # A fresh adapter has B = 0: its logprobs are the base model's.
    base_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=1, train_unembed=False)))
    response = run(pool.sample(request(num_samples=2, seed=0, temperature=1.0)))
    for sequence in response.sequences:
        expected = learner_logprobs(learner, base_run, PROMPT.to_ints(), sequence.tokens)
        assert mean_abs_difference(sequence.logprobs, expected) < 1e-3


def test_prompt_logprobs_and_top_k(pool, learner, tiny_model_dir):
    base_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=1, train_unembed=False)))
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


def test_published_weights_change_samples_and_match_the_new_learner(pool, learner, trained):
    base = run(pool.sample(request(temperature=0.0)))
    version = run(pool.publish_from_learner(learner, trained, "published"))
    assert version.tinker_path == f"tinker://{trained}/sampler_weights/published"
    tuned = run(pool.sample(request(temperature=0.0, model_path=version.tinker_path)))
    assert tuned.model_path == version.tinker_path and tuned.content_hash == version.content_hash
    assert tuned.sequences[0].tokens[:6] == [600, 601, 602, 603, 604, 605], "the adapter's lesson is served"
    assert tuned.sequences[0].tokens != base.sequences[0].tokens
    expected = learner_logprobs(learner, trained, PROMPT.to_ints(), tuned.sequences[0].tokens)
    assert mean_abs_difference(tuned.sequences[0].logprobs, expected) < 1e-3

    # Every replica serves it, including one that first sees it on demand.
    responses = run_all([pool.sample(request(temperature=0.0, model_path=version.tinker_path)) for _ in range(6)])
    assert all(r.sequences[0].tokens == tuned.sequences[0].tokens for r in responses)
    session = pool.create_sampling_session(version.tinker_path)
    by_session = run(pool.sample(SampleRequest(prompt=PROMPT, sampling_session_id=session, seq_id=0,
                                               sampling_params=SamplingParams(max_tokens=12, temperature=0.0))))
    assert by_session.model_path == version.tinker_path
    assert by_session.sequences[0].tokens == tuned.sequences[0].tokens


def test_stale_or_corrupted_weights_are_caught(pool, learner, trained, tiny_model_dir):
    good = run(pool.publish_from_learner(learner, trained, "good"))
    weights = ray.get(learner.sampler_weights.remote(good.tinker_path))
    fresh_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=2, train_unembed=False)))
    base_probe = ray.get(learner.forward.remote(fresh_run, probe_batch(pool.info["vocab_size"])))
    stale_probe = base_probe.loss_fn_outputs[0]["logprobs"].data
    with pytest.raises(WeightSyncError, match="disagrees with the learner on the probe"):
        run(pool.publish(weights, stale_probe))  # the learner says "base model", the replica serves the adapter

    corrupted = dict(weights.files)
    corrupted["adapter_model.safetensors"] = corrupted["adapter_model.safetensors"][:-8] + b"\0" * 8
    with pytest.raises(WeightSyncError, match="do not match their content hash"):
        run(pool.publish(dataclasses.replace(weights, files=corrupted), good.probe_logprobs))

    # vLLM serves the old weights when a LoRA id is reused: the verification must notice.
    retrained = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=0, train_unembed=False)))
    newer = ray.get(learner.sampler_weights.remote(
        ray.get(learner.save_weights_for_sampler.remote(retrained, "newer")).path))
    newer_probe = ray.get(learner.forward.remote(retrained, probe_batch(pool.info["vocab_size"])))
    ids = pool._lora_ids
    pool._lora_ids = itertools.repeat(good.lora_int_id)
    try:
        with pytest.raises(WeightSyncError):
            run(pool.publish(SamplerWeights(newer.tinker_path, newer.content_hash, newer.files),
                             newer_probe.loss_fn_outputs[0]["logprobs"].data))
    finally:
        pool._lora_ids = ids
    assert run(pool.sample(request(temperature=0.0, model_path=good.tinker_path))).content_hash == good.content_hash


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
    first = run(pool.publish_from_learner(learner, trained, "lru-0"))
    before = run(pool.sample(request(temperature=0.0, model_path=first.tinker_path)))
    for index in range(1, 4):  # max_loras is 2: these push lru-0 out of every engine
        ray.get(learner.forward_backward.remote(trained, probe_batch(2048)))
        ray.get(learner.optim_step.remote(trained, AdamParams(learning_rate=1e-3)))
        run(pool.publish_from_learner(learner, trained, f"lru-{index}"))
    after = run(pool.sample(request(temperature=0.0, model_path=first.tinker_path)))
    assert after.sequences[0].tokens == before.sequences[0].tokens
    assert after.sequences[0].logprobs == pytest.approx(before.sequences[0].logprobs, abs=1e-5)


def test_a_killed_replica_loses_no_request(pool):
    victim = pool._replicas[0]

    async def scenario():
        tasks = [asyncio.ensure_future(pool.sample(request(max_tokens=240, num_samples=4, temperature=1.0, seed=i)))
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


def test_an_adapter_of_lm_head_is_refused_clearly(pool, learner, tiny_model_dir):
    model_id = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=0)))  # train_unembed
    with pytest.raises(ValueError, match="adapts lm_head, which vLLM's LoRA cannot serve"):
        run(pool.publish_from_learner(learner, model_id, "with-unembed"))


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


@pytest.fixture(scope="module")
def merge_pool(ray_local, tiny_model_dir):
    pool = SamplerPool(str(tiny_model_dir), replicas=1, max_model_len=256, dtype="float32", publish_mode="merge")
    yield pool
    pool.shutdown()


def test_merge_mode_serves_what_adapter_mode_serves(pool, merge_pool, learner, trained, tiny_model_dir):
    base = run(merge_pool.sample(request(temperature=0.0)))
    assert base.sequences[0].tokens == run(pool.sample(request(temperature=0.0))).sequences[0].tokens

    other = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=4, seed=5, train_unembed=False)))
    for _ in range(3):
        ray.get(learner.forward_backward.remote(other, probe_batch(2048)))
        ray.get(learner.optim_step.remote(other, AdamParams(learning_rate=1e-2)))
    first = run(merge_pool.publish_from_learner(learner, other, "merge-first"))
    version = run(merge_pool.publish_from_learner(learner, trained, "merge-second"))  # replaces, never adds up
    reference = run(pool.publish_from_learner(learner, trained, "merge-reference"))
    for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7, "num_samples": 3}):
        merged = run(merge_pool.sample(request(model_path=version.tinker_path, **params)))
        adapted = run(pool.sample(request(model_path=reference.tinker_path, **params)))
        assert merged.content_hash == version.content_hash
        assert [s.tokens for s in merged.sequences] == [s.tokens for s in adapted.sequences]
        for served, expected in zip(merged.sequences, adapted.sequences, strict=True):
            assert mean_abs_difference(served.logprobs, expected.logprobs) < 1e-4
    assert merged.sequences[0].tokens != base.sequences[0].tokens

    with pytest.raises(ValueError, match="serves only the latest published version"):
        run(merge_pool.sample(request(model_path=first.tinker_path)))
    with pytest.raises(ValueError, match=r"\(the base model\).*serves only the latest"):
        run(merge_pool.sample(request()))


def test_merge_mode_catches_stale_weights(merge_pool, learner, trained, tiny_model_dir):
    good = run(merge_pool.publish_from_learner(learner, trained, "merge-good"))
    weights = ray.get(learner.sampler_weights.remote(good.tinker_path))
    fresh_run = ray.get(learner.create.remote(str(tiny_model_dir), LoraConfig(rank=8, seed=2, train_unembed=False)))
    stale_probe = ray.get(learner.forward.remote(fresh_run, probe_batch(2048))).loss_fn_outputs[0]["logprobs"].data
    with pytest.raises(WeightSyncError, match="disagrees with the learner on the probe"):
        run(merge_pool.publish(weights, stale_probe))
    served = run(merge_pool.sample(request(temperature=0.0, model_path=good.tinker_path)))
    assert served.content_hash == good.content_hash, "the rejected weights were replaced by the last good ones"
    assert served.sequences[0].tokens[:6] == [600, 601, 602, 603, 604, 605]
