"""The SFT loop: conversations -> forward_backward(loss_fn="cross_entropy") on the assistant's tokens -> optim_step.

Conversations are rendered with the tokenizer's chat template; only the assistant's tokens are trained
(`conversation_datum`), and the weights are scaled so the loss is the mean negative log-likelihood per trained
token of the batch. Every `eval_every` steps: that loss on held-out conversations, and greedy task accuracy.
"""

from __future__ import annotations

import asyncio

from rl.chat import conversation_datum
from rl.config import TrainConfig
from rl.driver.run import Run, batch_indices
from rl.tasks import Task, checked_problems, sft_conversations
from rl.types import Datum, ForwardBackwardInput


def mean_loss_batch(data: list[Datum]) -> ForwardBackwardInput:
    """A cross-entropy batch whose summed loss is the mean over its trained tokens."""
    trained = sum(sum(datum.loss_fn_inputs["weights"].data) for datum in data)
    return ForwardBackwardInput(loss_fn="cross_entropy", data=[
        Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "weights": [weight / trained for weight in datum.loss_fn_inputs["weights"].data]})
        for datum in data])


async def train_async(config: TrainConfig, task: Task) -> list[dict]:
    algo = config.algo
    with Run(config) as run:
        conversations = sft_conversations(task, algo.train_examples, seed=config.seed)
        held_out_batch = mean_loss_batch([conversation_datum(run.tokenizer, conversation) for conversation in
                                          sft_conversations(task, config.eval_prompts, seed=config.seed,
                                                            split="eval")])
        held_out = checked_problems(task, config.eval_prompts, seed=config.seed, split="eval")

        def make_batch(step: int) -> ForwardBackwardInput:
            indices = batch_indices(step, algo.prompts_per_step, len(conversations), config.seed)
            return mean_loss_batch([conversation_datum(run.tokenizer, conversations[i]) for i in indices])

        async def evaluate(step: int) -> dict:
            output = await run.learner.forward.remote(run.model_id, held_out_batch)
            return {"eval/loss": output.metrics["loss:sum"],
                    "eval/accuracy": await run.evaluate_weights(task, held_out, step)}

        def step_metrics(batch: ForwardBackwardInput, output, seconds: float) -> dict:
            return {"loss": output.metrics["loss:sum"]}

        return await run.train_on_batches(make_batch, step_metrics, evaluate)


def train(config: TrainConfig, task: Task) -> list[dict]:
    """Runs the SFT loop; returns one metrics record per step (and one for the final evaluation)."""
    return asyncio.run(train_async(config, task))
