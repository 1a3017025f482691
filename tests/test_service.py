"""The official tinker SDK (0.38.0), unchanged, against `rl-serve`'s app on the tiny model: real HTTP, real
learner and vLLM actors. One server is shared by the module; each test uses runs of its own."""

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import tinker
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from rl.service.app import ServerThread, free_port
from rl.service.service import Service

ALICE, BOB = "tml-alice-key", "tml-bob-key"
CAROL, DAVE = "tml-carol-key", "tml-dave-key"
"""Users of the joined-pass test alone: the learner's turns share it by tokens, so whether two users' calls are
due together depends on what each sent before."""
PATTERN = [5, 17, 33, 17, 33, 17, 33, 17, 33, 9]


SAMPLER_VERSIONS = 3
"""Sampler checkpoints the test server keeps ready to sample (rl-serve's default is 8)."""


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, tmp_path_factory):
    # The learner keeps its checkpoints in a folder of its own, as it would on another node.
    service = Service([str(tiny_model_dir)], tmp_path_factory.mktemp("storage"),
                      [ALICE, BOB, CAROL, DAVE],
                      context={str(tiny_model_dir): 256}, max_lora_rank=8,
                      learner_storage=str(tmp_path_factory.mktemp("learner-node")), max_batch_datums=64,
                      max_batch_tokens=4096, max_sample_tokens=1024, sampler_versions=SAMPLER_VERSIONS)
    running = ServerThread(service, max_body_bytes=2**20)
    yield running
    stop(running)


CLOSERS: dict[str, list] = {}
"""Per server URL, how to close the SDK clients made for it: before the server stops, or their last telemetry
fails at exit with tracebacks after pytest's result."""


def client(server: ServerThread, key: str = ALICE, **options) -> tinker.ServiceClient:
    sdk_client = tinker.ServiceClient(base_url=server.url, api_key=key, **options)
    CLOSERS.setdefault(server.url, []).append(lambda: sdk_client.close("success").result())
    return sdk_client


def rest_client(server: ServerThread, key: str = ALICE) -> tinker.RestClient:
    rest = tinker.RestClient(base_url=server.url, api_key=key)
    CLOSERS.setdefault(server.url, []).append(rest.holder.close)
    return rest


def stop(server: ServerThread) -> None:
    for close in CLOSERS.pop(server.url, []):
        close()
    server.stop()
    server.service.close()


def datum(tokens=PATTERN) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def training_client(server: ServerThread, key: str = ALICE, seed: int | None = 0):
    """The SDK's defaults (train_unembed=True: lm_head adapted too), at the server's rank limit."""
    return client(server, key).create_lora_training_client(base_model=server.service_model, rank=8,
                                                            seed=seed).result()


@pytest.fixture(scope="module", autouse=True)
def _model_name(server, tiny_model_dir):
    server.service_model = str(tiny_model_dir)


def test_supervised_loop_loss_falls(server):
    trainer = training_client(server)
    losses = []
    for _ in range(4):
        output = trainer.forward_backward([datum()], "cross_entropy").result()
        losses.append(output.metrics["loss:sum"])
        assert len(output.loss_fn_outputs) == 1 and output.loss_fn_outputs[0]["logprobs"].shape == [9]
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert losses[-1] < losses[0] * 0.7, losses


def test_sampling_with_seeds_and_logprobs_that_match_the_learner(server):
    trainer = training_client(server, seed=1)
    for _ in range(3):
        trainer.forward_backward([datum()], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = trainer.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(PATTERN[:4])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    first = sampler.sample(prompt=prompt, num_samples=3, sampling_params=params).result()
    again = sampler.sample(prompt=prompt, num_samples=3, sampling_params=params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences], "seeded: repeatable"
    assert len(first.sequences) == 3 and all(len(s.tokens) == 6 for s in first.sequences)
    sequence = first.sequences[0]
    tokens = PATTERN[:4] + sequence.tokens
    learner = trainer.forward([types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)})], "cross_entropy").result()
    expected = learner.loss_fn_outputs[0]["logprobs"].tolist()[3:]
    assert np.allclose(sequence.logprobs, expected, atol=1e-3), (sequence.logprobs, expected)
    prompt_logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert prompt_logprobs[0] is None and np.allclose(prompt_logprobs[1:], learner.loss_fn_outputs[0][
        "logprobs"].tolist(), atol=1e-3)
    last = sampler.compute_logprobs(types.ModelInput.from_ints(tokens), prompt_logprobs_last_n=4).result()
    assert last[:-4] == [None] * (len(tokens) - 4) and np.allclose(last[-4:], prompt_logprobs[-4:], atol=1e-5)
    # Top-k of each sampled token (distillation), through the SDK's protobuf: sorted, holding the sampled token
    # whenever it is among the k most likely.
    topk = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params, topk_sample_logprobs=3).result()
    sequence = topk.sequences[0]
    assert sequence.tokens == first.sequences[0].tokens and len(sequence.topk_logprobs) == 6
    for pairs, token, logprob in zip(sequence.topk_logprobs, sequence.tokens, sequence.logprobs, strict=True):
        assert len(pairs) == 3 and [lp for _, lp in pairs] == sorted((lp for _, lp in pairs), reverse=True)
        assert pairs[0][1] >= logprob - 1e-6 and (token not in dict(pairs) or dict(pairs)[token] == pytest.approx(
            logprob, abs=1e-5))


