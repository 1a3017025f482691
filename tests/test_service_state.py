"""The service's own state, without HTTP: futures in seq_id order (gaps, late arrivals, repeats), the sample
de-duplication key, the learner's turns between users, the registry of users, runs and public checkpoints, and
the limits checked at the edge."""

import asyncio

import pytest
import ray

from rl.service import futures
from rl.service.futures import FutureStore
from rl.service.learners import SupervisedLearner, Turns
from rl.service.limits import Limits
from rl.service.registry import LOCAL_USER, AccessDenied, Registry
from rl.types import Datum, ForwardBackwardInput, ModelInput, SampleRequest, SamplingParams


def run(coroutine):
    return asyncio.run(coroutine)


def recorder(order: list, name: str, result=None, *, fail: Exception | None = None):
    async def job():
        order.append(name)
        if fail is not None:
            raise fail
        return result if result is not None else name
    return job


def test_a_run_executes_in_seq_id_order_whatever_the_arrival_order():
    async def scenario():
        store, order = FutureStore(), []
        ids = {seq: store.submit_ordered("alice", "m", seq, recorder(order, f"job{seq}")) for seq in (3, 1, 2)}
        results = [await store.retrieve("alice", ids[seq], timeout=5) for seq in (1, 2, 3)]
        return order, results

    order, results = run(scenario())
    assert order == ["job1", "job2", "job3"] and results == ["job1", "job2", "job3"]


def test_a_missing_seq_id_holds_the_run_for_the_gap_only_and_a_late_one_runs_out_of_turn(monkeypatch):
    monkeypatch.setattr(futures, "GAP_SECONDS", 0.2)

    async def scenario():
        store, order = FutureStore(), []
        second = store.submit_ordered("alice", "m", 2, recorder(order, "job2"))
        await asyncio.sleep(0.05)
        assert order == [], "seq 2 waits for seq 1"
        assert await store.retrieve("alice", second, timeout=2) == "job2", "then goes on without it"
        late = store.submit_ordered("alice", "m", 1, recorder(order, "job1"))
        assert await store.retrieve("alice", late, timeout=2) == "job1"
        return order

    assert run(scenario()) == ["job2", "job1"]


def test_a_repeated_seq_id_is_the_same_request_and_runs_once():
    async def scenario():
        store, order = FutureStore(), []
        first = store.submit_ordered("alice", "m", 1, recorder(order, "job1"))
        again = store.submit_ordered("alice", "m", 1, recorder(order, "job1-again"))
        other_run = store.submit_ordered("alice", "n", 1, recorder(order, "other"))
        await store.retrieve("alice", first, timeout=2)
        await store.retrieve("alice", other_run, timeout=2)
        return first, again, other_run, order

    first, again, other_run, order = run(scenario())
    assert first == again and other_run != first
    assert sorted(order) == ["job1", "other"]


def test_samples_deduplicate_on_their_key_and_failures_are_kept_by_category():
    async def scenario():
        store, order = FutureStore(), []
        key = ("sampling-1", 0)
        first = store.submit("alice", recorder(order, "sample"), key=key)
        resent = store.submit("alice", recorder(order, "sample-again"), key=key)
        unkeyed = [store.submit("alice", recorder(order, "unkeyed")) for _ in range(2)]
        user_error = store.submit("alice", recorder(order, "bad", fail=ValueError("max_tokens too large")))
        server_error = store.submit("alice", recorder(order, "bug", fail=RuntimeError("engine died")))
        results = [await store.retrieve("alice", request_id, timeout=2)
                   for request_id in (first, *unkeyed, user_error, server_error)]
        return first, resent, unkeyed, results, order

    first, resent, unkeyed, results, order = run(scenario())
    assert first == resent and len(set(unkeyed)) == 2
    assert order.count("sample") == 1 and "sample-again" not in order and order.count("unkeyed") == 2
    assert results[3] == {"error": "max_tokens too large", "category": "user"}
    assert results[4] == {"error": "RuntimeError: engine died", "category": "server"}


