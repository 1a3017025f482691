"""The SFT loop: conversations -> forward_backward(loss_fn="cross_entropy") on the assistant's tokens -> optim_step.

Conversations are rendered with the tokenizer's chat template; only the assistant's tokens are trained
(`conversation_datum`), and the weights are scaled so the loss is the mean negative log-likelihood per trained
token of the batch. Every `eval_every` steps: that loss on held-out conversations, and greedy task accuracy.
"""

from __future__ import annotations

import asyncio
import time

from tqdm import tqdm

from rl.config import TrainConfig
from rl.driver.run import Run, batch_indices, conversation_datum
from rl.tasks import Task, checked_problems, sft_conversations
from rl.types import AdamParams, Datum, ForwardBackwardInput


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
        adam = AdamParams(learning_rate=algo.learning_rate, grad_clip_norm=algo.grad_clip_norm)

        async def evaluate(step: int) -> dict:
            output = await run.learner.forward.remote(run.model_id, held_out_batch)
            return {"eval/loss": output.metrics["loss:sum"],
                    "eval/accuracy": await run.evaluate_weights(task, held_out, step)}

        for step in tqdm(range(run.start_step, config.steps), desc=config.recipe, unit="step", disable=None):
            record: dict = {"step": step}
            if step % config.eval_every == 0:
                record.update(await evaluate(step))
            started = time.perf_counter()
            batch = mean_loss_batch([conversation_datum(run.tokenizer, conversations[i]) for i in
                                     batch_indices(step, algo.prompts_per_step, len(conversations), config.seed)])
            output = await run.learner.forward_backward.remote(run.model_id, batch)
            record.update((await run.learner.optim_step.remote(run.model_id, adam)).metrics)
            seconds = time.perf_counter() - started
            tokens = sum(datum.model_input.length for datum in batch.data)
            record.update({"loss": output.metrics["loss:sum"], "tokens/trained": tokens, "time/training_s": seconds,
                           "throughput/trained_tokens_per_s": tokens / seconds, "step_time_s": seconds})
            run.record(record)
            run.checkpoint(step + 1)
        run.record({"step": config.steps, **await evaluate(config.steps)})
        return run.log.history


def train(config: TrainConfig, task: Task) -> list[dict]:
    """Runs the SFT loop; returns one metrics record per step (and one for the final evaluation)."""
    return asyncio.run(train_async(config, task))