def test_only_the_latest_sampler_checkpoints_stay_published_and_an_older_one_is_published_again(server):
    """Every save would otherwise hold its files in Ray's object store and an adapter on each replica for as long
    as the server runs: the pool keeps the SAMPLER_VERSIONS used last, and publishes an older one again when it
    is sampled, with the same weights."""
    trainer = training_client(server, seed=2)
    pool = server.service.pools[server.service_model]
    tokens = types.ModelInput.from_ints(PATTERN)
    service = client(server)
    paths, samplers, logprobs = [], [], []
    for index in range(SAMPLER_VERSIONS + 1):
        trainer.forward_backward([datum()], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        paths.append(trainer.save_weights_for_sampler(f"kept-{index}").result().path)
        samplers.append(service.create_sampling_client(model_path=paths[-1]))
        logprobs.append(samplers[-1].compute_logprobs(tokens).result()[1:])
    assert [pool.published(path) for path in paths] == [False] + [True] * SAMPLER_VERSIONS
    assert pool._versions[paths[0]] is None, "its files are let go"
    again = samplers[0].compute_logprobs(tokens).result()[1:]  # published again: the same weights
    assert np.allclose(again, logprobs[0], atol=1e-5) and not np.allclose(again, logprobs[1], atol=1e-3)
    assert [pool.published(path) for path in paths] == [True, False, True, True], "now the least recently used goes"
    fresh = service.create_sampling_client(model_path=paths[1])  # a new session on a retired one
    assert np.allclose(fresh.compute_logprobs(tokens).result()[1:], logprobs[1], atol=1e-5)
    assert [pool.published(path) for path in paths] == [True, True, False, True]
    # A deleted sampler checkpoint is no longer served, published or not.
    rest_client(server).delete_checkpoint_from_tinker_path(paths[3]).result()
    assert not pool.published(paths[3])
    with pytest.raises(tinker.RequestFailedError, match="no checkpoint at tinker://.*/sampler_weights/kept-3"):
        samplers[3].compute_logprobs(tokens).result()
    with pytest.raises(ValueError, match="sampler_versions=0: keep at least 1"):
        Service([server.service_model], server.service.storage, [ALICE], sampler_versions=0)


def test_policy_losses_and_a_custom_loss(server):
    trainer = training_client(server, seed=2)
    tokens = PATTERN
    policy = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tokens[1:], "logprobs": [-2.0] * 9, "advantages": [0.5] * 9})
    bounds = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    for loss_fn, config in (("importance_sampling", None), ("ppo", bounds), ("gspo", bounds)):
        output = trainer.forward_backward([policy], loss_fn, loss_fn_config=config).result()
        log_ratio = np.asarray(output.loss_fn_outputs[0]["logprobs"].tolist()) + 2.0  # sampler logprobs: -2
        if loss_fn == "gspo":  # one ratio for the sequence: the geometric mean of the tokens'
            log_ratio = np.full_like(log_ratio, log_ratio.mean())
        ratio = np.exp(log_ratio)
        kept = ratio if config is None else np.minimum(ratio, np.clip(ratio, 0.9, 1.1))  # advantages > 0
        assert output.metrics["loss:sum"] == pytest.approx(-(kept * 0.5).sum(), rel=1e-4), loss_fn
    with pytest.raises(tinker.RequestFailedError, match="loss_fn 'stable_reinforce' is not supported"):
        trainer.forward_backward([policy], "stable_reinforce").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    # A gradient that overflows: the step is skipped and said so, and the run trains on.
    huge = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tokens[1:], "weights": [3e38] * 9})
    trainer.forward_backward([huge], "cross_entropy").result()
    assert trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["skipped_steps:sum"] == 1.0
    before = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    trainer.forward_backward([datum()], "cross_entropy").result()
    assert trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["skipped_steps:sum"] == 0.0
    assert trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"] < before

    def mean_logprob(data, logprobs_list):
        loss = -sum(lp.sum() for lp in logprobs_list) / 9
        return loss, {"custom:mean": loss.item()}

    custom = trainer.forward_backward_custom([datum()], mean_logprob).result()
    reference = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    assert custom.metrics["custom:mean"] == pytest.approx(reference / 9, rel=1e-4)


