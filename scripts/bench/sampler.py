"""Sampler pool throughput and weight-sync latency, measured side by side in one invocation.

    .venv/bin/python scripts/bench/sampler.py [--model SmolLM2-135M-Instruct] [--prompts 32] [--samples 4]
                                              [--max-tokens 64] [--dtype bfloat16] [--publishes 8]

1. Overhead: sampled tokens/s through a one-replica `SamplerPool` against raw vLLM `LLM.generate` (in a Ray
   actor of the same size) on identical prompts and sampling settings. Goal: ratio >= 0.9.
2. Policy speed: tokens/s sampling from a trained LoRA adapter in each publish mode (adapter with our CPU fast
   path, merge, and vLLM's own LoRA path unless --skip-slow-path) against the base model in adapter mode's
   engine (LoRA enabled). Goal: >= 0.8 of base-model speed.
3. Publish-to-first-sample latency: learner save -> publish (load + verify on the replica) -> first sample
   back, p50 and p95 over several weight versions.
Only ratios measured in the same invocation are meaningful: the machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import ray

from rl.chat import chat_tokens
from rl.learner import LearnerActor
from rl.models import resolve_dtype, resolve_model
from rl.sampler import SamplerPool
from rl.tasks import Addition
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig, ModelInput, SampleRequest, SamplingParams


class RawVllm:
    """The baseline: vLLM's own batch API, one call for all prompts."""

    def __init__(self, folder: str, dtype: str, max_model_len: int):
        from rl.sampler import vllm_lora_fastpath
        from rl.sampler.engine import start_vllm_engine

        vllm_lora_fastpath.install()  # the same engine as the pool's replicas: only the pool's own cost differs
        self.llm = start_vllm_engine(folder, dtype=dtype, max_model_len=max_model_len, max_lora_rank=16,
                                     max_loras=4)

    def generate(self, prompts: list[list[int]], samples: int, max_tokens: int) -> tuple[float, int]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm import TokensPrompt

        params = [VllmSamplingParams(n=samples, max_tokens=max_tokens, temperature=1.0, seed=index, logprobs=0,
                                     ignore_eos=True)
                  for index in range(len(prompts))]
        started = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        return seconds, sum(len(sample.token_ids) for output in outputs for sample in output.outputs)


def chat_prompts(folder: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [chat_tokens(tokenizer, problem.prompt) for problem in Addition().problems(count, seed=0)]


async def pool_throughput(pool: SamplerPool, prompts: list[list[int]], samples: int, max_tokens: int,
                          model_path: str | None) -> tuple[float, int]:
    requests = [SampleRequest(prompt=ModelInput.from_ints(p), num_samples=samples, model_path=model_path,
                              sampling_params=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=index,
                                                             stop=[]))
                for index, p in enumerate(prompts)]
    started = time.perf_counter()
    responses = await asyncio.gather(*(pool.sample(r) for r in requests))
    seconds = time.perf_counter() - started
    return seconds, sum(len(s.tokens) for r in responses for s in r.sequences)


async def publish_latencies(pool: SamplerPool, learner, model_id: str, prompt: list[int], count: int,
                            tag: str) -> list[float]:
    """Seconds from `save_weights_for_sampler` to the first sample from the new weights, per version."""
    latencies = []
    tokens = prompt + prompt
    step = ForwardBackwardInput(loss_fn="cross_entropy", data=[Datum.next_token(tokens, weights=[1.0] * len(tokens))])
    for index in range(count):
        await learner.forward_backward.remote(model_id, step)
        await learner.optim_step.remote(model_id, AdamParams(learning_rate=1e-4))
        started = time.perf_counter()
        version = await pool.publish(await learner.save_weights_for_sampler.remote(model_id, f"bench-{tag}-{index}",
                                                                                  overwrite=True))
        await pool.sample(SampleRequest(prompt=ModelInput.from_ints(prompt), model_path=version.tinker_path,
                                        sampling_params=SamplingParams(max_tokens=1)))
        latencies.append(time.perf_counter() - started)
    return latencies