def test_a_result_not_ready_answers_none_and_others_cannot_read_it():
    async def scenario():
        store = FutureStore()
        started = asyncio.Event()

        async def slow():
            started.set()
            await asyncio.sleep(10)

        request_id = store.submit("alice", slow)
        await started.wait()
        pending = await store.retrieve("alice", request_id, timeout=0.05)
        with pytest.raises(ValueError, match="unknown request_id"):
            await store.retrieve("bob", request_id, timeout=0.05)
        return pending

    assert run(scenario()) is None, "the app answers try_again"


def test_registry_users_sessions_runs_and_public_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="must start with 'tml-'"):
        Registry(tmp_path, ["secret"])
    assert Registry(tmp_path, []).user(None) == LOCAL_USER, "no keys: one local user"
    registry = Registry(tmp_path, ["tml-a", "tml-b"])
    alice, bob = registry.user("tml-a"), registry.user("tml-b")
    assert alice != bob
    with pytest.raises(AccessDenied):
        registry.user("tml-stranger")
    session = registry.new_session(alice)
    registry.check_session(alice, session)
    with pytest.raises(ValueError, match="unknown session_id"):
        registry.check_session(bob, session)

    registry.add_run(alice, "s:train:0", "tiny", {"rank": 8}, {"note": "x"})
    assert registry.run(alice, "s:train:0")["base_model"] == "tiny"
    with pytest.raises(ValueError, match="unknown model_id 's:train:0'"):
        registry.run(bob, "s:train:0")  # someone else's run is "unknown", like one that does not exist
    path = "tinker://s:train:0/weights/step-2"
    assert registry.readable(alice, path) and not registry.readable(bob, path)
    registry.set_public(path, True)
    assert registry.readable(bob, path)

    reloaded = Registry(tmp_path, ["tml-a", "tml-b"])  # a restarted server on the same folder
    assert [model_id for model_id, _ in reloaded.owned_runs(alice)] == ["s:train:0"]
    assert reloaded.owned_runs(bob) == [] and reloaded.readable(bob, path)
    reloaded.set_public(path, False)
    assert not Registry(tmp_path, ["tml-a"]).readable(bob, path)


def test_a_result_is_dropped_after_it_was_retrieved_and_its_request_still_runs_once(monkeypatch):
    monkeypatch.setattr(futures, "KEEP_SECONDS", (0.05, 30.0))

    async def scenario():
        store, order = FutureStore(), []
        request_id = store.submit_ordered("alice", "m", 1, recorder(order, "job1"))
        first = await store.retrieve("alice", request_id, timeout=5)
        again = await store.retrieve("alice", request_id, timeout=5)  # a resent retrieve, within the grace
        await asyncio.sleep(0.2)
        with pytest.raises(ValueError, match="unknown request_id"):
            await store.retrieve("alice", request_id, timeout=5)
        resent = store.submit_ordered("alice", "m", 1, recorder(order, "job1-again"))
        return first, again, resent == request_id, order, len(store._results)

    assert run(scenario()) == ("job1", "job1", True, ["job1"], 0)


def test_what_the_store_remembers_of_requests_is_bounded_and_a_training_request_needs_a_seq_id(monkeypatch):
    monkeypatch.setattr(futures, "KEEP_SECONDS", (0.05, 30.0))
    monkeypatch.setattr(futures, "SEEN_KEPT", 4)

    async def scenario():
        store, order = FutureStore(), []
        with pytest.raises(ValueError, match="seq_id: required on a training request to 'm'"):
            store.submit_ordered("alice", "m", None, recorder(order, "unordered"))
        ids = [store.submit_ordered("alice", "m", seq_id, recorder(order, seq_id)) for seq_id in range(1, 11)]
        for request_id in ids:
            await store.retrieve("alice", request_id, timeout=5)
        sample = store.submit("alice", recorder(order, "sample"), key=("session", 0))
        await store.retrieve("alice", sample, timeout=5)
        await asyncio.sleep(0.2)
        resent = store.submit("alice", recorder(order, "sample-again"), key=("session", 0))  # after it was dropped
        await store.retrieve("alice", resent, timeout=5)
        return order, sorted(store._runs["m"].seen), resent != sample

    order, seen, sampled_again = run(scenario())
    assert order == [*range(1, 11), "sample", "sample-again"] and sampled_again
    assert seen == [7, 8, 9, 10], "the latest SEEN_KEPT seq_ids only"


