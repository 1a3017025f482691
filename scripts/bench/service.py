"""Training steps through `rl-serve` (the official SDK over HTTP) against the same steps on the learner actor
directly, in one invocation.

    .venv/bin/python scripts/bench/service.py [--model tiny] [--steps 20] [--batch 8] [--tokens 128]

A step is forward_backward (cross_entropy) + optim_step on `batch` datums of `tokens` tokens. Reports steps/s of
each and their ratio (goal >= 0.9). Only the ratio means something: the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import ray
import tinker
from tinker import types as sdk

from rl.learner import LearnerActor
from rl.models import resolve_model
from rl.service.app import ServerThread
from rl.service.service import Service
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig


def batch_tokens(batch: int, tokens: int, vocab: int = 2000) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(tokens)] for _ in range(batch)]


def direct(model: str, sequences: list[list[int]], steps: int) -> float:
    learner = LearnerActor.remote(model, storage=tempfile.mkdtemp())
    run = ray.get(learner.create.remote(model, LoraConfig(rank=8, seed=0, train_unembed=False)))
    data = [Datum.next_token(s, weights=[1.0] * len(s)) for s in sequences]
    batch = ForwardBackwardInput(data=data, loss_fn="cross_entropy")

    def step() -> None:
        ray.get(learner.forward_backward.remote(run, batch))
        ray.get(learner.optim_step.remote(run, AdamParams(learning_rate=1e-4)))

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    ray.kill(learner)
    return steps / seconds


def through_service(model: str, sequences: list[list[int]], steps: int) -> float:
    service = Service([model], tempfile.mkdtemp(), ["tml-bench"], max_lora_rank=8)
    server = ServerThread(service)
    try:
        trainer = tinker.ServiceClient(base_url=server.url, api_key="tml-bench").create_lora_training_client(
            base_model=model, rank=8, seed=0, train_unembed=False).result()
        data = [sdk.Datum(model_input=sdk.ModelInput.from_ints(s[:-1]),
                          loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)})
                for s in sequences]

        def step() -> None:
            trainer.forward_backward(data, "cross_entropy").result()
            trainer.optim_step(sdk.AdamParams(learning_rate=1e-4)).result()

        step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return steps / (time.perf_counter() - started)
    finally:
        server.stop()
        service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model = str(resolve_model(args.model))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    sequences = batch_tokens(args.batch, args.tokens)
    direct_rate = direct(model, sequences, args.steps)
    service_rate = through_service(model, sequences, args.steps)
    results = {"model": args.model, "batch": args.batch, "tokens": args.tokens, "steps": args.steps,
               "direct_steps_per_s": direct_rate, "service_steps_per_s": service_rate,
               "service_over_direct": service_rate / direct_rate}
    print(f"learner actor directly {direct_rate:6.2f} steps/s")
    print(f"through rl-serve (SDK) {service_rate:6.2f} steps/s   ratio {service_rate / direct_rate:.2f}")
    print(json.dumps(results))
    ray.shutdown()


if __name__ == "__main__":
    main()
