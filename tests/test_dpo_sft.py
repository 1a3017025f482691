"""The DPO and SFT loops on the tiny model: they learn what they train on, and leave what a run leaves."""

import math

import pytest
from test_rl_loop import metrics, tiny_config

from rl.config import AlgoConfig
from rl.driver import dpo, sft
from rl.tasks import Addition


def test_dpo_learns_its_training_pairs(ray_local, tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, steps=8, eval_every=8, eval_prompts=8)
    config.algo = AlgoConfig(loop="dpo", loss_fn="dpo", loss_fn_config={"beta": 0.1}, learning_rate=1e-2,
                             prompts_per_step=8, train_examples=8, max_tokens=8)
    history = dpo.train(config, Addition())
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


def test_sft_halves_its_loss(ray_local, tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, steps=8, eval_every=8, eval_prompts=4)
    config.algo = AlgoConfig(loop="sft", loss_fn="cross_entropy", learning_rate=1e-2, lr_schedule="cosine",
                             prompts_per_step=8, train_examples=8, max_tokens=8)
    history = sft.train(config, Addition())
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
