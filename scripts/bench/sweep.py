"""A learning-rate sweep of a recipe, shared against one run after another, measured in one invocation.

    .venv/bin/python scripts/bench/sweep.py                        # arithmetic_rl, 4 rates, the recipe's defaults
    .venv/bin/python scripts/bench/sweep.py --runs 8 model=tiny    # how the cost grows with the number of runs
    ... [--recipe NAME] [--runs N] [--json FILE] [OVERRIDE ...]

Shared: one `rl-train -m recipe=NAME algo.learning_rate=R1,R2,... sweep.share=true`, whose runs train at once on one
learner and one sampler pool (rl/sweep.py). One after another: `rl-train recipe=NAME algo.learning_rate=R` for each
rate in turn, as a sweep ran before. The rates are the recipe's own times 0.5, 1, 2, 4, ... (`--runs` of them).
Reported: each mode's wall-clock seconds (start-up included) and their ratio; every process's resident memory, peak
and final, summed by role (driver, Learner, Sampler, Ray's own), and the whole job's PSS, for the shared sweep and for
the largest of the single runs; each run's final held-out accuracy and mean reward in both modes, side by side. Each
command is the user's, in a process of its own, wandb off, its folders in a temporary directory.
The machines are noisy: compare only figures from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import watch  # noqa: E402  (the memory watcher every benchmark of a whole run uses)

ROOT = Path(__file__).resolve().parents[2]


def recipe_rate(recipe: str, overrides: list[str]) -> float:
    from rl.train import CONFIGS  # importing rl.train registers the config schema that configs/config.yaml names

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=[f"recipe={recipe}", *overrides]).algo.learning_rate


def final(folder: Path, key: str) -> float | None:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    values = [record[key] for record in records if key in record]
    return values[-1] if values else None


def timed_watch(command: list[str]) -> tuple[float, dict, dict]:
    started = time.perf_counter()
    memory, pss = watch(command)
    return time.perf_counter() - started, memory, pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="arithmetic_rl")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    os.environ["WANDB_MODE"] = "disabled"
    base = recipe_rate(args.recipe, args.overrides)
    rates = [base * 2.0 ** (index - 1) for index in range(args.runs)]
    train = [sys.executable, "-m", "rl.train"]
    common = [f"recipe={args.recipe}", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        folder = Path(scratch)
        alone = []
        for index, rate in enumerate(rates):
            run = folder / "alone" / str(index)
            seconds, memory, pss = timed_watch([*train, *common, f"algo.learning_rate={rate}", f"hydra.run.dir={run}"])
            alone.append({"rate": rate, "seconds": seconds, "memory": memory, "pss": pss, "folder": run})
            print(f"alone {index}: rate {rate:.3g}, {seconds:.0f} s", flush=True)
        shared_folder = folder / "shared"
        seconds, memory, pss = timed_watch([*train, "-m", *common, "algo.learning_rate=" + ",".join(map(str, rates)),
                                            "sweep.share=true", f"hydra.sweep.dir={shared_folder}"])
        shared = {"seconds": seconds, "memory": memory, "pss": pss}
        print(f"shared: {seconds:.0f} s", flush=True)
        largest = max(alone, key=lambda run: run["pss"]["peak_gib"])
        result = {
            "recipe": args.recipe, "overrides": args.overrides, "rates": rates,
            "seconds": {"shared": shared["seconds"], "one_after_another": sum(run["seconds"] for run in alone),
                        "each_alone": [run["seconds"] for run in alone]},
            "memory_gib": {"shared": shared["memory"], "shared_pss": shared["pss"],
                           "largest_alone": largest["memory"], "largest_alone_pss": largest["pss"]},
            "runs": [{"rate": run["rate"], **{f"{mode}_{key}": final(place, key)
                                              for mode, place in (("alone", run["folder"]),
                                                                  ("shared", shared_folder / str(index)))
                                              for key in ("eval/accuracy", "reward/mean")}}
                     for index, run in enumerate(alone)],
        }
    result["ratio_shared_to_one_after_another"] = result["seconds"]["shared"] / result["seconds"]["one_after_another"]
    result["ratio_shared_to_largest_alone_pss"] = (result["memory_gib"]["shared_pss"]["peak_gib"]
                                                   / result["memory_gib"]["largest_alone_pss"]["peak_gib"])
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
