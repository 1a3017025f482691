"""rl-serve shared by eight SDK clients, two sending large batches and six small steps, against a small client
alone, in one invocation; or a soak of such mixed traffic that reports the server's memory over time.

    .venv/bin/python scripts/bench/serve_load.py                      # SmolLM2, rl-serve's defaults
    .venv/bin/python scripts/bench/serve_load.py --model tiny --big-tokens 32768
    .venv/bin/python scripts/bench/serve_load.py --soak-minutes 30    # memory every minute of mixed traffic
    .venv/bin/python scripts/bench/serve_load.py --recovery           # the learner SIGKILLed under 8 users' runs
    .venv/bin/python scripts/bench/serve_load.py --sampler-saves 100  # an RL user's sampler saves: object store
    ... [--small-steps 8] [--turn-tokens 2048] [--no-join-users] [--json FILE]

The server is rl-serve's app in this process (`ServerThread`) with its default limits; every client is the
official SDK over HTTP, with its own API key (user). A small step is forward_backward on 4 datums of 64 tokens
plus optim_step; a large one is forward_backward on `--big-tokens` tokens (default: the server's
max_batch_tokens, the largest batch it accepts; datums of 512 tokens) plus optim_step, which the SDK sends as
requests of about `turn_tokens` tokens. Reports: the small users' step latency, p50 and p95, alone and under
load, and their ratio (goal p95 <= 3x alone); trained tokens/s alone and under load; resident memory, peak and
final, of the server process, the learner and the sampler (sampled every 0.5 s). The soak runs the same traffic
for `--soak-minutes` and reports each minute's peak memory and its growth from the first minute to the last (goal:
<= +10%). `--recovery`: eight users each train a step and save (`save_state`); the learner's process is
SIGKILLed with no call in flight; reports the seconds until the server replaced it (no call made) and until
every run answered its next call (all restored), and how far each run's loss then is from its loss at the save
(goal: served again within 60 s, every run at its last saved state). `--sampler-saves N`: one user saves weights
for sampling every step and samples them, N steps; reports Ray's object store in use every 10 saves (the pool
keeps `--sampler-versions` ready, rl-serve's `sampler_versions`). Only ratios within one invocation mean
something: the machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import ray
import tinker
from tinker import types as sdk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import BIG_DATUM_TOKENS, SMALL_DATUMS, SMALL_TOKENS, latency  # noqa: E402
from main_job import role  # noqa: E402

from rl.serve import ServeConfig, build_service  # noqa: E402
from rl.service.app import ServerThread  # noqa: E402

ADAM = sdk.AdamParams(learning_rate=1e-5)


def data(count: int, tokens: int, rng: random.Random) -> list[sdk.Datum]:
    result = []
    for _ in range(count):
        sequence = [rng.randrange(100, 2000) for _ in range(tokens + 1)]  # within the tiny model's vocabulary too
        result.append(sdk.Datum(model_input=sdk.ModelInput.from_ints(sequence[:-1]),
                                loss_fn_inputs={"target_tokens": sequence[1:], "weights": [1.0] * tokens}))
    return result


class MemoryWatch:
    """Resident memory of this process (the server and its clients), the learner and the sampler, in GiB,
    every 0.5 s: peak, last, and the samples themselves (for the soak)."""

    def __init__(self):
        self.peak: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.5):
            now: dict[str, float] = {}
            for process in [me, *me.children(recursive=True)]:
                try:
                    name = "server" if process.pid == me.pid else role(process, me.pid)
                    now[name] = now.get(name, 0.0) + process.memory_info().rss / 2**30
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.last = {name: now[name] for name in ("server", "Learner", "Sampler") if name in now}
            for name, gib in self.last.items():
                self.peak[name] = max(self.peak.get(name, 0.0), gib)
            self.samples.append((time.monotonic(), self.last))

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return {name: {"peak_gib": round(self.peak[name], 2), "final_gib": round(self.last[name], 2)}
                for name in self.last}


class Traffic:
    """The SDK clients: small users stepping, big users sending the largest batches, each on a run of its own."""

    def __init__(self, server: ServerThread, model: str, keys: list[str], big_tokens: int):
        self.server, self.model, self.keys, self.big_tokens = server, model, keys, big_tokens
        self.trained_tokens = 0
        self._lock = threading.Lock()

    def trainer(self, key: str, seed: int):
        service = tinker.ServiceClient(base_url=self.server.url, api_key=key)
        return service.create_lora_training_client(base_model=self.model, rank=16, seed=seed).result()

    def small_steps(self, key: str, seed: int, steps: int, until: threading.Event | None = None) -> list[float]:
        trainer, rng, latencies = self.trainer(key, seed), random.Random(seed), []
        self.step(trainer, data(SMALL_DATUMS, SMALL_TOKENS, rng))  # warm-up
        while len(latencies) < steps or (until is not None and not until.is_set()):
            started = time.perf_counter()
            self.step(trainer, data(SMALL_DATUMS, SMALL_TOKENS, rng))
            latencies.append(time.perf_counter() - started)
        return latencies

    def big_steps(self, key: str, seed: int, until: threading.Event) -> int:
        trainer, rng, steps = self.trainer(key, seed), random.Random(seed), 0
        while not until.is_set():
            self.step(trainer, data(self.big_tokens // BIG_DATUM_TOKENS, BIG_DATUM_TOKENS, rng))
            steps += 1
        return steps

    def step(self, trainer, batch: list[sdk.Datum]) -> None:
        trainer.forward_backward(batch, "cross_entropy").result()
        trainer.optim_step(ADAM).result()
        with self._lock:
            self.trained_tokens += sum(datum.model_input.length for datum in batch)


def sampler_saves(traffic: Traffic, steps: int) -> dict:
    """One user's RL loop (tinker-cookbook's: new weights to sample from every step), `steps` times: a small
    step, save_weights_and_get_sampling_client, and a sample from it. Ray's object store in use every 10 saves."""
    from ray._private.internal_api import memory_summary

    trainer, rng, plasma = traffic.trainer(traffic.keys[0], 0), random.Random(0), []
    prompt, params = sdk.ModelInput.from_ints([1, 2, 3, 4]), sdk.SamplingParams(max_tokens=4, temperature=1.0)
    for step in range(steps):
        traffic.step(trainer, data(SMALL_DATUMS, SMALL_TOKENS, rng))
        sampler = trainer.save_weights_and_get_sampling_client().result()
        sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
        if (step + 1) % 10 == 0:
            usage = memory_summary(stats_only=True).split("Plasma memory usage ")[1]
            plasma.append({"saves": step + 1, "object_store_mib": int(usage.split(" MiB")[0]),
                           "objects": int(usage.split(", ")[1].split()[0])})
            print(f"{step + 1} saves: Ray's object store {plasma[-1]['object_store_mib']} MiB in "
                  f"{plasma[-1]['objects']} objects", flush=True)
    return {"saves": plasma}


