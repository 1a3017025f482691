"""Multi-turn rollouts, and what vLLM's prefix caching saves on them, measured side by side in one invocation.

    .venv/bin/python scripts/bench/episodes.py [--env guess_number] [--groups 8] [--group-size 8]
                                               [--max-tokens 8] [--repeats 3] [--json FILE]

Two one-replica pools of SmolLM2-135M-Instruct (dtype auto and merge mode, as the recipes run), one with prefix
caching (the default) and one without, roll out the same seeded episodes (the recipe's environment, its first step's
groups) in turn, `--repeats` times each; reported: each pool's median episodes, turns and sampled tokens per
second, and the ratio of turns per second. Every turn of an episode resends the conversation so far: with the cache, a
turn prefills only what its observation added. Only ratios from the same invocation mean anything here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import ray
from transformers import AutoTokenizer

from rl.driver.episodes import Limits, run_group
from rl.environments import make_environment
from rl.models import resolve_model
from rl.sampler import SamplerPool
from rl.types import SamplingParams


async def rollout(pool, environment, tokenizer, args) -> tuple[float, int, int, int]:
    """Seconds, episodes, turns and sampled tokens of one step's groups."""
    groups = environment.groups(args.groups, seed=0, split="train", group_size=args.group_size, tokenizer=tokenizer)
    limits = Limits(max_tokens=args.max_tokens, max_turns=8, max_sampled_tokens=8 * args.max_tokens, context=512,
                    vocab_size=len(tokenizer))
    started = time.perf_counter()
    groups_episodes = await asyncio.gather(*(
        run_group(pool, group, name=environment.name, where=f"group {index}", model_path=None, limits=limits,
                  params=SamplingParams(temperature=1.0, seed=1000 + index)) for index, group in enumerate(groups)))
    seconds = time.perf_counter() - started
    episodes = [episode for group in groups_episodes for episode in group]
    turns = [turn for episode in episodes for turn in episode.turns]
    return seconds, len(episodes), len(turns), sum(len(turn.action.tokens) for turn in turns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="guess_number")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    folder = str(resolve_model("SmolLM2-135M-Instruct"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    environment = make_environment(args.env, {})
    pools = {cache: SamplerPool(folder, max_model_len=512, dtype="auto", publish_mode="merge", num_cpus=0,
                                threads=ray.cluster_resources()["CPU"], prefix_caching=cache)
             for cache in (True, False)}
    runs: dict[bool, list[tuple[float, int, int, int]]] = {True: [], False: []}
    for repeat in range(args.repeats + 1):  # the first round warms both engines up
        for cache, pool in pools.items():
            # A cache kept from the previous round would serve this round's first turns too: start each empty.
            ray.get([replica.actor.__ray_call__.remote(lambda self: self._engine.llm.reset_prefix_cache())
                     for replica in pool._replicas])
            measured = asyncio.run(rollout(pool, environment, tokenizer, args))
            if repeat:
                runs[cache].append(measured)
    # bf16 prefill with and without cached blocks rounds differently, so the two pools' episodes can differ a
    # little (a turn more or less): compare rates, not seconds.
    report = {"env": args.env, "groups": args.groups, "group_size": args.group_size}
    for cache, name in ((True, "prefix_cache"), (False, "no_prefix_cache")):
        rates = [(episodes / took, turns / took, tokens / took) for took, episodes, turns, tokens in runs[cache]]
        report[name] = {"episodes_per_s": statistics.median(r[0] for r in rates),
                        "turns_per_s": statistics.median(r[1] for r in rates),
                        "sampled_tokens_per_s": statistics.median(r[2] for r in rates),
                        "runs (seconds, episodes, turns, sampled tokens)": runs[cache]}
    report["cache_over_no_cache_turns_per_s"] = (report["prefix_cache"]["turns_per_s"]
                                                 / report["no_prefix_cache"]["turns_per_s"])
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    for pool in pools.values():
        pool.shutdown()


if __name__ == "__main__":
    main()
