"""EngineLoop's bookkeeping when things fail, on a scripted stand-in for vLLM's engine (the loop's contract with
the engine is three calls: add_request, step, has_unfinished_requests). The real engine under the loop is tested
in test_sampler.py and test_vllm_lora_fastpath.py; here the engine fails on cue, which a real one cannot be made
to do reliably."""

import concurrent.futures
import threading
import time
from types import SimpleNamespace

import pytest
from waiting import wait_until

from rl.sampler import vllm_prompt_prefixes
from rl.sampler.engine import EngineDeadError, EngineLoop, PrefixRounds


class ScriptedEngine:
    """Requests finish after `steps_per_request` steps; step number `die_at` raises; prompts of [666] are refused
    by add_request, as vLLM's validation refuses a bad request."""

    def __init__(self, *, die_at: int | None = None, steps_per_request: int = 2, prefix_caching: bool = False):
        self.die_at, self.steps_per_request = die_at, steps_per_request
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching,
                                                                        block_size=32))
        self.requests: dict[str, int] = {}
        self.seeds: dict[str, int | None] = {}
        self.added_at: dict[str, int] = {}
        self.steps = 0
        self.stepping = threading.Event()

    def add_request(self, request_id, prompt, params, lora_request=None):
        if prompt["prompt_token_ids"] == [666]:
            raise ValueError("prompt token 666 is not allowed")
        self.requests[request_id] = 0
        self.seeds[request_id] = getattr(params, "seed", None)
        self.added_at[request_id] = self.steps

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self):
        self.steps += 1
        self.stepping.set()
        if self.steps == self.die_at:
            raise RuntimeError("CPU attention kernel crashed")
        outputs = []
        for request_id in list(self.requests):
            self.requests[request_id] += 1
            finished = self.requests[request_id] >= self.steps_per_request
            if finished:
                del self.requests[request_id]
            outputs.append(SimpleNamespace(request_id=request_id, finished=finished,
                                           outputs=[SimpleNamespace(index=0, seed=self.seeds[request_id])]))
        return outputs


def loop_over(engine: ScriptedEngine) -> EngineLoop:
    return EngineLoop(SimpleNamespace(llm_engine=engine))


def test_requests_finish_and_a_refused_one_fails_alone():
    engine = ScriptedEngine()
    loop = loop_over(engine)
    good = [loop.generate([1, 2], params=None, lora=None) for _ in range(3)]
    bad = loop.generate([666], params=None, lora=None)
    with pytest.raises(ValueError, match="666 is not allowed"):
        bad.result(timeout=5)
    assert sorted(future.result(timeout=5).request_id for future in good) == ["r0", "r1", "r2"]
    assert loop.dead is None


def test_an_engine_that_dies_fails_every_request_in_flight_and_every_later_one():
    engine = ScriptedEngine(die_at=2, steps_per_request=5)
    loop = loop_over(engine)
    in_flight = [loop.generate([1], params=None, lora=None) for _ in range(2)]
    for future in in_flight:
        with pytest.raises(EngineDeadError, match="the vLLM engine failed: RuntimeError"):
            future.result(timeout=5)
    assert isinstance(loop.dead, RuntimeError)
    later = loop.generate([1], params=None, lora=None)
    with pytest.raises(EngineDeadError, match="failed earlier"):
        later.result(timeout=5)
    with pytest.raises(EngineDeadError, match="failed earlier"):
        loop.call(lambda: "weights loaded").result(timeout=5)


def test_a_drain_that_the_engine_dies_under_fails_the_call_and_what_waits_behind_it():
    engine = ScriptedEngine(die_at=3, steps_per_request=10)
    loop = loop_over(engine)
    running = loop.generate([1], params=None, lora=None)
    assert engine.stepping.wait(5)
    merged = loop.call(lambda: "merged", drain=True)  # would run after `running` finishes; the engine dies first
    with pytest.raises(EngineDeadError):
        merged.result(timeout=5)
    with pytest.raises(EngineDeadError):
        running.result(timeout=5)
    with pytest.raises(EngineDeadError):
        loop.generate([1], params=None, lora=None).result(timeout=5)


def test_a_drained_call_runs_after_the_requests_before_it():
    engine = ScriptedEngine(steps_per_request=3)
    loop = loop_over(engine)
    before = loop.generate([1], params=None, lora=None)
    seen: list[bool] = []
    merged = loop.call(lambda: seen.append(before.done()) or "merged", drain=True)
    assert merged.result(timeout=5) == "merged" and seen == [True], "the request before it had finished"
    assert isinstance(before.result(timeout=5), SimpleNamespace)
    assert concurrent.futures.wait([loop.generate([1], params=None, lora=None)], timeout=5).done