def under_load(traffic: Traffic, small_steps: int) -> dict:
    """Alone: one small user. Then six small users and two big ones at once, until every small user is done and
    the big ones have finished the step they were in (the tokens/s count every step finished in that time)."""
    started, tokens = time.perf_counter(), traffic.trained_tokens
    alone = traffic.small_steps(traffic.keys[0], 0, small_steps)
    alone_rate = (traffic.trained_tokens - tokens) / (time.perf_counter() - started)
    done = threading.Event()
    with ThreadPoolExecutor(8) as pool:
        big = [pool.submit(traffic.big_steps, traffic.keys[index], 100 + index, done) for index in (1, 2)]
        time.sleep(5)  # the big users' first batches are queued before the small users start
        started, tokens = time.perf_counter(), traffic.trained_tokens
        small = [pool.submit(traffic.small_steps, traffic.keys[index], index, small_steps) for index in range(3, 9)]
        loaded = [seconds for future in small for seconds in future.result()]
        done.set()  # the big users finish the step they are in
        big_steps = [future.result() for future in big]
        seconds = time.perf_counter() - started
        loaded_rate = (traffic.trained_tokens - tokens) / seconds
    alone_latency, load_latency = latency(alone), latency(loaded)
    return {"alone": alone_latency, "under_load": load_latency, "big_user_steps": big_steps,
            "p95_ratio": round(load_latency["p95_s"] / alone_latency["p95_s"], 2),
            "p50_ratio": round(load_latency["p50_s"] / alone_latency["p50_s"], 2),
            "trained_tokens_per_s": {"alone": round(alone_rate), "under_load": round(loaded_rate)},
            "load_seconds": round(seconds, 1)}


