"""Our RL and DPO loops against TRL's GRPOTrainer and DPOTrainer, configured alike, in one invocation.

    scripts/setup.sh auto bench          # TRL (the bench extra), for this benchmark only
    .venv/bin/python scripts/bench/vs_trl.py [--steps 3] [--warmup 1] [--only rl,dpo] [--rl-size main|small]
                                             [--json FILE]

RL: SmolLM2-135M-Instruct, LoRA rank 16 on the decoder's linear layers, `--rl-size main` (arithmetic_rl's own
defaults: 12 addition prompts x 4 samples, up to 16 new tokens, learning rate 3.5e-4) or `small` (8 x 4, up to 64,
2.5e-4; the default), temperature 1, bf16, the task's reward. Ours is `rl-train recipe=arithmetic_rl` with those
overrides (vLLM samples, merge publish); TRL's is GRPOTrainer with its default generation (the training model
generates). DPO: 8 pairs per step from `rl.tasks.preference_pairs` (chosen: the right answer, rejected: a near
miss) as chat conversations, beta 0.1, the base model as reference; ours is `rl-train recipe=arithmetic_dpo`, TRL's
is DPOTrainer with the same LoRA. Every side runs in its own process tree with no evaluation or checkpoints inside
the measured steps; the first `--warmup` steps are dropped. Peak memory is the largest total proportional set size
(PSS: shared pages split between the processes that share them) of the side's whole process tree, sampled every
0.2 s, start-up included: for ours, the driver, Ray's own processes, the learner and the vLLM sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]
DECODER_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RL_SIZES = {"small": (8, 64, 2.5e-4), "main": (12, 16, 3.5e-4)}
"""RL prompts per step, new tokens and learning rate: the first benchmark's, and the main job's (arithmetic_rl's
defaults; the rate decides how many groups differ, and so how many tokens train)."""
PROMPTS, MAX_TOKENS, RL_LR = RL_SIZES["small"]
GROUP, RANK, PAIRS = 4, 16, 8
DPO_LR, BETA = 1e-4, 0.1


# ---- the sides, each run in a process of its own ------------------------------------------------------------

def ours(recipe: str, steps: int, folder: Path) -> dict:
    """`rl-train` with the benchmark's settings; per-step figures from its metrics.jsonl."""
    overrides = [f"recipe={recipe}", f"steps={steps}", "eval_every=0", "checkpoint_every=0",
                 "logger.wandb_mode=disabled", f"hydra.run.dir={folder}", "cluster.num_cpus=2"]
    if recipe == "arithmetic_rl":
        overrides += [f"algo.prompts_per_step={PROMPTS}", f"algo.group_size={GROUP}", f"algo.max_tokens={MAX_TOKENS}",
                      f"algo.learning_rate={RL_LR}", f"model.lora_rank={RANK}"]
    else:
        overrides += [f"algo.prompts_per_step={PAIRS}", f"algo.learning_rate={DPO_LR}", f"model.lora_rank={RANK}"]
    subprocess.run([sys.executable, "-m", "rl.train", *overrides], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [{"seconds": r["step_time_s"], "sampled": r.get("tokens/sampled", 0),
                       "trained": r["tokens/trained"]} for r in records if "step_time_s" in r]}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step of a transformers Trainer, and the trainer's logs."""

    def __init__(self):
        self.seconds, self.logs, self._started = [], [], 0.0

    def on_step_begin(self, *args, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.seconds.append(time.perf_counter() - self._started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def trl_common(steps: int):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.models import resolve_model

    folder = str(resolve_model("SmolLM2-135M-Instruct"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    peft = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=DECODER_LINEAR,
                      task_type="CAUSAL_LM")
    common = {"output_dir": tempfile.mkdtemp(), "max_steps": steps, "logging_steps": 1, "report_to": "none",
              "save_strategy": "no", "bf16": True, "use_cpu": True, "seed": 0, "dataloader_num_workers": 0}
    return model, tokenizer, peft, StepTimer(), common


def trl_grpo(steps: int, folder: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rl.tasks import Addition, Problem, checked_problems

    task = Addition()
    model, tokenizer, peft, timer, common = trl_common(steps)
    problems = checked_problems(task, PROMPTS * steps, seed=0)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer}
                                 for p in problems])

    def reward(prompts, completions, answer, **kwargs):
        return [task.reward(Problem(prompt[-1]["content"], truth), completion[-1]["content"])
                for prompt, completion, truth in zip(prompts, completions, answer, strict=True)]

    config = GRPOConfig(**common, learning_rate=RL_LR, per_device_train_batch_size=PROMPTS * GROUP,
                        num_generations=GROUP, max_completion_length=MAX_TOKENS, temperature=1.0, beta=0.0,
                        gradient_accumulation_steps=1, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft, callbacks=[timer])
    trainer.train()
    logs = [log for log in timer.logs if "completions/mean_length" in log]
    prompt_tokens = [len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)) for row in dataset]
    rows = []
    for index, (seconds, log) in enumerate(zip(timer.seconds, logs, strict=True)):
        sampled = log["completions/mean_length"] * PROMPTS * GROUP
        prompts = sum(prompt_tokens[index * PROMPTS:(index + 1) * PROMPTS]) * GROUP
        rows.append({"seconds": seconds, "sampled": sampled, "trained": sampled + prompts})
    return {"steps": rows}


