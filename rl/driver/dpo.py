"""The DPO loop: preference pairs -> forward_backward(loss_fn="dpo") -> optim_step; the reference is the base model.

Pairs come from a verifiable task: a correct and an incorrect final answer to the same prompt
(`rl.tasks.preference_pairs`). A pair is two consecutive datums, chosen then rejected, whose weights select the
reply's tokens. The learner computes the reference logprobs itself with the adapter off, so the reference is
the base model. Every `eval_every` steps: DPO accuracy on held-out pairs, and greedy task accuracy.
"""

from __future__ import annotations

import asyncio

from rl.chat import conversation_datum
from rl.config import TrainConfig
from rl.driver.run import Run, batch_indices
from rl.tasks import PreferencePair, Task, checked_problems, preference_pairs
from rl.types import Datum, ForwardBackwardInput

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

        def dpo_batch(data: list[Datum]) -> ForwardBackwardInput:
            return ForwardBackwardInput(data=data, loss_fn="dpo", loss_fn_config=algo.loss_fn_config or None)

        def make_batch(step: int) -> ForwardBackwardInput:
            indices = batch_indices(step, algo.prompts_per_step, len(pairs), config.seed)
            return dpo_batch(pair_datums(run.tokenizer, [pairs[i] for i in indices]))

        def step_metrics(batch: ForwardBackwardInput, output, seconds: float) -> dict:
            pairs_in_batch = len(batch.data) // 2
            return {"loss": output.metrics["loss:sum"] / pairs_in_batch,
                    "throughput/pairs_per_s": pairs_in_batch / seconds,
                    **{name: output.metrics[key] for key, name in DPO_METRICS.items()}}

        async def evaluate(step: int) -> dict:
            output = await run.learner.forward.remote(run.model_id, dpo_batch(held_out_pairs))
            return {"eval/dpo_accuracy": output.metrics["dpo_accuracy:mean"],
                    "eval/accuracy": await run.evaluate_weights(task, held_out, step)}

        return await run.train_on_batches(make_batch, step_metrics, evaluate)


def train(config: TrainConfig, task: Task) -> list[dict]:
    """Runs the DPO loop; returns one metrics record per step (and one for the final evaluation)."""
    return asyncio.run(train_async(config, task))
