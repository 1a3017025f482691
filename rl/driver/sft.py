"""The SFT loop: conversations -> forward_backward(loss_fn="cross_entropy") on the assistant's tokens -> optim_step.

Conversations (a task's worked solutions, or your own from `data.train`: rl/datasets.py) are rendered with the
tokenizer's chat template; only the assistant's tokens are trained (`sft_datum`: every assistant message's, or the
last one's), and the weights are scaled so the loss is the mean negative log-likelihood per trained token of the
batch. Every `eval_every` steps: that loss on held-out conversations, and a task's greedy accuracy. With
data.pairs_as_judge the conversations are a pairwise judge's, two from each preference pair (rl/judge.py), and the
held-out pairs' accuracy replaces the task's.
"""

from __future__ import annotations

import asyncio

from rl.chat import conversation_datum
from rl.config import TrainConfig
from rl.datasets import read_conversations, read_preference_pairs
from rl.driver.run import Run, Shared, adam_params, batch_indices, check_context, steps, supervised_examples
from rl.judge import pair_accuracy, pair_conversations
from rl.tasks import Task, preference_pairs, sft_conversations
from rl.types import Datum, ForwardBackwardInput


def sft_datum(config: TrainConfig, tokenizer, conversation: list[dict[str, str]]) -> Datum:
    """A conversation as a cross-entropy datum on its assistant messages: all of them, or with data.train_on=last
    the last one alone."""
    trained_from = 0 if config.data.train_on == "all" else max(
        index for index, message in enumerate(conversation) if message["role"] == "assistant")
    return conversation_datum(tokenizer, conversation, trained_from=trained_from)


def mean_loss_batch(data: list[Datum]) -> ForwardBackwardInput:
    """A cross-entropy batch whose summed loss is the mean over its trained tokens."""
    trained = sum(sum(datum.loss_fn_inputs["weights"].data) for datum in data)
    return ForwardBackwardInput(loss_fn="cross_entropy", data=[
        Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "weights": [weight / trained for weight in datum.loss_fn_inputs["weights"].data]})
        for datum in data])


async def train_async(config: TrainConfig, task: Task, shared: Shared | None = None) -> list[dict]:
    algo = config.algo
    # The data first: a file or a task that cannot give conversations fails before any actor starts.
    judge_pairs = config.data.pairs_as_judge
    conversations, eval_conversations, held_out = supervised_examples(
        config, task, from_task=preference_pairs if judge_pairs else sft_conversations,
        read=read_preference_pairs if judge_pairs else read_conversations)
    held_out_pairs = eval_conversations if judge_pairs else []
    if judge_pairs:  # two conversations a pair, and the pairs' accuracy instead of the task's
        conversations, eval_conversations, held_out = (
            [c for pair in conversations for c in pair_conversations(pair, config.judge)],
            [c for pair in held_out_pairs for c in pair_conversations(pair, config.judge)], [])
    check_context(config, conversations + eval_conversations, lambda tokenizer, conversation: [
        sft_datum(config, tokenizer, conversation)])
    with Run(config, shared) as run:
        held_out_batch = mean_loss_batch([sft_datum(config, run.tokenizer, conversation)
                                          for conversation in eval_conversations])

        async def evaluate(step: int) -> dict:
            metrics, accuracy = await run.held_out(held_out_batch, task.name, held_out, step)
            if held_out_pairs:
                accuracy["eval/pair_accuracy"] = await pair_accuracy(held_out_pairs, config.judge, run.tokenizer,
                                                                     run.own_logprobs)
            return {"eval/loss": metrics["loss:sum"], **accuracy}

        for step in steps(run):
            record = await run.begin_step(step, evaluate)  # an evaluation first, when one is due

            # The step's conversations, in this epoch's order, then one update on them.
            indices = batch_indices(step, algo.prompts_per_step, len(conversations), config.seed)
            batch = mean_loss_batch([sft_datum(config, run.tokenizer, conversations[i]) for i in indices])
            output = await run.train_step(batch, adam_params(config, step), record)

            seconds = record["time/forward_backward_s"] + record["time/optim_step_s"]
            tokens = batch.tokens
            record.update({"loss": output.metrics["loss:sum"], "tokens/trained": tokens, "time/training_s": seconds,
                           "throughput/trained_tokens_per_s": tokens / seconds})
            await run.end_step(record)  # logged, and a checkpoint when one is due
        await run.final_evaluation(evaluate)
        return run.log.history


def train(config: TrainConfig, task: Task, shared: Shared | None = None) -> list[dict]:
    """Runs the SFT loop; returns one metrics record per step (and one for the final evaluation).
    `shared`: a sweep's learner and sampler pool (`rl.sweep`)."""
    return asyncio.run(train_async(config, task, shared))
