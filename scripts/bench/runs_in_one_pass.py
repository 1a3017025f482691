"""Several runs' steps on one learner: one pass for all of them (`Learner.forward_backward_many`, what a shared
sweep does) against one `forward_backward` per run, measured side by side in one invocation.

    .venv/bin/python scripts/bench/runs_in_one_pass.py [--model SmolLM2-135M-Instruct] [--runs 4] [--steps 4]
        [--groups 16] [--group-size 4] [--prompt 48] [--dtype auto] [--micro-batch-tokens 512]

Each run gets a batch shaped like the main job's (importance_sampling over groups of samples that share a
prompt, completions of 6-30 tokens), different for every run and step; two sets of runs with the same seeds
train the same batches, one set a call per run, the other in one pass, steps alternating between the two so
the machine's noise falls on both alike. Reports each mode's seconds per step (all runs' forward_backward and
optim_step), their ratio, trained tokens/s, the peak memory of each mode (resident memory on CPU, CUDA
allocator peak on a GPU), and how far apart each run's adapters end up in the two modes (the largest
||a - b|| / ||a|| over the adapters' tensors: exact up to rounding, which Adam's first steps amplify). The learner
runs in this process (no Ray), on the GPU where there is one.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

from rl.learner import Learner
from rl.memory import resident_memory
from rl.models import resolve_model
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig

ADAM = AdamParams(learning_rate=1e-4)


def batch(seed: int, groups: int, group_size: int, prompt: int, vocab: int) -> ForwardBackwardInput:
    """A main-job-shaped batch: `groups` prompts, `group_size` completions each, advantages centred per group."""
    rng = random.Random(seed)
    data = []
    for _ in range(groups):
        prompt_tokens = [rng.randrange(vocab) for _ in range(prompt)]
        advantages = [rng.gauss(0, 1) for _ in range(group_size)]
        mean = sum(advantages) / group_size
        for advantage in advantages:
            completion = [rng.randrange(vocab) for _ in range(rng.randint(6, 30))]
            data.append(Datum.next_token(prompt_tokens + completion, logprobs=[0.0] * prompt + [-2.0] * len(completion),
                                         advantages=[0.0] * prompt + [advantage - mean] * len(completion)))
    return ForwardBackwardInput(data=data, loss_fn="importance_sampling")


def peak_reset(learner: Learner) -> None:
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident_memory(reset_peak=True)


def peak_gib(learner: Learner) -> float:
    if learner.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resident_memory()["peak_gib"]


def step(learner: Learner, runs: list[str], batches: list[ForwardBackwardInput], one_pass: bool) -> float:
    started = time.perf_counter()
    if one_pass:
        for result in learner.forward_backward_many([(run, data, None) for run, data in zip(runs, batches,
                                                                                                strict=True)]):
            if isinstance(result, Exception):
                raise result
    else:
        for run, data in zip(runs, batches, strict=True):
            learner.forward_backward(run, data)
    for run in runs:
        learner.optim_step(run, ADAM)
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--micro-batch-tokens", type=int, default=512)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()

    learner = Learner(str(resolve_model(args.model)), storage=tempfile.mkdtemp(), dtype=args.dtype,
                      micro_batch_tokens=args.micro_batch_tokens)
    modes = {"call per run": False, "one pass": True}
    runs = {mode: [learner.create(learner.base_model, LoraConfig(rank=32, seed=index))
                   for index in range(args.runs)] for mode in modes}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    peaks: dict[str, float] = dict.fromkeys(modes, 0.0)
    tokens = 0
    for number in range(args.steps + 1):  # step 0 warms up (allocator, kernels) and is not counted
        batches = [batch(1000 * number + index, args.groups, args.group_size, args.prompt, learner.vocab_size)
                   for index in range(args.runs)]
        order = list(modes) if number % 2 == 0 else list(reversed(modes))
        taken = {}
        for mode in order:
            peak_reset(learner)
            taken[mode] = step(learner, runs[mode], batches, modes[mode])
            peaks[mode] = max(peaks[mode], peak_gib(learner))
            if number:
                seconds[mode].append(taken[mode])
        tokens += sum(len(datum.loss_fn_inputs["target_tokens"].data) for data in batches for datum in data.data)
        print(f"step {number}: " + ", ".join(f"{mode} {taken[mode]:.2f} s" for mode in modes), flush=True)
    tokens_per_step = tokens / (args.steps + 1)
    differences = []
    for alone, together in zip(runs["call per run"], runs["one pass"], strict=True):
        for a, b in zip(learner._runs[alone].params, learner._runs[together].params, strict=True):
            differences.append(((a - b).norm() / a.norm().clamp_min(1e-12)).item())
    mean = {mode: sum(values) / len(values) for mode, values in seconds.items()}
    result = {
        "model": args.model, "device": str(learner.device), "dtype": learner.dtype, "runs": args.runs,
        "steps": args.steps, "datums_per_run": args.groups * args.group_size,
        "micro_batch_tokens": args.micro_batch_tokens, "trained_tokens_per_step": tokens_per_step,
        "seconds_per_step": mean, "one_pass_time_ratio": mean["one pass"] / mean["call per run"],
        "trained_tokens_per_s": {mode: tokens_per_step / value for mode, value in mean.items()},
        "peak_gib": peaks, "adapters_relative_difference": max(differences),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