def measure_pool(pool: SamplerPool, learner, model_id: str, prompts: list[list[int]], args, tag: str) -> dict:
    """Base-model tokens/s, publish latencies, then tokens/s from the last published policy, on one pool."""
    asyncio.run(pool_throughput(pool, prompts[:2], 1, 4, None))  # warm-up
    seconds, tokens = asyncio.run(pool_throughput(pool, prompts, args.samples, args.max_tokens, None))
    base = tokens / seconds
    latencies = asyncio.run(publish_latencies(pool, learner, model_id, prompts[0], args.publishes, tag))
    policy = f"tinker://{model_id}/sampler_weights/bench-{tag}-{args.publishes - 1}"
    seconds, tokens = asyncio.run(pool_throughput(pool, prompts, args.samples, args.max_tokens, policy))
    return {"base_tokens_per_s": base, "policy_tokens_per_s": tokens / seconds,
            "publish_to_first_sample_s": {"p50": statistics.median(latencies),
                                          "p95": sorted(latencies)[int(0.95 * (len(latencies) - 1))]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU computes in it natively")
    parser.add_argument("--publishes", type=int, default=8)
    parser.add_argument("--skip-slow-path", action="store_true", help="do not measure vLLM's own LoRA path")
    args = parser.parse_args()
    args.dtype = resolve_dtype(args.dtype, "cpu")

    folder = str(resolve_model(args.model))
    prompts = chat_prompts(folder, args.prompts)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[str, object] = {"model": args.model, "dtype": args.dtype, "prompts": args.prompts,
                                  "samples": args.samples, "max_tokens": args.max_tokens}

    raw = ray.remote(RawVllm).options(num_cpus=1).remote(folder, args.dtype, 512)
    ray.get(raw.generate.remote(prompts[:2], 1, 4))  # warm-up
    seconds, tokens = ray.get(raw.generate.remote(prompts, args.samples, args.max_tokens))
    results["raw_vllm_tokens_per_s"] = tokens / seconds
    ray.kill(raw)

    learner = LearnerActor.options(num_cpus=1).remote(folder, storage="/tmp/rl-bench-storage", dtype=args.dtype)
    model_id = ray.get(learner.create.remote(folder, LoraConfig(rank=16, seed=0, train_unembed=False)))
    modes = {"adapter": {"publish_mode": "adapter"}, "merge": {"publish_mode": "merge"}}
    if not args.skip_slow_path:
        modes["adapter, vLLM's own LoRA path"] = {"publish_mode": "adapter", "lora_fast_path": False}
    for label, options in modes.items():
        pool = SamplerPool(folder, replicas=1, num_cpus=1, max_model_len=512, max_lora_rank=16, dtype=args.dtype,
                           **options)
        results[label] = measure_pool(pool, learner, model_id, prompts, args, tag=str(len(results)))
        pool.shutdown()
    adapter = results["adapter"]
    results["pool_over_raw"] = adapter["base_tokens_per_s"] / results["raw_vllm_tokens_per_s"]

    print(f"raw vLLM (LoRA enabled)   {results['raw_vllm_tokens_per_s']:8.1f} tokens/s")
    print(f"pool, base model          {adapter['base_tokens_per_s']:8.1f} tokens/s   ratio to raw "
          f"{results['pool_over_raw']:.2f}")
    for label in modes:
        measured = results[label]
        print(f"publish_mode={label}: base {measured['base_tokens_per_s']:.1f} tokens/s, policy "
              f"{measured['policy_tokens_per_s']:.1f} tokens/s, policy / adapter-mode base "
              f"{measured['policy_tokens_per_s'] / adapter['base_tokens_per_s']:.2f}, publish -> first sample p50 "
              f"{measured['publish_to_first_sample_s']['p50']:.2f} s, p95 "
              f"{measured['publish_to_first_sample_s']['p95']:.2f} s")
    print(json.dumps(results))
    ray.shutdown()


if __name__ == "__main__":
    main()
