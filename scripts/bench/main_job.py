"""The main job as users run it, measured in one invocation: `rl-train recipe=arithmetic_rl` at its own defaults.

    .venv/bin/python scripts/bench/main_job.py                  # the recipe: 12 prompts x 4, 30 steps, eval every 5
    .venv/bin/python scripts/bench/main_job.py --config small   # 8 prompts x 4, 64 new tokens, 4 steps, no eval
    .venv/bin/python scripts/bench/main_job.py --config soak    # 200 steps of the tiny model (digits task): memory
    ... [--json FILE] [--no-raw-vllm]

The run is the user's command in a process of its own (`python -m rl.train recipe=arithmetic_rl ...`, wandb
off, its folder in a temporary directory); everything it measures comes from its metrics.jsonl. Around it:
- the machine's matmul roofline, measured here before and after the run: bf16 and fp32 GFLOP/s of a 2048^3
  matmul on every core, and after the run on as many threads as the run gave its learner and its sampler (off-policy,
  half the cores each: `rl.driver.run.overlap_threads`);
- the learner's and the sampler's fraction of the roofline of the dtype the run computed in, on the cores each had
  and on the whole machine (`model.dtype`;
  `auto` is bf16 only on CPUs that compute in it natively, rl.models.resolve_dtype): 4 FLOPs per weight of the
  model's matrices for every token the learner computed (forward, and backward to the activations: LoRA leaves
  the base weights frozen; `tokens/computed` counts a shared prefix once) over the seconds of forward_backward +
  optim_step; 2 per weight per prompt token (once per request) and sampled token over the rollouts' own
  seconds (`time/rollout_s`: off-policy, a step waits only for what is left of its rollout);
- sampling against raw vLLM: after the run, a replica like the run's samples the first steps' rollouts through
  the run's path (each group's first-turn request -> pool -> replica -> engine loop) and, on the same engine in
  the same process, with `LLM.generate`, interleaved three times (medians: the machines are noisy);
- every process's resident memory, sampled every 0.5 s: driver, Ray's own processes, learner, sampler, at
  their peak and at the end of the run (the last sample before the driver exits); and the whole job's PSS
  (what it costs the machine: a library page that every process maps counts once, not once per process), every
  5 s (PSS_EVERY); the watcher's own CPU time is reported with them.
The machines are noisy: compare only figures from the same invocation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "main": [],
    "small": ["algo.prompts_per_step=8", "algo.max_tokens=64", "steps=4", "eval_every=0", "checkpoint_every=0"],
    # soak: the digits task, which the tiny model scores unevenly, so that every step trains
    "soak": ["model=tiny", "task=digits", "steps=200", "eval_every=0", "checkpoint_every=0"],
}
SOAK_STEPS = (10, 50, 100, 200)
ROLES = ("Learner", "Sampler", "raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "dashboard")


def matmul_gflops(dtype: torch.dtype, threads: int, size: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` size^3 matmuls on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: oneDNN picks and caches its kernel
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def roofline(threads: int | None = None) -> dict[str, float]:
    """bf16 and fp32 GFLOP/s on `threads` threads (None: every core this process may run on). A CPU without native
    bf16 emulates it at 1/45-1/200 of fp32's rate (AVX2-only EPYC): there a 512^3 product measures it in seconds,
    where six 2048^3 products took ~5 minutes a thread count."""
    from rl.models import native_bf16

    threads = threads or len(os.sched_getaffinity(0))
    bf16_size = 2048 if native_bf16("cpu") else 512
    return {"threads": threads, "bf16_gflops": matmul_gflops(torch.bfloat16, threads, size=bf16_size),
            "fp32_gflops": matmul_gflops(torch.float32, threads)}


def run_threads(config: dict) -> dict[str, int]:
    """The CPU threads the run gave its learner and its replica (a run alone overlaps them when off-policy)."""
    from omegaconf import OmegaConf

    from rl.config import load
    from rl.driver.run import actor_threads

    threads = actor_threads(load(OmegaConf.create(config)), config["algo"]["off_policy"])
    return {role: count or len(os.sched_getaffinity(0)) for role, count in threads.items()}


def role(process: psutil.Process, driver_pid: int) -> str:
    if process.pid == driver_pid:
        return "driver"
    name = " ".join(process.cmdline())
    return next((role for role in ROLES if role in name), "other")


PSS_EVERY = 10
"""Samples between readings of the whole job's PSS: the kernel walks every page a process maps to count it
(~40 ms for a 2.4 GB process), which at every sample took ~10% of a core from the run being measured."""


def watch(command: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Runs `command`; returns each role's resident memory in GiB (summed over its processes), peak and final,
    sampled every 0.5 s, and the whole job's proportional set size (shared pages split between the processes
    that share them, so the libraries every process maps count once), peak and final, every PSS_EVERY samples;
    and the watcher's own CPU seconds ("watcher_cpu_s" in the second)."""
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    driver = psutil.Process(child.pid)
    cpu_before = time.process_time()
    peak: dict[str, float] = {}
    last: dict[str, float] = {}
    pss = {"peak_gib": 0.0, "final_gib": 0.0}
    for sample in itertools.count():
        if child.poll() is not None:
            break
        now: dict[str, float] = {}
        pss_now = 0.0
        reads_pss = sample % PSS_EVERY == 0
        for process in [driver, *driver.children(recursive=True)]:
            try:
                name = role(process, child.pid)  # read each time: a Ray worker takes its actor's name once it has one
                if reads_pss:
                    memory = process.memory_full_info()
                    pss_now += memory.pss / 2**30
                else:
                    memory = process.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            now[name] = now.get(name, 0.0) + memory.rss / 2**30
        if "Learner" in now:  # the run is up: each role's last reading then is its final memory
            last.update(now)  # (a role whose processes end first keeps its own last reading, not 0)
            if reads_pss:
                pss["final_gib"] = pss_now
        pss["peak_gib"] = max(pss["peak_gib"], pss_now)
        for name, gib in now.items():
            peak[name] = max(peak.get(name, 0.0), gib)
        time.sleep(0.5)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit status {child.returncode})")
    pss["watcher_cpu_s"] = time.process_time() - cpu_before
    return {name: {"peak_gib": peak[name], "final_gib": last.get(name, 0.0)} for name in peak}, pss