def test_freed_memory_goes_back_once_each_burst_of_work_ends(monkeypatch):
    """Batches of varying shapes leave freed memory in the heap (rl.memory.return_freed_memory): the loop trims it
    when the engine goes idle, once per burst, never between the steps of one."""
    trims: list[int] = []
    engine = ScriptedEngine(steps_per_request=3)
    monkeypatch.setattr("rl.sampler.engine.return_freed_memory", lambda: trims.append(engine.steps))
    loop = loop_over(engine)

    held = threading.Event()
    loop.call(held.wait)  # the four requests below reach the engine together
    burst = [loop.generate([1, 2], params=None, lora=None) for _ in range(4)]
    held.set()
    for future in burst:
        future.result(timeout=5)
    wait_until(lambda: len(trims) >= 1, timeout=5)
    assert trims == [3] and engine.steps == 3, "once, after the burst's last step"
    loop.generate([3], params=None, lora=None).result(timeout=5)
    wait_until(lambda: len(trims) >= 2, timeout=5)
    assert trims == [3, 6]
    loop.call(lambda: None).result(timeout=5)  # work that is no step (add_lora, a merge) trims nothing
    time.sleep(0.05)
    assert trims == [3, 6]


def samples_of_one_prompt(n: int, seed: int | None = 5):
    return SimpleNamespace(n=n, seed=seed, prompt_logprobs=None)


PROMPT = list(range(100, 120))  # 20 tokens: within one KV block of 32


def test_a_prompts_later_samples_wait_a_step_for_the_first(monkeypatch):
    monkeypatch.setattr(vllm_prompt_prefixes, "is_installed", lambda: True)
    engine = ScriptedEngine(prefix_caching=True)
    loop = loop_over(engine)
    output = loop.generate(PROMPT, params=samples_of_one_prompt(3), lora=None).result(timeout=5)
    assert engine.added_at == {"r0": 0, "r1": 1, "r2": 1}
    assert [(sample.index, sample.seed) for sample in output.outputs] == [(0, 5), (1, 6), (2, 7)]
    unseeded = loop.generate(PROMPT, params=samples_of_one_prompt(2, seed=None), lora=None).result(timeout=5)
    assert [sample.seed for sample in unseeded.outputs] == [None, None]
    assert engine.added_at["r3"] == engine.added_at["r4"], "computed by now: nothing to wait for"

    without_cache = loop_over(ScriptedEngine(prefix_caching=False))  # nothing to share: one request, as vLLM has it
    one_request = without_cache.generate(PROMPT, params=samples_of_one_prompt(3), lora=None).result(timeout=5)
    assert [sample.seed for sample in one_request.outputs] == [5]


def test_waiting_requests_fail_with_the_engine_and_alone_when_refused(monkeypatch):
    monkeypatch.setattr(vllm_prompt_prefixes, "is_installed", lambda: True)
    loop = loop_over(ScriptedEngine(prefix_caching=True, die_at=1))
    with pytest.raises(EngineDeadError, match="the vLLM engine failed: RuntimeError"):
        loop.generate(PROMPT, params=samples_of_one_prompt(3), lora=None).result(timeout=5)

    engine = ScriptedEngine(prefix_caching=True)
    loop = loop_over(engine)
    with pytest.raises(ValueError, match="666 is not allowed"):
        loop.generate([666], params=samples_of_one_prompt(3), lora=None).result(timeout=5)
    assert loop.generate(PROMPT, params=samples_of_one_prompt(1), lora=None).result(timeout=5).finished
    assert engine.requests == {} and loop.dead is None


def test_a_request_waits_while_one_it_shares_more_with_is_computed():
    rounds = PrefixRounds(block_size=32)
    first = list(range(1, 48))  # 47 tokens: a block of 32, then 15
    assert not rounds.waits(None, first)
    rounds.add(None, first)
    assert rounds.waits(None, first), "the same prompt: 14 tokens past the whole block to share"
    assert rounds.waits(None, first[:40] + [99]) and rounds.waits(None, first[:20] + [99])
    assert not rounds.waits(None, first[:39] + [99]), "7 tokens past the block vLLM shares within a step anyway"
    assert not rounds.waits(None, first[:7] + [99]), "too few to wait a step for"
    assert not rounds.waits(7, first), "another adapter's cache entries are its own"
    rounds.stepped()
    assert not rounds.waits(None, first), "computed: found without waiting"
    second = first[:10] + list(range(200, 230))
    rounds.add(None, second)
    assert rounds.waits(None, second[:30] + [99]), "20 more tokens than the 10 computed before"
    rounds.forget()
    assert not rounds.waits(None, second[:30] + [99])

    small = PrefixRounds(block_size=32, max_nodes=60)
    small.add(None, first)
    small.add(None, list(range(300, 320)))  # 67 nodes: the trie starts again
    assert not small.waits(None, first) and small.waits(None, list(range(300, 320)))