def test_users_take_turns_at_the_learner_and_each_users_jobs_keep_their_order():
    async def scenario():
        turns, order, release = Turns(), [], asyncio.Event()

        async def first():
            order.append("a1")
            await release.wait()  # the learner busy while everyone else queues
            return "a1"

        calls = [asyncio.ensure_future(turns.run("alice", first))]
        await asyncio.sleep(0)
        calls += [asyncio.ensure_future(turns.run(user, recorder(order, name))) for user, name in
                  (("alice", "a2"), ("alice", "a3"), ("alice", "a4"), ("bob", "b1"), ("carol", "c1"),
                   ("bob", "b2"))]
        failing = asyncio.ensure_future(turns.run("carol", recorder(order, "c2", fail=RuntimeError("boom"))))
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*calls)
        with pytest.raises(RuntimeError, match="boom"):
            await failing
        return order, results

    order, results = run(scenario())
    # One call per user in rotation: Alice's backlog delays Bob and Carol by one call each, not three.
    assert order == ["a1", "a2", "b1", "c1", "a3", "b2", "c2", "a4"]
    assert results == ["a1", "a2", "a3", "a4", "b1", "c1", "b2"]


def test_waiting_users_joinable_jobs_run_together_and_each_users_order_is_kept():
    async def scenario():
        passes, release = [], asyncio.Event()

        async def join(items):
            passes.append(sorted(items))
            return [ValueError(f"{item} refused") if item.endswith("bad") else item.upper() for item in items]

        turns = Turns(join=join)

        async def first():
            passes.append(["a1"])
            await release.wait()
            return "a1"

        calls = {"a1": asyncio.ensure_future(turns.run("alice", first))}
        await asyncio.sleep(0)
        for user, name, joinable in (("alice", "a2", True), ("alice", "a3", False), ("alice", "a4", True),
                                     ("bob", "b1", False), ("bob", "b2", True), ("carol", "c1", True),
                                     ("dave", "d1-bad", True)):
            async def alone(name=name):
                passes.append([name])
                return name
            calls[name] = asyncio.ensure_future(turns.run(user, alone, name if joinable else None))
        await asyncio.sleep(0)
        release.set()
        outcomes = {}
        for name, call in calls.items():
            try:
                outcomes[name] = await call
            except ValueError as error:
                outcomes[name] = str(error)
        return passes, outcomes

    passes, outcomes = run(scenario())
    # Alice's joinable a2 takes along the next job of each user whose next is joinable (Carol's, Dave's), not Bob's
    # b1; b2 waits behind b1, and a4 behind a3, so each user's order holds; a refused item fails alone.
    assert passes == [["a1"], ["a2", "c1", "d1-bad"], ["b1"], ["a3"], ["a4", "b2"]], passes
    assert outcomes == {"a1": "a1", "a2": "A2", "a3": "a3", "a4": "A4", "b1": "b1", "b2": "B2", "c1": "C1",
                        "d1-bad": "d1-bad refused"}


