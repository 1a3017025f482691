"""The DPO and SFT loops on the tiny model: they learn what they train on, and leave what a run leaves."""

import asyncio
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
from test_rl_loop import metrics, tiny_config

from rl.config import AlgoConfig
from rl.driver import dpo, sft
from rl.driver.run import Run, reference_adapter
from rl.tasks import Addition
from rl.types import Datum, ModelInput, TensorData


def test_dpo_learns_its_training_pairs(shared_actors, tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, steps=8, eval_every=8, eval_prompts=8)
    config.algo = AlgoConfig(loop="dpo", loss_fn="dpo", loss_fn_config={"beta": 0.1}, learning_rate=1e-2,
                             prompts_per_step=8, train_examples=8, max_tokens=8)
    history = dpo.train(config, Addition(), shared_actors(config))
    steps = [record for record in history if "loss" in record]
    assert len(steps) == 8 and metrics(tmp_path) == history
    assert {"dpo_accuracy:mean", "dpo_margin:mean", "dpo_chosen_reward:mean", "dpo_rejected_reward:mean",
            "throughput/pairs_per_s", "tokens/trained"} <= steps[0].keys()
    assert abs(steps[0]["dpo_margin:mean"]) < 1e-4, "at step 0 the policy is the reference: every margin is zero"
    assert steps[-1]["dpo_accuracy:mean"] > 0.9 and steps[-1]["loss"] < steps[0]["loss"] / 2, steps[-1]
    # At step 0 the policy is the reference (the adapter adds exact zeros): every held-out margin is 0, and
    # accuracy counts margins > 0.
    assert history[0]["eval/dpo_accuracy:mean"] == 0.0
    for record in (history[0], history[-1]):  # greedy accuracy over 8 held-out prompts
        assert record["eval/accuracy"] * 8 == pytest.approx(round(record["eval/accuracy"] * 8)), record


def test_simpo_learns_its_training_pairs_with_no_reference(shared_actors, tiny_model_dir, tmp_path):
    # SimPO ranks by the policy's own mean logprob per reply token: at step 0 the margins are the base model's (not
    # 0, as DPO's), and the run makes no reference, neither a frozen adapter nor the base model's logprobs.
    config = tiny_config(tiny_model_dir, tmp_path, steps=8, eval_every=8, eval_prompts=8)
    config.algo = AlgoConfig(loop="dpo", loss_fn="simpo", learning_rate=1e-2, prompts_per_step=8, train_examples=8,
                             max_tokens=8)
    history = dpo.train(config, Addition(), shared_actors(config))
    steps = [record for record in history if "loss" in record]
    assert abs(steps[0]["dpo_margin:mean"]) > 1e-3 and steps[0]["loss"] > math.log(2), steps[0]
    assert steps[-1]["dpo_accuracy:mean"] > 0.9 and steps[-1]["loss"] < steps[0]["loss"] / 2, steps[-1]
    assert {"eval/dpo_accuracy:mean", "eval/accuracy"} <= history[-1].keys()
    with_adapter = replace(config, model=replace(config.model, adapter=str(tmp_path)))
    assert reference_adapter(with_adapter) is None
    assert reference_adapter(replace(with_adapter, algo=replace(config.algo, loss_fn="ipo"))) == (
        "model.adapter", str(tmp_path))


def test_sft_halves_its_loss(shared_actors, tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, steps=8, eval_every=8, eval_prompts=4)
    config.algo = AlgoConfig(loop="sft", loss_fn="cross_entropy", learning_rate=1e-2, lr_schedule="cosine",
                             prompts_per_step=8, train_examples=8, max_tokens=8)
    history = sft.train(config, Addition(), shared_actors(config))
    losses = [record["loss"] for record in history if "loss" in record]
    assert len(losses) == 8 and losses[-1] < losses[0] / 2, losses
    # The optimizer applied the schedule's rate at each step: 1e-2 * (1 + cos(pi * step / 8)) / 2.
    assert [record["learning_rate:mean"] for record in history if "loss" in record] == pytest.approx(
        [1e-2 * (1 + math.cos(math.pi * step / 8)) / 2 for step in range(8)], rel=1e-6)
    assert 6.0 < losses[0] < 9.0, "a random model starts near ln(2048) = 7.6 nats per token"
    assert 6.0 < history[0]["eval/loss"] < 9.0, "held-out, the random model is as lost"
    assert history[0]["eval/loss"] > history[-1]["eval/loss"], "held-out loss falls too"
    for record in (history[0], history[-1]):  # greedy accuracy over 4 held-out prompts
        assert record["eval/accuracy"] * 4 == pytest.approx(round(record["eval/accuracy"] * 4)), record


def test_a_frozen_reference_scores_each_training_datum_once():
    # The reference (model.adapter's starting weights) never changes, so a pair seen again in a later epoch reuses
    # the logprobs it got the first time. A stand-in run counts what the learner is asked to score.
    asked = []

    async def reference_logprobs(sequences):
        asked.append(sequences)
        return [[-0.1 * (index + 1) - token / 3 for index, token in enumerate(sequence[1:])] for sequence in sequences]

    run = SimpleNamespace(reference=("learner", "start"), reference_logprobs=reference_logprobs)

    def datum(first: int) -> Datum:
        return Datum(model_input=ModelInput.from_ints([first, first + 1]), loss_fn_inputs={
            "target_tokens": TensorData(data=[first + 1, first + 2], dtype="int64", shape=[2]),
            "weights": TensorData(data=[0.0, 1.0], dtype="float32", shape=[2])})

    def batch(firsts: list[int]):
        return dpo.dpo_batch([datum(first) for first in firsts], AlgoConfig(loop="dpo", loss_fn="dpo"))

    known = {}
    first = asyncio.run(Run.with_reference(run, batch([1, 2, 3, 4]), keys=[10, 11, 12, 13], known=known))
    again = asyncio.run(Run.with_reference(run, batch([3, 4, 5, 6]), keys=[12, 13, 14, 15], known=known))
    assert [len(sequences) for sequences in asked] == [4, 2], "only the two datums not seen before are scored"
    assert asked[1] == [[5, 6, 7], [6, 7, 8]], "a datum's sequence: its input, then its last target"
    references = [d.loss_fn_inputs["ref_logprobs"].data for d in first.data + again.data]
    assert references[2:4] == references[4:6], "the same logprobs, from the store"
    assert references[0] == pytest.approx([-0.1 - 2 / 3, -0.2 - 1.0], rel=1e-6)  # float32, as a datum holds them
    unfrozen = SimpleNamespace(reference=None)
    assert asyncio.run(Run.with_reference(unfrozen, batch([1]))).data[0].loss_fn_inputs.keys() == {
        "target_tokens", "weights"}, "the base model as the reference: the learner computes it in the same pass"