def soak(traffic: Traffic, watch: MemoryWatch, minutes: float) -> dict:
    """The same mixed traffic for `minutes`; memory at the end of each minute."""
    done = threading.Event()
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(traffic.big_steps, traffic.keys[index], 100 + index, done) for index in (1, 2)]
        clients += [pool.submit(traffic.small_steps, traffic.keys[index], index, 0, done) for index in range(3, 9)]
        per_minute = []
        for minute in range(1, int(minutes) + 1):
            time.sleep(max(0.0, started + 60 * minute - time.monotonic()))
            # The minute's peak: a single reading lands anywhere between a pass's peak and the memory it frees.
            window = [sample for at, sample in watch.samples if at >= started + 60 * (minute - 1)]
            per_minute.append({"minute": minute, **{name: round(max(sample.get(name, 0.0) for sample in window), 2)
                                                    for name in watch.last}})
            print(f"soak minute {minute}, peak resident GiB: {per_minute[-1]}", flush=True)
        done.set()
        for client in clients:
            client.result()
    first, last = per_minute[0], per_minute[-1]
    growth = {name: round(last[name] / first[name] - 1, 3) for name in ("server", "Learner", "Sampler")
              if name in first and name in last}
    return {"per_minute": per_minute, "growth_first_to_last": growth, "trained_tokens": traffic.trained_tokens}


def recovery(traffic: Traffic, service, runs: int = 8) -> dict:
    """Each of `runs` users trains a step and saves; the learner's process is SIGKILLed; how soon the server
    replaced it and served every run again, from its save."""
    probe = data(1, SMALL_TOKENS, random.Random(-1))
    trainers, at_save = [], []
    for index in range(runs):
        trainer = traffic.trainer(traffic.keys[index], index)
        traffic.step(trainer, data(SMALL_DATUMS, SMALL_TOKENS, random.Random(index)))
        trainer.save_state("before-the-kill").result()
        at_save.append(trainer.forward(probe, "cross_entropy").result().metrics["loss:sum"])
        trainers.append(trainer)
    learner = service.learners[traffic.model]
    dead = learner.actor
    me = psutil.Process()
    (pid,) = [process.pid for process in me.children(recursive=True) if role(process, me.pid) == "Learner"]
    killed = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while learner.actor is dead:
        time.sleep(0.05)
    replaced = time.perf_counter() - killed
    with ThreadPoolExecutor(runs) as pool:
        losses = list(pool.map(lambda trainer: trainer.forward(probe, "cross_entropy").result().metrics["loss:sum"],
                               trainers))
    served = time.perf_counter() - killed
    return {"runs": runs, "replaced_after_s": round(replaced, 1), "every_run_served_after_s": round(served, 1),
            "largest_relative_loss_difference_from_save": max(abs(a - b) / abs(a) for a, b in zip(
                at_save, losses, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = ServeConfig()
    parser.add_argument("--model", default=defaults.models[0])
    parser.add_argument("--big-tokens", type=int, default=defaults.max_batch_tokens)
    parser.add_argument("--small-steps", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=defaults.turn_tokens)
    parser.add_argument("--no-join-users", dest="join_users", action="store_false",
                        help="one learner call per user's forward_backward (before: join_users=false)")
    parser.add_argument("--soak-minutes", type=float, default=0)
    parser.add_argument("--recovery", action="store_true")
    parser.add_argument("--sampler-saves", type=int, default=0,
                        help="one user saving weights for sampling every step, this many steps: the object store")
    parser.add_argument("--sampler-versions", type=int, default=defaults.sampler_versions)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    keys = [f"tml-user-{index}" for index in range(9)]
    watch = MemoryWatch()
    service = build_service(ServeConfig(models=[args.model], storage=tempfile.mkdtemp(prefix="serve-load-"),
                                        turn_tokens=args.turn_tokens, join_users=args.join_users,
                                        sampler_versions=args.sampler_versions), keys)
    server = ServerThread(service)
    traffic = Traffic(server, args.model, keys, args.big_tokens)
    result = {"model": args.model, "big_tokens": args.big_tokens, "turn_tokens": args.turn_tokens,
              "join_users": args.join_users,
              "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "?"), "cores": len(os.sched_getaffinity(0))}
    try:
        if args.soak_minutes:
            result["soak"] = soak(traffic, watch, args.soak_minutes)
        elif args.recovery:
            result["recovery"] = recovery(traffic, service)
        elif args.sampler_saves:
            result["sampler_versions"] = args.sampler_versions
            result["sampler_saves"] = sampler_saves(traffic, args.sampler_saves)
        else:
            result.update(under_load(traffic, args.small_steps))
    finally:
        result["memory_gib"] = watch.stop()
        server.stop()
        service.close()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