def trl_dpo(steps: int, folder: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rl.tasks import Addition, preference_pairs

    model, tokenizer, peft, timer, common = trl_common(steps)
    pairs = preference_pairs(Addition(), PAIRS * steps, seed=0)
    dataset = Dataset.from_list([{"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
                                 for pair in pairs])
    config = DPOConfig(**common, learning_rate=DPO_LR, per_device_train_batch_size=PAIRS, beta=BETA,
                       gradient_accumulation_steps=1)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft, callbacks=[timer])
    trainer.train()
    return {"steps": [{"seconds": seconds, "sampled": 0, "trained": 0} for seconds in timer.seconds]}


SIDES = {"ours-rl": lambda steps, folder: ours("arithmetic_rl", steps, folder), "trl-grpo": trl_grpo,
         "ours-dpo": lambda steps, folder: ours("arithmetic_dpo", steps, folder), "trl-dpo": trl_dpo}


# ---- the parent: runs each side, watches its memory, compares --------------------------------------------------

def tree_pss_gib(process: psutil.Process) -> tuple[float, dict[str, float]]:
    """Total PSS of a process and its descendants, and the share of each kind of process."""
    total, parts = 0.0, {}
    for member in [process, *process.children(recursive=True)]:
        try:
            pss = member.memory_full_info().pss / 2**30
            name = " ".join(member.cmdline())[:200]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        kind = next((role for role in ("Learner", "Sampler", "EngineCore", "raylet", "gcs_server") if role in name),
                    "driver" if member.pid == process.pid else "other")
        parts[kind] = parts.get(kind, 0.0) + pss
        total += pss
    return total, parts


def run_side(side: str, steps: int, scratch: Path, rl_size: str) -> dict:
    out = scratch / f"{side}.json"
    command = [sys.executable, __file__, "--side", side, "--steps", str(steps), "--out", str(out),
               "--scratch", str(scratch), "--rl-size", rl_size]
    child = subprocess.Popen(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    watched = psutil.Process(child.pid)
    peak, peak_parts = 0.0, {}
    while child.poll() is None:
        total, parts = tree_pss_gib(watched)
        if total > peak:
            peak, peak_parts = total, parts
        time.sleep(0.2)
    if child.returncode != 0:
        raise RuntimeError(f"{side} failed (exit status {child.returncode})")
    result = json.loads(out.read_text())
    result.update(peak_gib=peak, peak_parts_gib=peak_parts)
    return result


def summarize(result: dict, warmup: int) -> dict:
    steps = result["steps"][warmup:]
    seconds = sum(step["seconds"] for step in steps)
    return {"s_per_step": statistics.mean(step["seconds"] for step in steps),
            "steps_per_hour": 3600 * len(steps) / seconds,
            "sampled_tokens_per_s": sum(step["sampled"] for step in steps) / seconds,
            "trained_tokens_per_s": sum(step["trained"] for step in steps) / seconds,
            "pairs_per_s": PAIRS * len(steps) / seconds,
            "peak_gib": result["peak_gib"], "peak_parts_gib": result["peak_parts_gib"], "measured_steps": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped before measuring")
    parser.add_argument("--only", default="rl,dpo")
    parser.add_argument("--rl-size", choices=RL_SIZES, default="small")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PROMPTS, MAX_TOKENS, RL_LR
    PROMPTS, MAX_TOKENS, RL_LR = RL_SIZES[args.rl_size]
    if args.side:  # a child: run one side and write what it measured
        result = SIDES[args.side](args.steps, Path(args.scratch) / args.side)
        Path(args.out).write_text(json.dumps(result))
        return

    total = args.steps + args.warmup
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for part in args.only.split(","):
            pair = {"rl": ("ours-rl", "trl-grpo"), "dpo": ("ours-dpo", "trl-dpo")}[part]
            for side in pair:
                results[side] = summarize(run_side(side, total, Path(scratch), args.rl_size), args.warmup)
            ours_side, theirs = (results[side] for side in pair)
            if part == "rl":
                print(f"RL  ours {ours_side['s_per_step']:6.2f} s/step, TRL {theirs['s_per_step']:6.2f} s/step: "
                      f"steps/h ratio {ours_side['steps_per_hour'] / theirs['steps_per_hour']:.2f}; sampled tok/s "
                      f"{ours_side['sampled_tokens_per_s']:.0f} vs {theirs['sampled_tokens_per_s']:.0f}; trained "
                      f"tok/s {ours_side['trained_tokens_per_s']:.0f} vs {theirs['trained_tokens_per_s']:.0f}; peak "
                      f"{ours_side['peak_gib']:.2f} vs {theirs['peak_gib']:.2f} GiB", flush=True)
            else:
                print(f"DPO ours {ours_side['pairs_per_s']:.2f} pairs/s, TRL {theirs['pairs_per_s']:.2f} pairs/s: "
                      f"ratio {ours_side['pairs_per_s'] / theirs['pairs_per_s']:.2f}; peak {ours_side['peak_gib']:.2f}"
                      f" vs {theirs['peak_gib']:.2f} GiB", flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
