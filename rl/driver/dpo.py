"""The DPO loop: preference pairs -> forward_backward(loss_fn="dpo", "ipo" or "simpo") -> optim_step, against a
frozen reference (SimPO's needs none).

Pairs come from a verifiable task, a correct and an incorrect final answer to the same prompt
(`rl.tasks.preference_pairs`), or from your own file (`data.train`: rl/datasets.py). A pair is two consecutive
datums, chosen then rejected, whose weights select the reply's tokens. The reference is the weights the run starts
from (algo.reference=start): a run that starts from an adapter (model.adapter: SFT, then DPO) gives each datum its
reference logprobs from that adapter, held frozen in the learner; otherwise the learner computes them itself with
the adapter off, the base model. Every `eval_every` steps: DPO accuracy on held-out pairs, and a task's greedy
accuracy.
"""

from __future__ import annotations

import asyncio

from rl.chat import conversation_datum
from rl.config import AlgoConfig, TrainConfig
from rl.datasets import PreferencePair, read_preference_pairs
from rl.driver.run import Run, Shared, adam_params, batch_indices, check_context, steps, supervised_examples
from rl.losses import PAIR_METRICS
from rl.tasks import Task, preference_pairs
from rl.types import Datum, ForwardBackwardInput


def dpo_batch(data: list[Datum], algo: AlgoConfig) -> ForwardBackwardInput:
    return ForwardBackwardInput(data=data, loss_fn=algo.loss_fn, loss_fn_config=algo.loss_fn_config or None)


def pair_datums(tokenizer, pairs: list[PreferencePair]) -> list[Datum]:
    """Chosen then rejected, for each pair: the layout the dpo loss reads. Only the reply's tokens are weighted,
    not an assistant turn inside the prompt."""
    return [conversation_datum(tokenizer, pair.prompt + reply, trained_from=len(pair.prompt))
            for pair in pairs for reply in (pair.chosen, pair.rejected)]


async def train_async(config: TrainConfig, task: Task, shared: Shared | None = None) -> list[dict]:
    algo = config.algo
    # The data first: a file or a task that cannot give pairs fails before any actor starts.
    pairs, eval_pairs, held_out = supervised_examples(config, task, from_task=preference_pairs,
                                                      read=read_preference_pairs)
    check_context(config, pairs + eval_pairs, lambda tokenizer, pair: pair_datums(tokenizer, [pair]))
    with Run(config, shared) as run:
        held_out_pairs = await run.with_reference(dpo_batch(pair_datums(run.tokenizer, eval_pairs), algo))

        async def evaluate(step: int) -> dict:
            metrics, accuracy = await run.held_out(held_out_pairs, task.name, held_out, step)
            return {"eval/dpo_accuracy:mean": metrics["dpo_accuracy:mean"], **accuracy}

        reference_of: dict = {}  # a datum's reference logprobs by 2 x pair + (0 chosen, 1 rejected)
        for step in steps(run):
            record = await run.begin_step(step, evaluate)  # an evaluation first, when one is due

            # The step's pairs, in this epoch's order, then one update on them.
            indices = batch_indices(step, algo.prompts_per_step, len(pairs), config.seed)
            batch = await run.with_reference(dpo_batch(pair_datums(run.tokenizer, [pairs[i] for i in indices]), algo),
                                         keys=[2 * i + side for i in indices for side in (0, 1)], known=reference_of,
                                         record=record)
            output = await run.train_step(batch, adam_params(config, step), record)

            seconds = sum(record.get(f"time/{phase}_s", 0.0)
                          for phase in ("reference", "forward_backward", "optim_step"))
            tokens = batch.tokens
            record.update({"loss": output.metrics["loss:sum"] / len(indices),
                           **{key: output.metrics[key] for key in PAIR_METRICS},
                           "tokens/trained": tokens, "time/training_s": seconds,
                           "throughput/trained_tokens_per_s": tokens / seconds,
                           "throughput/pairs_per_s": len(indices) / seconds})
            await run.end_step(record)  # logged, and a checkpoint when one is due
        await run.final_evaluation(evaluate)
        return run.log.history


def train(config: TrainConfig, task: Task, shared: Shared | None = None) -> list[dict]:
    """Runs the DPO loop; returns one metrics record per step (and one for the final evaluation).
    `shared`: a sweep's learner and sampler pool (`rl.sweep`)."""
    return asyncio.run(train_async(config, task, shared))
