"""The DPO loop: preference pairs -> forward_backward(loss_fn="dpo") -> optim_step; the reference is the base model.

Pairs come from a verifiable task: a correct and an incorrect final answer to the same prompt
(`rl.tasks.preference_pairs`). A pair is two consecutive datums, chosen then rejected, whose weights select the
reply's tokens. The learner computes the reference logprobs itself with the adapter off, so the reference is
the base model. Every `eval_every` steps: DPO accuracy on held-out pairs, and greedy task accuracy.
"""

from __future__ import annotations

import asyncio
import time

from tqdm import tqdm

from rl.config import TrainConfig
from rl.driver.run import Run, batch_indices, conversation_datum
from rl.tasks import PreferencePair, Task, checked_problems, preference_pairs
from rl.types import AdamParams, Datum, ForwardBackwardInput

DPO_METRICS = {"dpo_accuracy:mean": "dpo/accuracy", "dpo_margin:mean": "dpo/margin",
               "dpo_chosen_reward:mean": "dpo/chosen_reward", "dpo_rejected_reward:mean": "dpo/rejected_reward"}


def pair_datums(tokenizer, pairs: list[PreferencePair]) -> list[Datum]:
    """Chosen then rejected, for each pair: the layout the dpo loss reads."""
    return [conversation_datum(tokenizer, [{"role": "user", "content": pair.prompt},
                                           {"role": "assistant", "content": reply}])
            for pair in pairs for reply in (pair.chosen, pair.rejected)]


async def train_async(config: TrainConfig, task: Task) -> list[dict]:
    algo = config.algo
    with Run(config) as run:
        pairs = preference_pairs(task, algo.train_examples, seed=config.seed)
        held_out_pairs = pair_datums(run.tokenizer, preference_pairs(task, config.eval_prompts, seed=config.seed,
                                                                      split="eval"))
        held_out = checked_problems(task, config.eval_prompts, seed=config.seed, split="eval")
        adam = AdamParams(learning_rate=algo.learning_rate, grad_clip_norm=algo.grad_clip_norm)

        async def evaluate(step: int) -> dict:
            output = await run.learner.forward.remote(run.model_id, ForwardBackwardInput(
                data=held_out_pairs, loss_fn="dpo", loss_fn_config=algo.loss_fn_config or None))
            return {"eval/dpo_accuracy": output.metrics["dpo_accuracy:mean"],
                    "eval/accuracy": await run.evaluate_weights(task, held_out, step)}

        for step in tqdm(range(run.start_step, config.steps), desc=config.recipe, unit="step", disable=None):
            record: dict = {"step": step}
            if step % config.eval_every == 0:
                record.update(await evaluate(step))
            started = time.perf_counter()
            batch_P = [pairs[i] for i in batch_indices(step, algo.prompts_per_step, len(pairs), config.seed)]
            data = pair_datums(run.tokenizer, batch_P)
            output = await run.learner.forward_backward.remote(run.model_id, ForwardBackwardInput(
                data=data, loss_fn="dpo", loss_fn_config=algo.loss_fn_config or None))
            record.update((await run.learner.optim_step.remote(run.model_id, adam)).metrics)
            seconds = time.perf_counter() - started
            record.update({"loss": output.metrics["loss:sum"] / len(batch_P),
                           **{name: output.metrics[key] for key, name in DPO_METRICS.items()},
                           "tokens/trained": sum(d.model_input.length for d in data),
                           "time/training_s": seconds, "throughput/pairs_per_s": len(batch_P) / seconds,
                           "step_time_s": seconds})
            run.record(record)
            run.checkpoint(step + 1)
        run.record({"step": config.steps, **await evaluate(config.steps)})
        return run.log.history


def train(config: TrainConfig, task: Task) -> list[dict]:
    """Runs the DPO loop; returns one metrics record per step (and one for the final evaluation)."""
    return asyncio.run(train_async(config, task))