def test_a_custom_loss_traced_by_the_sdk_runs_on_the_server(server):
    service = client(server)
    on_server, on_client = (service.create_lora_training_client(base_model=server.service_model, rank=8,
                                                                seed=9).result() for _ in range(2))

    def weighted_mean(logprobs, weights):
        return -(logprobs * weights).sum() / 9, {"custom/mean_logprob:mean": logprobs.mean()}

    handle = service.create_custom_loss(weighted_mean, {"logprobs": 1, "weights": 1}).result()
    assert handle.loss_id is not None, "uploaded: client/config says the server runs custom losses"
    logprobs = np.asarray(on_server.forward([datum()], "cross_entropy").result().loss_fn_outputs[0][
        "logprobs"].tolist())
    output = on_server.forward_backward_custom([datum()], handle).result()  # one server-side pass
    assert output.metrics["loss:sum"] == pytest.approx(-logprobs.sum() / 9, rel=1e-5)
    assert output.metrics["custom/mean_logprob:mean"] == pytest.approx(logprobs.mean(), rel=1e-5)

    # The same loss on the client (a forward, then cross_entropy with the gradients as weights): the same step.
    def client_side(data, logprobs_list):
        return weighted_mean(logprobs_list[0], data[0].loss_fn_inputs["weights"].to_torch())

    on_client.forward_backward_custom([datum()], client_side).result()
    for trainer in (on_server, on_client):
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = [trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
             for trainer in (on_server, on_client)]
    assert after[0] == pytest.approx(after[1], rel=1e-5) and after[0] < -logprobs.sum() - 0.1

    evil = {"session_id": service.holder.get_session_id(), "custom_loss_seq_id": 99, "name": "evil",
            "inputs": [{"name": "logprobs", "rank": 1}],
            "graph": {"format": 1, "nodes": [
                {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
                {"op": "call_function", "name": "boom", "target": "builtins.eval", "args": ["1 + 1"]},
                {"op": "output", "name": "output", "target": "output",
                 "args": [{"tuple": [{"ref": "boom"}, {"dict": {}}]}]}]}}
    refused = httpx.post(f"{server.url}/api/v1/create_custom_loss", headers={"X-API-Key": ALICE}, json=evil)
    assert refused.status_code == 400 and "node 'boom' calls 'builtins.eval'" in refused.json()["error"]


def test_sessions_list_their_runs_and_samplers(server):
    service = client(server, ALICE, user_metadata={"purpose": "listing"}, display_name="listing test")
    trainer = service.create_lora_training_client(base_model=server.service_model, rank=8, seed=11).result()
    trainer.save_weights_and_get_sampling_client().result()
    session_id = service.holder.get_session_id()
    rest = rest_client(server, ALICE)
    assert session_id in rest.list_sessions().result().sessions
    found = rest.get_session(session_id).result()
    assert found.training_run_ids == [trainer.model_id] and len(found.sampler_ids) == 1
    assert found.user_metadata == {"purpose": "listing"} and found.display_name == "listing test"
    assert session_id not in rest_client(server, BOB).list_sessions().result().sessions
    with pytest.raises(tinker.BadRequestError, match="unknown session_id"):
        rest_client(server, BOB).get_session(session_id).result()


def test_save_state_and_resume_with_optimizer(server):
    service = client(server)
    trainer = training_client(server, seed=3)
    trainer.forward_backward([datum()], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = trainer.save_state("resume-me").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/resume-me")
    restored = service.create_training_client_from_state_with_optimizer(path).result()
    for one in (trainer, restored):
        one.forward_backward([datum()], "cross_entropy").result()
        one.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    original = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    assert restored.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(original,
                                                                                                     rel=1e-5)


def test_rest_listings_and_two_users_isolated(server):
    trainer = training_client(server, seed=4)
    trainer.forward_backward([datum()], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = trainer.save_state("listed").result().path
    saved_loss = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    rest = rest_client(server, ALICE)
    run_id = path.removeprefix("tinker://").split("/")[0]
    runs = rest.list_training_runs().result()
    assert run_id in [run.training_run_id for run in runs.training_runs]
    checkpoints = rest.list_checkpoints(run_id).result().checkpoints
    assert [c.tinker_path for c in checkpoints] == [path] and checkpoints[0].checkpoint_type == "training"
    assert rest.get_weights_info_by_tinker_path(path).result().lora_rank == 8

    bob = rest_client(server, BOB)
    assert run_id not in [run.training_run_id for run in bob.list_training_runs().result().training_runs]
    with pytest.raises(Exception, match="unknown model_id"):
        bob.list_checkpoints(run_id).result()
    with pytest.raises(Exception, match="no checkpoint"):
        client(server, BOB).create_training_client_from_state(path).result()
    rest.publish_checkpoint_from_tinker_path(path).result()
    public = client(server, BOB).create_training_client_from_state(path).result()  # public: Bob may load it
    assert public.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(saved_loss,
                                                                                                   rel=1e-5)
    # Saved again under that name, it is a new checkpoint, and private (as one saved after a public one expired).
    assert trainer.save_state("listed", overwrite=True).result().path == path
    with pytest.raises(Exception, match="no checkpoint"):
        client(server, BOB).create_training_client_from_state(path).result()


def test_bad_input_is_named_and_the_server_goes_on(server):
    trainer = training_client(server, seed=5)
    before = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    with pytest.raises(tinker.RequestFailedError, match="outside the vocabulary"):
        trainer.forward_backward([datum([1, 2, 4096])], "cross_entropy").result()
    headers = {"X-API-Key": ALICE}
    api = f"{server.url}/api/v1"
    # The SDK checks loss names itself, so an unknown one is sent by hand, in the SDK's own encoding.
    unknown_loss = forward_backward_request_to_proto(types.ForwardBackwardRequest(
        model_id=trainer.model_id, seq_id=2, forward_backward_input=types.ForwardBackwardInput(
            data=[datum()], loss_fn="cross_entropy")))
    unknown_loss.loss_fn = "no_such_loss"
    reply = httpx.post(f"{api}/forward_backward", content=unknown_loss.SerializeToString(),
                       headers={**headers, "Content-Type": "application/x-protobuf"})
    assert reply.status_code == 400 and "no_such_loss" in reply.json()["error"]
    malformed = httpx.post(f"{api}/optim_step", content=b"{not json", headers=headers)
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
    garbage = httpx.post(f"{api}/forward_backward", content=b"\xff\x00garbage", headers=headers)
    assert garbage.status_code == 400 and "ForwardBackwardRequest" in garbage.json()["error"]
    unknown = httpx.post(f"{api}/get_info", json={"model_id": "nobody:train:0"}, headers=headers)
    assert unknown.status_code == 400 and "unknown model_id" in unknown.json()["error"]
    oversized = httpx.post(f"{api}/optim_step", content=b"x" * (2**20 + 1), headers=headers)
    assert oversized.status_code == 413 and "exceeds the limit" in oversized.json()["error"]
    chunked = httpx.post(f"{api}/optim_step", content=iter([b"x" * 2**19] * 3), headers=headers)  # no length given
    assert chunked.status_code == 413 and "exceeds the limit of 1048576" in chunked.json()["error"]
    stranger = httpx.post(f"{api}/create_session", json={}, headers={"X-API-Key": "tml-stranger"})
    assert stranger.status_code == 401
    missing_field = httpx.post(f"{api}/optim_step", json={"model_id": trainer.model_id, "seq_id": 9}, headers=headers)
    assert missing_field.status_code == 400 and "adam_params" in missing_field.json()["error"]
    unknown_field = httpx.post(f"{api}/get_info", json={"model_id": trainer.model_id, "colour": 1}, headers=headers)
    assert unknown_field.status_code == 400 and "colour" in unknown_field.json()["error"]
    after = trainer.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"]
    assert after == pytest.approx(before, rel=1e-6), "still works, and nothing refused changed the run"
    # A create_model resent (its answer lost on the way) is the same request, not a second run refused as existing.
    session = httpx.post(f"{api}/create_session", json={}, headers=headers).json()["session_id"]
    create = {"session_id": session, "model_seq_id": 0, "base_model": server.service_model,
              "lora_config": {"rank": 8, "seed": 3}}
    first, resent = (httpx.post(f"{api}/create_model", json=create, headers=headers).json()["request_id"]
                     for _ in range(2))
    answer = httpx.post(f"{api}/retrieve_future", json={"request_id": resent}, headers=headers).json()
    assert first == resent and answer == {"model_id": f"{session}:train:0"}, answer


def test_a_result_not_ready_is_answered_try_again_and_the_sdk_asks_again(server, monkeypatch):
    answers: list[bool] = []  # per retrieve_future: whether the result was ready
    retrieve = server.service.futures.retrieve

    async def counted(*args, **kwargs):
        result = await retrieve(*args, **kwargs)
        answers.append(result is not None)
        return result

    monkeypatch.setattr(server.service.futures, "poll_seconds", 0.0)  # each retrieve answers at once: try_again
    monkeypatch.setattr(server.service.futures, "retrieve", counted)
    headers, api = {"X-API-Key": ALICE}, f"{server.url}/api/v1"
    sample = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": PATTERN[:4]}]}, "num_samples": 4,
              "base_model": server.service_model, "sampling_params": {"max_tokens": 64, "seed": 0}}
    request_id = httpx.post(f"{api}/asample", json=sample, headers=headers).json()["request_id"]
    replies = [httpx.post(f"{api}/retrieve_future", json={"request_id": request_id}, headers=headers)]
    while replies[-1].headers["content-type"] == "application/json":
        replies.append(httpx.post(f"{api}/retrieve_future", json={"request_id": request_id}, headers=headers))
    # 64 tokens take the engine many steps, so the first ask comes before the result.
    assert replies[0].json() == {"type": "try_again", "request_id": request_id, "queue_state": "active"}
    assert replies[-1].status_code == 200 and replies[-1].headers["content-type"] == "application/x-protobuf"
    assert answers == [False] * (len(replies) - 1) + [True]

    answers.clear()
    sampler = client(server).create_sampling_client(base_model=server.service_model)
    sampled = sampler.sample(types.ModelInput.from_ints(PATTERN[:4]), 4,
                             types.SamplingParams(max_tokens=64, seed=0)).result()
    assert len(sampled.sequences) == 4 and all(len(s.tokens) == len(s.logprobs) for s in sampled.sequences)
    assert answers[0] is False and answers[-1] is True, "the SDK got try_again and asked until the result came"


def test_eight_concurrent_clients_finish_five_steps_each(server):
    from concurrent.futures import ThreadPoolExecutor

    def five_steps(index: int) -> list[float]:
        trainer = training_client(server, BOB if index % 2 else ALICE, seed=100 + index)
        losses = []
        for _ in range(5):
            losses.append(trainer.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"])
            trainer.optim_step(types.AdamParams(learning_rate=3e-3)).result()
        return losses

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(five_steps, range(8)))
    assert len(results) == 8 and all(len(losses) == 5 and losses[-1] < losses[0] for losses in results), results


def test_rl_serve_from_the_command_line_and_its_runs_and_checkpoints_survive_a_restart(ray_local, tmp_path):
    rl_serve = str(Path(sys.executable).parent / "rl-serve")
    refused = subprocess.run([rl_serve, "host=0.0.0.0", "models=[tiny]", f"storage={tmp_path}"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0 and "only listens on loopback" in refused.stderr

    port = free_port()
    process = subprocess.Popen([rl_serve, f"port={port}", "models=[tiny]", f"storage={tmp_path}", "+context.tiny=256",
                                "max_lora_rank=8"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TINKER_TELEMETRY": "0"})
    prompt, greedy = types.ModelInput.from_ints(PATTERN[:4]), types.SamplingParams(max_tokens=6, temperature=0)
    try:
        banner = process.stdout.readline()
        while not banner.startswith("rl-serve:"):
            assert process.poll() is None, "rl-serve exited"
            banner = process.stdout.readline()
        assert f"tiny on http://127.0.0.1:{port}" in banner and "single user, loopback only" in banner
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        health = None
        while health != {"status": "ok"}:
            assert time.time() < deadline, f"rl-serve did not answer OK: {health}"
            try:
                health = httpx.get(f"{url}/api/v1/healthz").json()
            except httpx.TransportError:
                time.sleep(0.2)
        rest = tinker.RestClient(base_url=url, api_key="tml-anyone")  # asked again after the restart
        CLOSERS.setdefault(url, []).append(rest.holder.close)
        capabilities = rest.get_server_capabilities().result()
        assert [(model.model_name, model.max_context_length) for model in capabilities.supported_models] == [
            ("tiny", 256)]
        service = tinker.ServiceClient(base_url=url, api_key="tml-anyone")
        CLOSERS.setdefault(url, []).append(lambda: service.close("success").result())
        with pytest.raises(tinker.BadRequestError, match="rank 16 exceeds this server's max_lora_rank 8"):
            service.create_lora_training_client(base_model="tiny", rank=16).result()
        trainer = service.create_lora_training_client(base_model="tiny", rank=8, seed=7).result()
        fresh_loss = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
        trainer.forward_backward([datum()], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        path = trainer.save_state("kept").result().path
        sampler_path = trainer.save_weights_for_sampler("kept-sampler").result().path
        expected = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
        sampled = trainer.create_sampling_client(sampler_path).result().sample(prompt, 1, greedy).result()
        unsaved = service.create_lora_training_client(base_model="tiny", rank=8, seed=8).result()
        unsaved.forward_backward([datum()], "cross_entropy").result()  # trained, never saved
        tokens = PATTERN  # a fresh adapter (B = 0) is the base model: its loss is the tiny model's, ~ln(2048) a token
        assert 6.0 * (len(tokens) - 1) < fresh_loss < 9.0 * (len(tokens) - 1), fresh_loss
    finally:
        process.terminate()
        process.wait(timeout=60)

    # The same storage served again (here in this process, on the same port): the runs, their checkpoints and
    # weights are back, and the SDK's clients of the first server go on.
    second = ServerThread(Service(["tiny"], tmp_path, [], max_lora_rank=8), port=port)
    try:
        # A run unchanged since its last save goes on where it was; one that trained since is told what it lost.
        assert trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
            expected, rel=1e-5)
        with pytest.raises(tinker.RequestFailedError, match="the server restarted; the run was restored from a new "
                                                            "adapter .*: the steps and gradients after it are lost"):
            unsaved.forward([datum()], "cross_entropy").result()
        assert unsaved.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
            fresh_loss, rel=1e-4), "a new adapter is the base model again"
        assert rest.get_server_capabilities().result().supported_models[0].max_context_length == 1024, \
            "the model's own context when the config names none"
        run_id = path.removeprefix("tinker://").split("/")[0]
        assert [run.training_run_id for run in rest.list_training_runs().result().training_runs] == [
            run_id, unsaved.model_id]
        assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [path, sampler_path]
        restored = client(second, "tml-anyone").create_training_client_from_state(path).result()
        assert restored.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
            expected, rel=1e-5)
        # A sampler checkpoint saved before the restart is published again, verified, on first use.
        sampler = client(second, "tml-anyone").create_sampling_client(model_path=sampler_path).result()
        again = sampler.sample(prompt, 1, greedy).result()
        assert again.sequences[0].tokens == sampled.sequences[0].tokens
        assert again.sequences[0].logprobs == pytest.approx(sampled.sequences[0].logprobs, abs=1e-4)
    finally:
        stop(second)


def storage_usage(server: ServerThread, key: str = ALICE) -> tuple[int, int]:
    admin = tinker.AdminClient(base_url=server.url, api_key=key)
    CLOSERS.setdefault(server.url, []).append(admin.holder.close)
    [usage] = admin.get_current_checkpoint_storage_usage().result().data
    assert usage.size_gigabytes == pytest.approx(usage.size_bytes / 1e9)
    return usage.checkpoint_count, usage.size_bytes


def test_checkpoint_housekeeping_and_loading_into_a_run(server, tmp_path_factory):
    trainer = training_client(server, seed=6)
    alice_before, bob_before = storage_usage(server), storage_usage(server, BOB)
    first = trainer.save_state("first", ttl_seconds=7200, user_metadata={"stage": "warmup"}).result().path
    saved_loss = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    trainer.forward_backward([datum()], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"] < saved_loss - 0.1
    trainer.load_state(first).result()  # back to the saved adapter, into the same run
    assert trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(saved_loss,
                                                                                                    rel=1e-5)
    rest = rest_client(server, ALICE)
    assert first in [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints]
    listed = rest.list_checkpoints(trainer.model_id).result().checkpoints[0]
    assert listed.user_metadata == {"stage": "warmup"}
    assert 7100 < (listed.expires_at - datetime.now(UTC)).total_seconds() <= 7200
    rest.set_checkpoint_ttl_from_tinker_path(first, None).result()  # PUT .../ttl
    assert rest.list_checkpoints(trainer.model_id).result().checkpoints[0].expires_at is None
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds") as too_short:
        rest.set_checkpoint_ttl_from_tinker_path(first, 60).result()  # under an hour
    assert "Traceback" not in str(too_short.value), "the learner's message, not Ray's wrapping of it"
    sampler_path = trainer.save_weights_for_sampler("for-sampling").result().path
    [run_folder] = tmp_path_factory.getbasetemp().glob(f"learner-node[0-9]*/{trainer.model_id}")
    on_disk = sum(f.stat().st_size for f in run_folder.rglob("*") if f.is_file() and f.name != "checkpoint.json")
    alice_after = storage_usage(server)
    assert alice_after == (alice_before[0] + 2, alice_before[1] + on_disk) and on_disk > 10_000
    assert storage_usage(server, BOB) == bob_before
    with pytest.raises(tinker.BadRequestError, match="project_id 'p1': rl-serve has no projects"):
        tinker.AdminClient(base_url=server.url, api_key=ALICE).get_current_checkpoint_storage_usage("p1").result()
    with pytest.raises(tinker.RequestFailedError, match="for-sampling exists"):
        trainer.save_weights_for_sampler("for-sampling").result()
    mismatched = httpx.post(f"{server.url}/api/v1/asample", headers={"X-API-Key": ALICE}, json={
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PATTERN[:4]}]}, "model_path": sampler_path,
        "base_model": "SmolLM2-135M-Instruct", "sampling_params": {"max_tokens": 2}})
    assert mismatched.status_code == 400 and "disagrees with model_path" in mismatched.json()["error"]
    rest.delete_checkpoint_from_tinker_path(f"tinker://{trainer.model_id}/sampler_weights/for-sampling").result()
    unserved = httpx.get(f"{server.url}/api/v1/billing/usage/events", headers={"X-API-Key": ALICE})
    assert unserved.status_code == 404 and "GET /api/v1/billing/usage/events is not served by rl-serve" in \
        unserved.json()["error"]
    rest.publish_checkpoint_from_tinker_path(first).result()
    assert any(c.public for c in rest.list_checkpoints(trainer.model_id).result().checkpoints)
    rest.unpublish_checkpoint_from_tinker_path(first).result()
    assert not any(c.public for c in rest.list_checkpoints(trainer.model_id).result().checkpoints)
    rest.delete_checkpoint_from_tinker_path(first).result()
    assert rest.list_checkpoints(trainer.model_id).result().checkpoints == []
    named_like_an_action = trainer.save_state("publish").result().path  # .../weights/publish, not a publish
    rest.delete_checkpoint_from_tinker_path(named_like_an_action).result()
    assert rest.list_checkpoints(trainer.model_id).result().checkpoints == []
    wrong_type = httpx.post(f"{server.url}/api/v1/optim_step", headers={"X-API-Key": ALICE}, json={
        "model_id": trainer.model_id, "seq_id": 99, "adam_params": {"learning_rate": "fast"}})
    assert wrong_type.status_code == 400 and "learning_rate" in wrong_type.json()["error"]


def test_external_weights_download_as_a_peft_folder_with_the_sdk_cli(server, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = training_client(server, seed=10)
    trainer.forward_backward([datum()], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    exported = trainer.save_weights_external("export", ttl_seconds=3600).result().path
    assert exported == f"tinker://{trainer.model_id}/external_weights/export"
    rest = rest_client(server, ALICE)
    signed = rest.get_external_weights_urls(exported).result()
    assert set(signed.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    assert 3500 < (signed.expires - datetime.now(UTC)).total_seconds() <= 3600
    url = signed.urls["adapter_config.json"]
    assert httpx.get(url).status_code == 200, "no API key: the signature is the key"
    forged = httpx.get(url[:-1] + ("0" if url[-1] != "0" else "1"))
    assert forged.status_code == 403 and "signature is not valid" in forged.json()["error"]
    stale = server.service._sign(exported, "adapter_config.json", datetime.now(UTC) - timedelta(seconds=1))
    expired = httpx.get(f"{server.url}/api/v1/external_files/{stale}")
    assert expired.status_code == 403 and "has expired" in expired.json()["error"]
    with pytest.raises(tinker.BadRequestError, match="unknown model_id"):  # Alice's run, as Bob sees it
        rest_client(server, BOB).get_external_weights_urls(exported).result()

    # The SDK's own CLI: an external checkpoint, and a training checkpoint (exported through a temporary one).
    state = trainer.save_state("for-download").result().path
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": ALICE, "TINKER_TELEMETRY": "0"}
    cli = str(Path(sys.executable).parent / "tinker")
    for path in (exported, state):
        done = subprocess.run([cli, "checkpoint", "download", path, "--output", str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    expected = np.asarray(trainer.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist())
    for path in (exported, state):
        folder = tmp_path / path.removeprefix("tinker://").replace("/", "_")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
        with torch.no_grad():
            logits = model(torch.tensor([PATTERN[:-1]])).logits[0]
        logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(PATTERN[1:])[:, None])[:, 0].numpy()
        assert np.allclose(logprobs, expected, atol=1e-4), (path, logprobs, expected)


def test_the_server_reads_and_keeps_no_checkpoint_itself(server):
    # Everything about checkpoints goes through the learner (import-linter keeps rl.checkpoints out of the
    # service): the server's own folder holds its registry only, whatever the runs saved.
    trainer = training_client(server, seed=8)
    path = trainer.save_state("elsewhere").result().path
    sampler_path = trainer.save_weights_for_sampler("elsewhere-sampler").result().path
    rest = rest_client(server, ALICE)
    assert [c.tinker_path for c in rest.list_checkpoints(trainer.model_id).result().checkpoints] == [path,
                                                                                                     sampler_path]
    assert rest.get_weights_info_by_tinker_path(path).result().lora_rank == 8
    assert sorted(entry.name for entry in server.service.storage.iterdir()) == ["service.json"]


def raw_forward_backward(server: ServerThread, model_id: str, seq_id: int, data: list) -> httpx.Response:
    request = forward_backward_request_to_proto(types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id, forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn="cross_entropy")))
    return httpx.post(f"{server.url}/api/v1/forward_backward", content=request.SerializeToString(),
                      headers={"X-API-Key": ALICE, "Content-Type": "application/x-protobuf"})


def test_limits_are_listed_refused_by_name_before_any_work_and_the_sdk_splits_big_batches_to_fit(server):
    listed = httpx.get(f"{server.url}/api/v1/get_server_capabilities", headers={"X-API-Key": ALICE}).json()
    assert {key: listed["supported_models"][0][key] for key in ("max_context_length", "max_batch_datums",
                                                                 "max_batch_tokens", "max_sample_tokens")} == {
        "max_context_length": 256, "max_batch_datums": 64, "max_batch_tokens": 4096, "max_sample_tokens": 1024}
    assert client(server).get_server_capabilities().supported_models[0].max_context_length == 256
    trainer = training_client(server, seed=30)
    before = trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\].model_input has 298 tokens, over the model's "
                                                     "context of 256"):
        trainer.forward_backward([datum(list(range(1, 300)))], "cross_entropy").result()
    # What the SDK would split, sent by hand as one request.
    many = raw_forward_backward(server, trainer.model_id, 99, [datum()] * 65)
    assert many.status_code == 400 and "data holds 65 datums" in many.json()["error"]
    long = raw_forward_backward(server, trainer.model_id, 99, [datum(list(range(1, 251)))] * 17)
    assert long.status_code == 400 and "data holds 4233 tokens in all" in long.json()["error"]
    sampler = trainer.save_weights_and_get_sampling_client().result()
    with pytest.raises(tinker.BadRequestError, match="8 x 200 = 1600 tokens; this server samples at most 1024"):
        sampler.sample(prompt=types.ModelInput.from_ints(PATTERN[:4]), num_samples=8,
                       sampling_params=types.SamplingParams(max_tokens=200)).result()
    assert trainer.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before,
                                                                                                     rel=1e-6)
    # 40 datums of 249 tokens (9,960 in all): the SDK sends them in requests within the limits (client/config
    # tells it how), and the results come back as one batch's.
    batch = [datum(list(range(index, index + 250))) for index in range(1, 41)]
    split = trainer.forward(batch, "cross_entropy").result()
    one_by_one = [trainer.forward([one], "cross_entropy").result().metrics["loss:sum"] for one in batch]
    assert len(split.loss_fn_outputs) == 40
    assert split.metrics["loss:sum"] == pytest.approx(sum(one_by_one), rel=1e-5)


def test_a_request_refused_at_the_edge_keeps_its_turn_so_the_run_does_not_wait_for_it(server, monkeypatch):
    # The SDK sends a step's requests at once. One refused before it was queued still takes its seq_id's turn,
    # failing, so the optim_step after it runs at once rather than after GAP_SECONDS, on what the others trained
    # (as on Tinker: each request trains on its own).
    monkeypatch.setattr("rl.service.futures.GAP_SECONDS", 120.0)
    adam = types.AdamParams(learning_rate=1e-2)
    trainer, alone = training_client(server, seed=6), training_client(server, seed=6)
    started = time.monotonic()
    trained = trainer.forward_backward([datum()], "cross_entropy")
    refused = trainer.forward_backward([datum(list(range(1, 300)))], "cross_entropy")
    step = trainer.optim_step(adam)
    with pytest.raises(tinker.BadRequestError, match="over the model's context"):
        refused.result()
    trained.result()
    step.result()
    assert time.monotonic() - started < 60, "the optim_step waited for the refused request's seq_id"
    alone.forward_backward([datum()], "cross_entropy").result()
    alone.optim_step(adam).result()

    def loss(training_client) -> float:
        return training_client.forward([datum()], "cross_entropy").result().metrics["loss:sum"]

    assert loss(trainer) == pytest.approx(loss(alone), rel=1e-5)
    # A made-up seq_id far ahead is refused and takes no turn: the run's own requests go on in order, at once.
    far = raw_forward_backward(server, trainer.model_id, 10_000, [datum(list(range(1, 300)))])
    assert far.status_code == 400 and "over the model's context" in far.json()["error"]
    started = time.monotonic()
    trainer.forward_backward([datum()], "cross_entropy").result()
    trainer.optim_step(adam).result()
    assert time.monotonic() - started < 60 and loss(trainer) < loss(alone)


def test_a_datum_of_the_full_context_trains(server):
    trainer = training_client(server, seed=31)
    full = datum(list(range(3, 260)))  # 256 model_input tokens: the context
    losses = []
    for _ in range(3):
        losses.append(trainer.forward_backward([full], "cross_entropy").result().metrics["loss:sum"])
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert losses[-1] < losses[0], losses


def test_greedy_sampling_of_several_sequences_returns_that_many_with_logprobs(server):
    sampler = client(server).create_sampling_client(base_model=server.service_model)
    greedy = sampler.sample(prompt=types.ModelInput.from_ints(PATTERN[:4]), num_samples=4,
                            sampling_params=types.SamplingParams(max_tokens=5, temperature=0.0)).result()
    assert len(greedy.sequences) == 4
    first = greedy.sequences[0]
    assert len(first.tokens) == 5 and len(first.logprobs) == 5 and all(lp <= 0 for lp in first.logprobs)
    assert all(s.tokens == first.tokens and s.logprobs == first.logprobs for s in greedy.sequences)


def test_a_small_users_step_completes_while_another_users_large_batches_are_queued(server):
    from concurrent.futures import ThreadPoolExecutor

    big = [datum(list(range(index, index + 250))) for index in range(1, 65)]  # 8 requests each
    alice = [training_client(server, ALICE, seed=40 + index) for index in range(2)]
    bob = training_client(server, BOB, seed=42)
    finished = {}

    def timed(name, call):
        call()
        finished[name] = time.monotonic()

    with ThreadPoolExecutor(3) as pool:
        waits = [pool.submit(timed, f"alice{index}", lambda t=trainer: t.forward_backward(big, "cross_entropy")
                             .result()) for index, trainer in enumerate(alice)]
        turns = server.service.learners[server.service_model].turns
        deadline = time.time() + 30
        while "user-0" not in turns._waiting and not finished:  # Alice's work is queued at the learner
            assert time.time() < deadline
            time.sleep(0.005)
        timed("bob", lambda: bob.forward_backward([datum()], "cross_entropy").result())
        for wait in waits:
            wait.result()
    assert finished["bob"] < min(finished["alice0"], finished["alice1"]), finished


def test_a_killed_learner_is_replaced_and_each_run_restored_from_its_last_save(server):
    saved, unsaved = training_client(server, seed=50), training_client(server, seed=None)
    seed = server.service.registry.runs[unsaved.model_id]["lora"]["seed"]
    assert isinstance(seed, int)  # drawn at creation and recorded: a new learner makes the same adapter again
    adam = types.AdamParams(learning_rate=1e-2)
    for trainer in (saved, unsaved):
        trainer.forward_backward([datum()], "cross_entropy").result()
        trainer.optim_step(adam).result()
    path = saved.save_state("before-the-kill").result().path
    at_save = saved.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    # A run whose restore point is deleted before the kill: restored from what is left (here a new adapter).
    forgotten = training_client(server, seed=51)
    rest_client(server, ALICE).delete_checkpoint_from_tinker_path(forgotten.save_state("deleted").result().path
                                                                  ).result()
    saved.forward_backward([datum()], "cross_entropy").result()
    saved.optim_step(adam).result()  # a step after the save: lost with the learner
    learner = server.service.learners[server.service_model]
    dead = learner.actor
    ray.kill(dead)
    killed = time.time()
    while learner.actor is dead and time.time() - killed < 60:  # replaced with no call made: a ping found it
        time.sleep(0.1)
    assert learner.actor is not dead and time.time() - killed < 60
    with pytest.raises(tinker.RequestFailedError, match=f"was restored from {path}: the steps and gradients after "
                                                        "it are lost"):
        saved.forward([datum()], "cross_entropy").result()
    assert saved.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(at_save, rel=1e-5)
    with pytest.raises(tinker.RequestFailedError, match="from a new adapter .* after it are lost"):
        unsaved.forward_backward([datum()], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="from a new adapter .* after it are lost"):
        forgotten.forward([datum()], "cross_entropy").result()
    assert forgotten.forward([datum()], "cross_entropy").result().metrics["loss:sum"] > 0, "and it serves again"
    twin = training_client(server, seed=seed)  # the adapter the unsaved run started from, made anew
    losses = {unsaved.model_id: [], twin.model_id: []}
    for _ in range(3):  # and it trains on, as it would have from its first step
        for trainer in (unsaved, twin):
            losses[trainer.model_id].append(trainer.forward_backward([datum()], "cross_entropy").result()
                                            .metrics["loss:sum"])
            trainer.optim_step(adam).result()
    assert losses[unsaved.model_id][-1] < losses[unsaved.model_id][0]
    assert losses[unsaved.model_id] == pytest.approx(losses[twin.model_id], rel=1e-5)


def test_waiting_users_forward_backward_calls_go_in_one_learner_pass_each_as_if_alone(server, monkeypatch):
    import asyncio
    import threading

    adam = types.AdamParams(learning_rate=1e-2)
    # Carol's and Dave's batches have as many tokens (14), so their calls stay due together round after round.
    batches = {CAROL: [datum(), datum([9, 33, 17, 5, 5, 17])], DAVE: [datum([7, 8, 9, 10, 11, 12]), datum()]}
    bad = [datum([1, 2, 4096])]  # a token outside the tiny vocabulary: refused by the learner, not at the edge

    def after_step(trainer, key, output) -> tuple[float, float]:
        trainer.optim_step(adam).result()
        return output.metrics["loss:sum"], trainer.forward(batches[key], "cross_entropy").result().metrics["loss:sum"]

    alone = {}
    for key, (user, seed) in {CAROL: (ALICE, 60), DAVE: (BOB, 61)}.items():  # the same runs, by other users
        trainer = training_client(server, user, seed)
        alone[key] = after_step(trainer, key, trainer.forward_backward(batches[key], "cross_entropy").result())
    trainers = {CAROL: training_client(server, CAROL, 60), DAVE: training_client(server, DAVE, 61)}
    turns = server.service.learners[server.service_model].turns
    joined, real_join = [], turns.join

    async def spy(calls):
        joined.append(sorted(model_id for model_id, _, _ in calls))
        return await real_join(calls)

    monkeypatch.setattr(turns, "join", spy)

    def both_waiting(sent: dict):
        """Sends each user's forward_backward while the learner is held, so both wait for the same turn."""
        release = threading.Event()

        async def hold():
            await asyncio.get_running_loop().run_in_executor(None, release.wait)

        held = asyncio.run_coroutine_threadsafe(turns.run("holder", hold), turns._server.get_loop())
        futures = {key: trainers[key].forward_backward(data, "cross_entropy") for key, data in sent.items()}
        deadline = time.time() + 30
        while len(turns._waiting) < len(sent):
            assert time.time() < deadline, turns._waiting
            time.sleep(0.005)
        release.set()
        held.result(timeout=30)
        return futures

    outputs = {key: future.result() for key, future in both_waiting(batches).items()}
    assert joined == [sorted(trainer.model_id for trainer in trainers.values())], "one pass for both users"
    for key, trainer in trainers.items():
        assert after_step(trainer, key, outputs[key]) == pytest.approx(alone[key], rel=1e-5), key
    refused, fine = both_waiting({CAROL: bad, DAVE: batches[DAVE]}).values()
    with pytest.raises(tinker.RequestFailedError, match="outside the vocabulary"):
        refused.result()
    assert fine.result().metrics["loss:sum"] > 0 and len(joined) == 2, "Dave's call ran in the same pass"
