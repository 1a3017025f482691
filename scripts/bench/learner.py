"""Learner throughput against a plain PEFT training loop, measured side by side in one invocation.

    .venv/bin/python scripts/bench/learner.py [--model SmolLM2-135M-Instruct] [--sequences 32] [--length 96]
                                              [--steps 3] [--dtype bfloat16] [--grow 8,16,32,64,128]

Both run as Ray actors with the same CPUs, on the same model, LoRA (rank 16 on all linear layers of the
decoder), AdamW and batch: the plain loop is what a user would write with transformers + PEFT (full logits, HF's
loss); ours is `LearnerActor.forward_backward(cross_entropy) + optim_step`. Reports trained tokens/s of each,
their ratio, and the learner's peak memory as the batch grows. The machine is noisy: only the ratio, measured
in the same invocation, is meaningful.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import ray
import torch

from rl.learner import LearnerActor
from rl.models import resolve_dtype, resolve_model
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig

DECODER_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAM = AdamParams(learning_rate=1e-4)


class PlainPeftLoop:
    """The baseline: transformers + PEFT + torch AdamW, padded batches, the model's own loss."""

    def __init__(self, folder: str, dtype: str, rank: int):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        config = PeftLoraConfig(r=rank, lora_alpha=2 * rank, target_modules=DECODER_LINEAR, task_type="CAUSAL_LM")
        self.model = get_peft_model(model, config)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                           betas=(0.9, 0.95), eps=1e-12)

    def step(self, sequences: list[list[int]]) -> float:
        started = time.perf_counter()
        longest = max(map(len, sequences))
        ids = torch.zeros(len(sequences), longest, dtype=torch.int64)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(sequences):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def peak_rss_gib(actor) -> float:
    """The actor process's peak resident memory so far (VmHWM)."""
    def read(_self):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
        return float("nan")

    return ray.get(actor.__ray_call__.remote(read))


def make_sequences(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(length - length // 6, length + length // 6))]
            for _ in range(count)]


def as_datums(sequences: list[list[int]]) -> ForwardBackwardInput:
    data = [Datum.next_token(tokens, weights=[1.0] * len(tokens)) for tokens in sequences]
    return ForwardBackwardInput(data=data, loss_fn="cross_entropy")


def time_learner(actor, model_id: str, batch: ForwardBackwardInput) -> float:
    started = time.perf_counter()
    ray.get(actor.forward_backward.remote(model_id, batch))
    ray.get(actor.optim_step.remote(model_id, ADAM))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU computes in it natively")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--grow", default="8,16,32,64,128", help="batch sizes for the memory curve ('' to skip)")
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    args = parser.parse_args()
    args.dtype = resolve_dtype(args.dtype, "cpu")

    folder = str(resolve_model(args.model))
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(folder).vocab_size
    sequences = make_sequences(args.sequences, args.length, vocab_size, seed=0)
    tokens_per_step = sum(len(tokens) - 1 for tokens in sequences)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[str, object] = {"model": args.model, "dtype": args.dtype, "sequences": args.sequences,
                                  "tokens_per_step": tokens_per_step, "steps": args.steps}

    plain = ray.remote(PlainPeftLoop).options(num_cpus=2).remote(folder, args.dtype, args.rank)
    ray.get(plain.step.remote(sequences))  # warm-up
    plain_seconds = sum(ray.get(plain.step.remote(sequences)) for _ in range(args.steps))
    results["plain_tokens_per_s"] = args.steps * tokens_per_step / plain_seconds
    results["plain_peak_gib"] = peak_rss_gib(plain)
    ray.kill(plain)

    learner = LearnerActor.options(num_cpus=2).remote(folder, storage="/tmp/rl-bench-storage", dtype=args.dtype,
                                                      micro_batch_tokens=args.micro_batch_tokens)
    model_id = ray.get(learner.create.remote(folder, LoraConfig(rank=args.rank, seed=0, train_unembed=False)))
    batch = as_datums(sequences)
    time_learner(learner, model_id, batch)  # warm-up
    learner_seconds = sum(time_learner(learner, model_id, batch) for _ in range(args.steps))
    results["learner_tokens_per_s"] = args.steps * tokens_per_step / learner_seconds
    results["learner_peak_gib"] = peak_rss_gib(learner)
    results["ratio"] = results["learner_tokens_per_s"] / results["plain_tokens_per_s"]
    print(f"plain PEFT loop {results['plain_tokens_per_s']:7.1f} tokens/s   peak {results['plain_peak_gib']:.2f} GiB")
    print(f"rl learner      {results['learner_tokens_per_s']:7.1f} tokens/s   peak "
          f"{results['learner_peak_gib']:.2f} GiB")
    print(f"ratio learner / plain = {results['ratio']:.2f}")

    growth = []
    for count in [int(n) for n in args.grow.split(",") if n]:
        grown = as_datums(make_sequences(count, args.length, vocab_size, seed=count))
        seconds = time_learner(learner, model_id, grown)
        growth.append({"sequences": count, "seconds": seconds, "peak_gib": peak_rss_gib(learner)})
        print(f"  batch {count:4d} sequences: {seconds:6.1f} s, learner peak {growth[-1]['peak_gib']:.2f} GiB")
    results["memory_growth"] = growth
    print(json.dumps(results))
    ray.shutdown()


if __name__ == "__main__":
    main()