def test_users_share_the_learner_by_tokens_and_a_user_back_from_idling_has_no_credit_saved_up():
    async def scenario():
        turns, order, release = Turns(), [], asyncio.Event()

        async def first():
            order.append("x")
            await release.wait()

        calls = [asyncio.ensure_future(turns.run("xavier", first, cost=3))]
        await asyncio.sleep(0)
        # Bob sends requests four times Alice's and Carol's; each user's requests are queued at once.
        for user, cost, count in (("bob", 4, 3), ("alice", 1, 4), ("carol", 1, 4)):
            calls += [asyncio.ensure_future(turns.run(user, recorder(order, f"{user[0]}{index}"), cost=cost))
                      for index in range(count)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*calls)
        late = [asyncio.ensure_future(turns.run(user, recorder(order, name), cost=1)) for user, name in
                (("alice", "a4"), ("dave", "d0"), ("bob", "b3"))]
        await asyncio.gather(*late)
        return order

    order = run(scenario())
    # Bob's jobs stand at 0, 4 and 8, Alice's and Carol's at 0, 1, 2 and 3: one of Bob's per four of theirs.
    assert order[:12] == ["x", "b0", "a0", "c0", "a1", "c1", "a2", "c2", "a3", "c3", "b1", "b2"], order
    # Then Alice (whose jobs ended at 4) and Dave (new) both stand at the present, 8, where b2 started: Dave has no
    # credit from before he came (at 0 he would go first); Bob stands at 12.
    assert order[12:] == ["a4", "d0", "b3"], order


LIMITS = Limits(context=100, max_batch_datums=3, max_batch_tokens=150, max_sample_tokens=200)


def forward_backward_input(*lengths: int) -> ForwardBackwardInput:
    return ForwardBackwardInput(loss_fn="cross_entropy", data=[
        Datum.next_token(list(range(1, n + 2)), weights=[1.0] * (n + 1)) for n in lengths])


def sample(prompt: int, num_samples: int = 1, max_tokens: int | None = None) -> SampleRequest:
    return SampleRequest(prompt=ModelInput.from_ints(list(range(prompt))), num_samples=num_samples,
                         sampling_params=SamplingParams(max_tokens=max_tokens))


@pytest.mark.parametrize(("batch", "message"), [
    (forward_backward_input(40, 101), "data\\[1\\].model_input has 101 tokens, over the model's context of 100"),
    (forward_backward_input(10, 10, 10, 10), "data holds 4 datums; .* at most 3 .*max_batch_datums"),
    (forward_backward_input(100, 51), "data holds 151 tokens in all; .* at most 150 .*max_batch_tokens"),
])
def test_a_batch_over_a_limit_is_refused_naming_the_field_the_value_and_the_limit(batch, message):
    with pytest.raises(ValueError, match=message):
        LIMITS.check_batch(batch)


def test_batches_and_samples_at_the_limits_are_accepted():
    LIMITS.check_batch(forward_backward_input(100, 50))
    LIMITS.check_batch(forward_backward_input(50, 50, 50))
    LIMITS.check_sample(sample(99, 1, 1))
    LIMITS.check_sample(sample(50, 4, 50))
    LIMITS.check_sample(sample(80, 10))  # max_tokens unset: the 20 tokens left


@pytest.mark.parametrize(("request_", "message"), [
    (sample(100), "prompt has 100 tokens; the model's context of 100 leaves no room"),
    (sample(60, 1, 41), "prompt \\(60 tokens\\) \\+ sampling_params.max_tokens \\(41\\) exceeds .* 100"),
    (sample(10, 5, 41), "num_samples x sampling_params.max_tokens = 5 x 41 = 205 tokens; .* at most 200"),
    (sample(50, 5), "5 x 50 = 250 tokens"),
])
def test_a_sample_over_a_limit_is_refused_naming_the_field_the_value_and_the_limit(request_, message):
    with pytest.raises(ValueError, match=message):
        LIMITS.check_sample(request_)


def test_a_learner_unreachable_for_a_moment_is_not_replaced():
    """Ray's ActorUnavailableError is a RayActorError, but the actor may come back: replacing it would lose every
    run's unsaved work (a real death is tested through the server: tests/test_service.py)."""
    learner = SupervisedLearner.__new__(SupervisedLearner)  # no actor started: `_replace` must not get that far
    learner.actor = actor = object()
    blip = ray.exceptions.ActorUnavailableError("the node's network blinked", None)
    with pytest.raises(ray.exceptions.ActorUnavailableError, match="blinked"):
        run(learner._replace(actor, blip))
    assert learner.actor is actor
