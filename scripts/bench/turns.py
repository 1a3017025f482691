"""rl-serve's turns at one learner under serve_load.py's traffic, in this process: the service's own scheduler
(`rl.service.learners.Turns`) in front of a `Learner` (no HTTP, no Ray), with and without joining the waiting
users' forward_backward calls into one pass, measured side by side in one invocation.

    .venv/bin/python scripts/bench/turns.py [--model SmolLM2-135M-Instruct] [--micro-batch-tokens 512]
        [--small-steps 8] [--big-request-tokens 1024] [--dtype auto] [--json FILE]

Where serve_load.py cannot run (a GPU machine without Ray or vLLM), this measures what bounds the small users'
latency: the learner's work per round of turns. Traffic as in serve_load.py: six users each send small steps
(forward_backward on 4 datums of 64 tokens, then optim_step, one after the other), two users send large batches
(32 datums of 512, half serve_load.py's: the request size is what holds the others up) as requests of
`--big-request-tokens` (what the SDK sends at rl-serve's turn_tokens), all queued at once, then optim_step.
Reports, per mode: a small user's step latency alone (p50 / p95) and under load, their ratio (rl-serve's goal:
p95 <= 3x), and the learner's trained tokens/s. The learner runs on the GPU where there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import BIG_DATUM_TOKENS, SMALL_DATUMS, SMALL_TOKENS, latency  # noqa: E402

from rl.learner import Learner  # noqa: E402
from rl.models import resolve_model  # noqa: E402
from rl.service.learners import Turns  # noqa: E402
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig  # noqa: E402

ADAM = AdamParams(learning_rate=1e-5)


def batch(count: int, tokens: int, rng: random.Random, vocab: int) -> ForwardBackwardInput:
    return ForwardBackwardInput(data=[Datum.next_token([rng.randrange(vocab) for _ in range(tokens + 1)],
                                                       weights=[1.0] * (tokens + 1)) for _ in range(count)],
                                loss_fn="cross_entropy")


class Users:
    """Each user's calls go through `turns` to `learner`, one learner call at a time (as on its actor)."""

    def __init__(self, learner: Learner, join: bool):
        self.learner, self.tokens = learner, 0
        self._worker = ThreadPoolExecutor(1)
        self.turns = Turns(join=self._join if join else None)

    async def _on_learner(self, method, *args):
        result = await asyncio.get_running_loop().run_in_executor(self._worker, method, *args)
        if self.learner.device.type == "cuda":
            torch.cuda.synchronize()
        return result

    async def _join(self, calls: list[tuple]) -> list:
        return await self._on_learner(self.learner.forward_backward_many, calls)

    async def step(self, user: str, run: str, requests: list[ForwardBackwardInput]) -> None:
        """A user's step: its forward_backward requests (all sent at once, as the SDK sends a split batch), then
        optim_step."""
        async def forward_backward(request):
            await self.turns.run(user, lambda: self._on_learner(self.learner.forward_backward, run, request),
                                 (run, request, None), request.tokens)
            self.tokens += request.tokens
        await asyncio.gather(*(forward_backward(request) for request in requests))
        await self.turns.run(user, lambda: self._on_learner(self.learner.optim_step, run, ADAM))

    async def small_steps(self, user: str, run: str, steps: int, rng: random.Random,
                          until: asyncio.Event | None = None) -> list[float]:
        vocab, latencies = self.learner.vocab_size, []
        await self.step(user, run, [batch(SMALL_DATUMS, SMALL_TOKENS, rng, vocab)])  # warm-up
        while len(latencies) < steps or (until is not None and not until.is_set()):
            started = time.perf_counter()
            await self.step(user, run, [batch(SMALL_DATUMS, SMALL_TOKENS, rng, vocab)])
            latencies.append(time.perf_counter() - started)
        return latencies

    async def big_steps(self, user: str, run: str, request_tokens: int, rng: random.Random,
                        until: asyncio.Event) -> None:
        per_request = max(1, request_tokens // BIG_DATUM_TOKENS)
        while not until.is_set():
            requests = [batch(per_request, BIG_DATUM_TOKENS, rng, self.learner.vocab_size)
                        for _ in range(32 // per_request)]  # 32 datums of 512 a step (serve_load.py's: 64)
            await self.step(user, run, requests)


async def measure(learner: Learner, join: bool, small_steps: int, big_request_tokens: int) -> dict:
    users = Users(learner, join)
    runs = [learner.create(learner.base_model, LoraConfig(rank=16, seed=index)) for index in range(8)]
    started, tokens = time.perf_counter(), users.tokens
    alone = await users.small_steps("small-0", runs[0], small_steps, random.Random(0))
    alone_rate = (users.tokens - tokens) / (time.perf_counter() - started)
    done = asyncio.Event()
    big = [asyncio.ensure_future(users.big_steps(f"big-{index}", runs[index], big_request_tokens,
                                                 random.Random(100 + index), done)) for index in (6, 7)]
    await asyncio.sleep(1)  # the big users' first requests are queued before the small users start
    started, tokens = time.perf_counter(), users.tokens
    small = await asyncio.gather(*(users.small_steps(f"small-{index}", runs[index], small_steps,
                                                     random.Random(index)) for index in range(6)))
    loaded_rate = (users.tokens - tokens) / (time.perf_counter() - started)
    done.set()
    await asyncio.gather(*big)
    for run in runs:
        learner.delete(run)
    loaded = [seconds for latencies in small for seconds in latencies]
    alone_latency, load_latency = latency(alone), latency(loaded)
    return {"alone": alone_latency, "under_load": load_latency,
            "p95_ratio": round(load_latency["p95_s"] / alone_latency["p95_s"], 2),
            "p50_ratio": round(load_latency["p50_s"] / alone_latency["p50_s"], 2),
            "trained_tokens_per_s": {"alone": round(alone_rate), "under_load": round(loaded_rate)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--micro-batch-tokens", type=int, default=512)
    parser.add_argument("--small-steps", type=int, default=8)
    parser.add_argument("--big-request-tokens", type=int, default=1024)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    learner = Learner(str(resolve_model(args.model)), storage=tempfile.mkdtemp(), dtype=args.dtype,
                      micro_batch_tokens=args.micro_batch_tokens)
    result = {"model": args.model, "device": str(learner.device), "dtype": learner.dtype,
              "micro_batch_tokens": args.micro_batch_tokens, "big_request_tokens": args.big_request_tokens}
    for mode, join in (("one call per user", False), ("users joined", True)):
        result[mode] = asyncio.run(measure(learner, join, args.small_steps, args.big_request_tokens))
        print(mode, json.dumps(result[mode]), flush=True)
    result["p95_joined_vs_not"] = round(result["users joined"]["under_load"]["p95_s"]
                                        / result["one call per user"]["under_load"]["p95_s"], 3)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