def matrix_weights(model_folder: Path) -> int:
    """Weights of the model's matrices (decoder linear layers and the output layer): 2 FLOPs each per token."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder)
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + hidden * config.vocab_size


def sampling_vs_raw(run_config: dict, steps: list[int], repeats: int = 3) -> dict[str, list[float]]:
    """Seconds of the run's sampling path (its requests -> SamplerPool -> replica -> EngineLoop) and of raw vLLM
    `LLM.generate` of the same requests on the same engine in the same replica process, on each of `steps`'
    rollouts, interleaved, each from an empty prefix cache."""
    import asyncio

    import ray
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from rl.config import load
    from rl.driver.rl import PROMPTS_PER_STEP_SEED, STEPS_PER_SEED
    from rl.env import TaskEnvironment
    from rl.models import resolve_model
    from rl.sampler import SamplerPool
    from rl.sampler.replica import vllm_sampling_params
    from rl.tasks import make_task
    from rl.types import ModelInput, SampleRequest

    def raw(replica, requests) -> float:  # runs in the replica: what Sampler.sample gives the engine, at once
        from vllm import TokensPrompt

        prompts = [replica._checked_prompt(request) for request in requests]
        params = [vllm_sampling_params(request, max_tokens=replica._max_tokens(request, len(prompt)))
                  for request, prompt in zip(requests, prompts, strict=True)]
        prompts = [TokensPrompt(prompt_token_ids=prompt) for prompt in prompts]
        started = time.perf_counter()
        replica._engine.call(lambda: replica._engine.llm.generate(prompts, params, use_tqdm=False)).result()
        return time.perf_counter() - started

    def empty_cache(replica) -> None:  # neither path may find the other's prompts cached
        assert replica._engine.call(replica._engine.llm.reset_prefix_cache, drain=True).result()

    async def ours(pool, requests) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(pool.sample(request) for request in requests))
        return time.perf_counter() - started

    async def first_turn_requests(config, environment, tokenizer, step) -> list[SampleRequest]:
        """The requests that the run's rollout of `step` starts with: each group's first turn, G samples."""
        algo, step_seed = config.algo, config.seed * STEPS_PER_SEED + step
        groups = environment.groups(algo.prompts_per_step, seed=step_seed, split="train",
                                    group_size=algo.group_size, tokenizer=tokenizer)
        prompts = [(await (await group.make_envs())[0].initial_observation())[0] for group in groups]
        return [SampleRequest(prompt=ModelInput.from_ints(prompt), num_samples=algo.group_size, sampling_params={
            "max_tokens": algo.max_tokens, "temperature": algo.temperature,
            "seed": step_seed * PROMPTS_PER_STEP_SEED + index}) for index, prompt in enumerate(prompts)]

    config = load(OmegaConf.create(run_config))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    folder = str(resolve_model(config.model.name))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pool = SamplerPool(folder, max_model_len=config.model.max_model_len, max_lora_rank=config.model.lora_rank,
                       dtype=config.model.dtype, seed=config.seed, publish_mode=config.sampler.publish_mode,
                       threads=run_threads(run_config)["sampler"])  # as the run's replica had
    replica = pool._replicas[0].actor
    task = make_task(config.task.name, format_reward=config.task.format_reward)
    seconds: dict[str, list[float]] = {"ours_s": [], "raw_s": []}
    for index, step in enumerate([steps[0], *steps * repeats]):  # the first pair warms the engine up
        requests = asyncio.run(first_turn_requests(config, TaskEnvironment(task), tokenizer, step))
        ray.get(replica.__ray_call__.remote(empty_cache))
        ours_s = asyncio.run(ours(pool, requests))
        ray.get(replica.__ray_call__.remote(empty_cache))
        raw_s = ray.get(replica.__ray_call__.remote(raw, requests))
        if index:
            seconds["ours_s"].append(ours_s)
            seconds["raw_s"].append(raw_s)
    pool.shutdown()
    ray.shutdown()
    return seconds


def summarize(records: list[dict], config: dict, roofs: dict[str, dict], weights: int) -> dict:
    """`roofs`: the matmul roofline of the whole machine ("machine") and on the learner's and the sampler's own
    threads ("learner", "sampler")."""
    from rl.models import resolve_dtype

    dtype = resolve_dtype(config["model"]["dtype"], "cpu")
    key = "bf16_gflops" if dtype == "bfloat16" else "fp32_gflops"
    steps = [record for record in records if "tokens/trained" in record]
    seconds = [record["step_time_s"] for record in steps]  # evaluations included: the RL loop overlaps them
    phases = {key.removeprefix("time/").removesuffix("_s"): statistics.mean(record.get(key, 0.0) for record in steps)
              for key in sorted({key for record in steps for key in record if key.startswith("time/")})}
    learner_s = sum(record.get("time/forward_backward_s", 0.0) + record.get("time/optim_step_s", 0.0)
                    for record in steps)
    learner_flops = 4 * weights * sum(record.get("tokens/computed", 0) for record in steps)
    sampling_s = sum(record["time/rollout_s"] for record in steps)  # off-policy, sampling_s is only the wait
    sampled_flops = 2 * weights * sum(record["tokens/sampled"] + record["tokens/prompt"] / config["algo"]["group_size"]
                                      for record in steps)
    evaluations = [(record["time_total/minutes"] - record["step_time_s"] / 60,  # the evaluated weights' time
                    record["eval/accuracy"]) for record in records if "eval/accuracy" in record]
    learner_gflops = learner_flops / max(learner_s, 1e-9) / 1e9
    sampler_gflops = sampled_flops / sampling_s / 1e9
    return {
        "steps": len(steps), "steps_per_s": len(steps) / sum(record["step_time_s"] for record in steps),
        "mean_step_s": statistics.mean(seconds),
        "median_step_s": statistics.median(seconds), "max_step_s": max(seconds),
        # Step 0 fills the pipeline (off-policy it waits for two rollouts and the first evaluation): the longest
        # step after it says whether any other step stalls
        "max_step_after_first_s": max(seconds[1:], default=0.0),
        "minutes_of_steps": records[-1]["time_total/minutes"], "seconds_per_phase": phases,
        "dtype": dtype, "learner_gflops": learner_gflops, "sampler_gflops": sampler_gflops,
        "learner_fraction_of_roofline": learner_gflops / roofs["machine"][key],
        "learner_fraction_of_own_roofline": learner_gflops / roofs["learner"][key],
        "sampler_fraction_of_roofline": sampler_gflops / roofs["machine"][key],
        "sampler_fraction_of_own_roofline": sampler_gflops / roofs["sampler"][key],
        "evaluations": [{"minutes": minutes, "accuracy": accuracy} for minutes, accuracy in evaluations],
        "minutes_to_0.9": next((minutes for minutes, accuracy in evaluations if accuracy >= 0.9), None),
        "sampled_tokens_per_s_first_steps": [record["throughput/sampled_tokens_per_s"] for record in steps[:3]],
        "memory_at_steps": {str(record["step"] + 1): {key.removeprefix("memory/"): value
                                                      for key, value in record.items() if key.startswith("memory/")}
                            for record in steps if record["step"] + 1 in SOAK_STEPS},
    }


def report(result: dict) -> None:
    roof_before, roof_after = result["roofline_before"], result["roofline_after"]
    print(f"machine: {result['cpu']}; matmul roofline bf16 {roof_before['bf16_gflops']:.0f} / "
          f"{roof_after['bf16_gflops']:.0f} GFLOP/s (before / after), fp32 {roof_before['fp32_gflops']:.0f} / "
          f"{roof_after['fp32_gflops']:.0f}")
    run = result["run"]
    spread = run["max_step_s"] / run["median_step_s"]
    print(f"{result['config']}: {run['steps']} steps in {run['minutes_of_steps']:.2f} min of steps "
          f"({result['wall_s']:.0f} s in all): {run['steps_per_s']:.3f} steps/s, step mean {run['mean_step_s']:.2f} s,"
          f" median {run['median_step_s']:.2f}, max {run['max_step_s']:.2f} ({spread:.2f} x median;"
          f" evaluations included); after step 0 max {run['max_step_after_first_s']:.2f}"
          f" ({run['max_step_after_first_s'] / run['median_step_s']:.2f} x median)")
    print("seconds per step: " + ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in
                                          run["seconds_per_phase"].items()))
    own = result["roofline_own_threads"]
    key = "bf16_gflops" if run["dtype"] == "bfloat16" else "fp32_gflops"
    print(f"{run['dtype']} roofline on the run's own threads: learner ({own['learner']['threads']}) "
          f"{own['learner'][key]:.0f}, sampler ({own['sampler']['threads']}) {own['sampler'][key]:.0f} GFLOP/s")
    for name in ("learner", "sampler"):
        print(f"{name} {run[name + '_gflops']:.0f} GFLOP/s = {run[name + '_fraction_of_own_roofline']:.0%} of the "
              f"{run['dtype']} roofline on its {own[name]['threads']} thread(s), "
              f"{run[name + '_fraction_of_roofline']:.0%} of the whole machine's")
    if run["evaluations"]:
        print("held-out accuracy at minutes of steps: " + ", ".join(
            f"{e['accuracy']:.2f} @ {e['minutes']:.2f}" for e in run["evaluations"])
              + f"; >= 0.9 after {run['minutes_to_0.9']} min")
    if "sampling_vs_raw_vllm" in result:
        ours, raw = (statistics.median(result["sampling_vs_raw_vllm"][key]) for key in ("ours_s", "raw_s"))
        print(f"sampling path vs raw vLLM on the same engine, first steps' rollouts interleaved: {ours:.2f} vs "
              f"{raw:.2f} s (medians of {len(result['sampling_vs_raw_vllm']['raw_s'])}): {raw / ours:.2f}x raw speed")
    print("resident memory (GiB), peak / final: " + ", ".join(
        f"{name} {figures['peak_gib']:.2f} / {figures['final_gib']:.2f}" for name, figures in result["memory"].items())
          + f"; all {result['memory_total_peak_gib']:.2f} at peak (sum of each role's peak)")
    print(f"the whole job's PSS (a page shared by several processes counted once), peak / final: "
          f"{result['memory_pss']['peak_gib']:.2f} / {result['memory_pss']['final_gib']:.2f} GiB (every "
          f"{PSS_EVERY / 2:.0f} s); the watcher's own CPU time: {result['memory_pss']['watcher_cpu_s']:.1f} s")
    for step, figures in run["memory_at_steps"].items():
        print(f"  after step {step}: " + ", ".join(f"{name} {gib:.2f}" for name, gib in sorted(figures.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="main")
    parser.add_argument("--json", help="write the results here too, with the run's per-step records")
    parser.add_argument("--no-raw-vllm", action="store_true", help="skip the raw vLLM comparison")
    args = parser.parse_args()
    from rl.models import CPUINFO, NATIVE_BF16_CPU_FLAGS, cpu_flags

    cpuinfo = CPUINFO.read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               "unknown")
    bf16 = sorted(NATIVE_BF16_CPU_FLAGS.intersection(cpu_flags(cpuinfo)))
    result: dict = {"config": args.config, "cpu": f"{cpu}, {os.cpu_count()} cores, "
                                                   f"{'native bf16: ' + ' '.join(bf16) if bf16 else 'no native bf16'}",
                    "roofline_before": roofline()}
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "rl.train", "recipe=arithmetic_rl", f"hydra.run.dir={folder}",
                   "logger.wandb_mode=disabled", *CONFIGS[args.config]]
        started = time.perf_counter()
        result["memory"], result["memory_pss"] = watch(command)
        result["wall_s"] = time.perf_counter() - started
        result["memory_total_peak_gib"] = sum(figures["peak_gib"] for figures in result["memory"].values())
        records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((Path(folder) / "config.json").read_text())
    result["roofline_after"] = roofline()
    from rl.models import resolve_model

    weights = matrix_weights(resolve_model(config["model"]["name"]))
    threads = run_threads(config)
    measured = {result["roofline_after"]["threads"]: result["roofline_after"]}  # each thread count once
    for count in threads.values():
        if count not in measured:
            measured[count] = roofline(count)
    result["roofline_own_threads"] = {role: measured[count] for role, count in threads.items()}
    result["run"] = summarize(records, config, {"machine": result["roofline_before"],
                                                **result["roofline_own_threads"]}, weights)
    result["records"] = records  # per step: each phase's seconds, tokens, memory (what the summary averages)
    if not args.no_raw_vllm and args.config != "soak":
        result["sampling_vs_raw_vllm"] = sampling_vs_raw(config, [0, 1, 2])
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
