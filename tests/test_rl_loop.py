"""The RL loop end to end on the tiny model: real learner actor, real vLLM pool, verified publishing."""

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import ray
import torch
from transformers import AutoTokenizer

import rl.driver.rl as rl_loop
from rl.config import AlgoConfig, DataConfig, LoggerConfig, ModelConfig, SamplerConfig, TrainConfig, check
from rl.driver.episodes import Episode, Turn, episode_sequences, group_seed, held_out_metrics, transcript
from rl.driver.rl import (
    PROMPTS_PER_STEP_SEED,
    STEPS_PER_SEED,
    kl_penalty,
    minibatch_datums,
    sampler_vs_learner,
    train,
    turn_advantages,
)
from rl.driver.run import Run
from rl.driver.state import read_state
from rl.metrics import RunLog, summary_line
from rl.tasks import Digits, Problem
from rl.types import SampledSequence


def tiny_config(model_dir, output_dir, **fields) -> TrainConfig:
    """Digits on the tiny model, sized to learn in about ten steps of a second each."""
    algo = AlgoConfig(prompts_per_step=8, group_size=8, max_tokens=8, learning_rate=1e-2)
    config = TrainConfig(steps=2, eval_every=5, eval_prompts=8, output_dir=str(output_dir),
                         model=ModelConfig(name=str(model_dir), dtype="float32", lora_rank=8, max_model_len=256),
                         algo=algo, logger=LoggerConfig(wandb_mode="disabled"))
    return replace(config, **{key: value for key, value in fields.items() if key != "algo"},
                   algo=replace(algo, **fields.get("algo", {})))


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def samples(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def sampled(tokens: list[int], logprobs: list[float]) -> SampledSequence:
    return SampledSequence(tokens=tokens, logprobs=logprobs, stop_reason="stop")


def test_a_one_turn_episode_is_its_prompt_and_sample_and_group_advantages():
    episode = Episode([Turn([1, 2], sampled([7, 8, 9], [-0.1, -0.2, -0.3]), 1.0, {})], "done")
    [sequence] = episode_sequences(episode, [0.5])
    datum = sequence.datum(advantage_scale=1.0)
    assert datum.model_input.to_ints() == [1, 2, 7, 8]
    assert datum.loss_fn_inputs["target_tokens"].data == [2, 7, 8, 9]
    assert datum.loss_fn_inputs["logprobs"].data == pytest.approx([0.0, -0.1, -0.2, -0.3])
    assert datum.loss_fn_inputs["advantages"].data == [0.0, 0.5, 0.5, 0.5], "the prompt carries no advantage"
    assert datum.loss_fn_inputs["weights"].data == [0.0, 1.0, 1.0, 1.0], "nor any loss"
    def one_turn(*rewards: float) -> list[Episode]:
        return [Episode([Turn([1], sampled([2], [-0.1]), reward, {})], "done") for reward in rewards]

    assert turn_advantages(one_turn(1.0, 0.0, 0.0, 1.0), reward_to_go=False, normalize=False) == [
        [0.5], [-0.5], [-0.5], [0.5]]
    assert turn_advantages(one_turn(1.0, 0.0, 0.0, 1.0), reward_to_go=False, normalize=True) == [
        [pytest.approx(value, rel=1e-5)] for value in (1.0, -1.0, -1.0, 1.0)]
    assert turn_advantages(one_turn(0.2, 0.2), reward_to_go=False, normalize=True) == [[0.0], [0.0]], (
        "a group that scored alike teaches nothing")
    assert turn_advantages(one_turn(0.1, 0.1, 0.1), reward_to_go=False, normalize=True) == [[0.0]] * 3, (
        "exactly nothing, though (0.1 + 0.1 + 0.1) / 3 is not 0.1 in floating point")
    # Two sampled tokens: sampler - learner = 0.5 and 0.0.
    assert sampler_vs_learner([[-1.0, -2.0]], [[-1.5, -2.0]]) == {"kl/sampler_vs_learner": 0.25,
                                                                  "kl/sampler_vs_learner_sq": 0.0625}


def test_a_steps_groups_are_counted_by_what_they_teach_and_its_entropy_estimated():
    def group(*scores: float, logprobs=(-0.5,)) -> list[Episode]:
        return [Episode([Turn([1], sampled([2] * len(logprobs), list(logprobs)), score, {"accuracy": score})], "done")
                for score in scores]

    rollout = rl_loop.Rollout([group(1.0, 1.0), group(0.0, 0.0, logprobs=(-1.0, -2.0)), group(1.0, 0.0),
                               group(0.0, 0.0)], weights_step=0, seconds=1.0)
    config = TrainConfig()
    assert rl_loop.group_metrics(config, rollout) == {
        "groups/uniform": 0.75, "groups/all_correct": 0.25, "groups/all_wrong": 0.5,
        "sampler/entropy": pytest.approx((0.5 * 6 + 1.0 * 2 + 2.0 * 2) / 10)}, "-mean logprob over 10 tokens"
    # Without an accuracy from the environment, only what the rewards say; rewards to go that differ give signal.
    unscored = rl_loop.Rollout([[Episode([Turn([1], sampled([2], [-0.1]), 0.3, {})], "done")] * 2], 0, 1.0)
    assert rl_loop.group_metrics(config, unscored).keys() == {"groups/uniform", "sampler/entropy"}
    two_turns = [Episode([Turn([1], sampled([2], [-0.1]), first, {}), Turn([1, 2, 3], sampled([4], [-0.1]),
                                                                           1.0 - first, {})], "done")
                 for first in (0.0, 1.0)]
    to_go = replace(config, env=replace(config.env, advantage="reward_to_go"))
    assert rl_loop.group_metrics(config, rl_loop.Rollout([two_turns], 0, 1.0))["groups/uniform"] == 1.0
    assert rl_loop.group_metrics(to_go, rl_loop.Rollout([two_turns], 0, 1.0))["groups/uniform"] == 0.0


def test_the_samples_of_a_steps_groups_share_no_seed():
    """A group's first turns are one request of n samples, which vLLM seeds seed, seed + 1, ...: with the groups'
    own seeds (step seed * PROMPTS_PER_STEP_SEED + index) group i's sample j + 1 had group i + 1's sample j's seed,
    and on one prompt (guess_number's) drew the same sample."""
    for step in (0, 1, 29):
        step_seed = 3 * STEPS_PER_SEED + step
        seeds = [group_seed(step_seed * PROMPTS_PER_STEP_SEED + index) + sample
                 for index in range(16) for sample in range(8)]
        assert len(set(seeds)) == len(seeds) == 128
    assert group_seed(None) is None, "unseeded stays unseeded"


def test_multi_turn_episodes_become_one_growing_sequence_or_one_per_re_rendered_turn():
    first, second = sampled([7, 8], [-0.1, -0.2]), sampled([9], [-0.3])
    grown = Episode([Turn([1, 2], first, 0.0, {}), Turn([1, 2, 7, 8, 5, 6], second, 1.0, {})], "done")
    [sequence] = episode_sequences(grown, [0.25, -0.5])
    assert sequence.tokens == [1, 2, 7, 8, 5, 6, 9]
    assert sequence.actions == [False, False, True, True, False, False, True], "observation tokens: weight 0"
    assert sequence.logprobs == [0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.3], "the sampler's, on the actions"
    assert sequence.advantages == [0.0, 0.0, 0.25, 0.25, 0.0, 0.0, -0.5]
    rerendered = Episode([Turn([1, 2], first, 0.0, {}), Turn([1, 3, 5, 6], second, 1.0, {})], "done", 1)
    assert [s.tokens for s in episode_sequences(rerendered, [0.25, -0.5])] == [[1, 2, 7, 8], [1, 3, 5, 6, 9]]
    # As text (samples.jsonl): what each turn added to the conversation, or the whole prompt where it was re-rendered.
    def decode(tokens: list[int]) -> str:
        return " ".join(map(str, tokens))

    assert [(turn["observation"], turn["action"], turn["reward"]) for turn in transcript(grown, decode)["turns"]] == [
        ("1 2", "7 8", 0.0), ("5 6", "9", 1.0)]
    assert [turn["observation"] for turn in transcript(rerendered, decode)["turns"]] == ["1 2", "1 3 5 6"]
    assert transcript(grown, decode)["reward"] == 1.0 and transcript(grown, decode)["stop"] == "done"
    # Rewards to go: 0 then 1 on turn 0 (total 1), 1 on turn 1; the other episode of the group scored 0.
    lost = Episode([Turn([1, 2], first, 0.0, {})], "max_turns", group_reward=0.0)
    assert turn_advantages([grown, lost], reward_to_go=False, normalize=False) == [[0.5, 0.5], [-0.5]]
    assert turn_advantages([grown, lost], reward_to_go=True, normalize=False) == [[0.5, 0.5], [-0.5]]
    grown.turns[0].reward = 0.5  # 0.5 then 1: to go 1.5 and 1.0; group mean of totals (1.5 + 0) / 2
    assert turn_advantages([grown, lost], reward_to_go=True, normalize=False) == [[0.75, 0.25], [-0.75]]
    # Normalized by the root mean square of those three values, sqrt((0.75^2 + 0.25^2 + 0.75^2) / 3).
    rms = ((0.75 ** 2 + 0.25 ** 2 + 0.75 ** 2) / 3) ** 0.5
    assert turn_advantages([grown, lost], reward_to_go=True, normalize=True) == [
        [pytest.approx(0.75 / rms, rel=1e-5), pytest.approx(0.25 / rms, rel=1e-5)],
        [pytest.approx(-0.75 / rms, rel=1e-5)]]
    # Totals that agree (1.5 each) with rewards to go that differ (1.5, 1.0; 1.5): -0.5 / sqrt(0.25 / 3), not a
    # division by a zero deviation.
    alike = Episode([Turn([1, 2], first, 1.5, {})], "done")
    assert turn_advantages([grown, alike], reward_to_go=True, normalize=True) == [
        [0.0, pytest.approx(-3 ** 0.5, rel=1e-5)], [0.0]]
    # The KL penalty moves only action tokens' advantages: base logprobs per target (tokens[1:]).
    [sequence] = episode_sequences(Episode([Turn([1, 2], first, 0.0, {})], "done"), [1.0])
    assert kl_penalty([sequence], [[-9.0, -0.3, -0.1]], coef=0.5) == pytest.approx((0.2 - 0.1) / 2)
    assert sequence.advantages == pytest.approx([0.0, 0.0, 1.0 - 0.5 * 0.2, 1.0 + 0.5 * 0.1])
    # Discounted (kl_discount 0.5): the first action token also pays half the KL of the one after it.
    [sequence] = episode_sequences(Episode([Turn([1, 2], first, 0.0, {})], "done"), [1.0])
    assert kl_penalty([sequence], [[-9.0, -0.3, -0.1]], coef=0.5, discount=0.5) == pytest.approx((0.2 - 0.1) / 2)
    assert sequence.advantages == pytest.approx([0.0, 0.0, 1.0 - 0.5 * (0.2 + 0.5 * -0.1), 1.0 + 0.5 * 0.1])
    # Over two turns, the observation between them is a step of KL 0: the first turn's token pays 0.5^2 of the second's.
    [sequence] = episode_sequences(grown, [0.0, 0.0])
    assert sequence.actions == [False, False, True, True, False, False, True]
    gaps = [sequence.logprobs[i] - (-1.0) for i in (2, 3, 6)]
    kl_penalty([sequence], [[-1.0] * 6], coef=1.0, discount=0.5)
    assert [sequence.advantages[i] for i in (2, 3, 6)] == pytest.approx([
        -(gaps[0] + 0.5 * gaps[1] + 0.5 ** 4 * gaps[2]), -(gaps[1] + 0.5 ** 3 * gaps[2]), -gaps[2]])


def test_a_steps_sequences_split_into_minibatches_in_order_each_on_the_whole_steps_scale():
    trained = [episode_sequences(Episode([Turn([1], sampled([2, 3], [-0.1, -0.2]), 0.0, {})], "done"), [value])[0]
               for value in (1.0, -1.0, 2.0, -2.0, 0.5)]
    [whole] = minibatch_datums(trained, 1, sampled_tokens=20)
    assert [d.loss_fn_inputs["advantages"].data for d in whole] == [  # float32, as the learner reads them
        pytest.approx([a / 20, a / 20], rel=1e-6) for a in (1, -1, 2, -2, 0.5)]
    halves = minibatch_datums(trained, 2, sampled_tokens=20)
    assert [len(minibatch) for minibatch in halves] == [2, 3], "sizes within one, in order"
    assert [d.loss_fn_inputs["advantages"].data[1] for minibatch in halves for d in minibatch] == pytest.approx(
        [2 * a / 20 for a in (1, -1, 2, -2, 0.5)], rel=1e-6), "each minibatch's loss on the scale of the whole step's"
    assert [len(minibatch) for minibatch in minibatch_datums(trained[:2], 4, sampled_tokens=20)] == [1, 1]
    assert minibatch_datums([], 4, sampled_tokens=0) == []


def test_num_substeps_takes_an_optimizer_step_per_minibatch(shared_actors, tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, eval_every=0, algo={"num_substeps": 3})
    history = train(config, Digits(), shared_actors(config))
    assert [record["step:max"] for record in history] == [3.0, 6.0], "three optimizer steps a step"
    # Weights are named and counted by the loop's steps, not the learner's optimizer steps.
    assert [record["sampler/weights_step"] for record in history] == [0, 1]
    [run_folder] = (tmp_path / "checkpoints").iterdir()
    assert [path.name for path in (run_folder / "sampler_weights").iterdir()] == ["step-000002"]
    for record in history:
        # The first minibatch is scored by the weights that sampled it, as a one-minibatch step is.
        assert record["kl/sampler_vs_learner_sq"] < 1e-6 and record["loss"] != 0.0, record
        assert 0 < record["tokens/computed"] <= record["tokens/trained"], record  # prompts shared: computed once


def test_the_adapter_adapts_the_layers_the_model_config_names(shared_actors, tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, steps=1, eval_every=0)
    config = replace(config, model=replace(config.model, train_mlp=False, train_unembed=False))
    [record] = train(config, Digits(), shared_actors(config))
    assert record["datums"] > 0 and record["kl/sampler_vs_learner_sq"] < 1e-6, "trained, and the sampler serves it"
    [run_folder] = (tmp_path / "checkpoints").iterdir()
    [weights] = (run_folder / "sampler_weights").iterdir()
    adapter = json.loads((weights / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"], adapter["target_modules"]


@pytest.fixture(scope="module")
def two_steps(ray_local, tiny_model_dir, tmp_path_factory):
    """Two steps of Digits in each publish mode: merged into the engine's weights, and a LoRA beside them."""
    folders = {mode: tmp_path_factory.mktemp(mode) for mode in ("merge", "adapter")}
    configs = {mode: tiny_config(tiny_model_dir, folder, eval_every=1, sampler=SamplerConfig(publish_mode=mode))
               for mode, folder in folders.items()}
    return {mode: (config, folders[mode], train(config, Digits())) for mode, config in configs.items()}


@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_two_steps_train_publish_and_log(two_steps, tiny_model_dir, mode):
    config, tmp_path, history = two_steps[mode]
    lines = metrics(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert lines == history and [record["step"] for record in lines] == [0, 1, 2]
    assert {"eval/accuracy", "tokens_total/sampled"} <= lines[2].keys() and "loss" not in lines[2]
    for step, record in enumerate(lines[:2]):
        assert {"loss", "step_time_s", "reward/mean", "eval/accuracy", "grad_norm:mean", "time/sampling_s",
                "time/training_s", "throughput/sampled_tokens_per_s"} <= record.keys()
        assert 0.0 <= record["reward/mean"] <= 1.0 and 0 < record["datums"] <= 64
        # A group whose samples all scored alike trains nothing; the random model samples far from one answer.
        assert record["datums"] <= 64 * (1 - record["groups/uniform"]) and 1.0 < record["sampler/entropy"] < 12.0
        # The step's prompts are known (seeded by seed and step): each of the 8 is sampled 8 times.
        prompt_lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}],
                                                            add_generation_prompt=True, return_dict=False))
                          for problem in Digits().problems(8, seed=config.seed * STEPS_PER_SEED + step)]
        assert record["tokens/prompt"] == 8 * sum(prompt_lengths)
        assert 64 <= record["tokens/sampled"] <= 64 * 8, "at least one token and at most max_tokens a sample"
        # A trained datum is its prompt and its sample less the last token: bounded by the whole rollout's.
        most = record["tokens/prompt"] + record["tokens/sampled"] - record["datums"]
        assert record["datums"] * min(prompt_lengths) <= record["tokens/trained"] <= most
        phases = [record[f"time/{phase}_s"] for phase in ("sampling", "forward_backward", "optim_step", "publish")]
        assert all(seconds > 0 for seconds in phases) and sum(phases) <= record["step_time_s"]
        # The evaluation samples beside the rollout and the training, and ends before the weights change.
        assert 0 < record["time/eval_s"] <= record["step_time_s"]
        assert record["time/training_s"] == pytest.approx(sum(phases[1:4]))
        # On-policy the step waits for the whole rollout, so the wait holds the rollout's own length.
        assert 0 < record["time/rollout_s"] <= record["time/sampling_s"]
        # Each process's resident memory: a learner holding a model, a sampler holding an engine, the driver.
        assert 0.2 < record["memory/learner_gib"] <= record["memory/learner_peak_gib"] < 20
        assert 0.2 < record["memory/sampler0_gib"] <= record["memory/sampler0_peak_gib"] < 20
        assert 0.05 < record["memory/driver_gib"] < 20
        # The learner's logprobs of the sampled tokens, from the pass that trained, are the sampler's: the sampler
        # served the weights the learner holds (serving the base model instead would put this near 0.1).
        assert record["kl/sampler_vs_learner_sq"] < 1e-6, record  # measured: ~1e-13
        assert abs(record["kl/sampler_vs_learner"]) < 1e-3, record
    minutes = [record["time_total/minutes"] for record in lines]
    assert minutes[0] == pytest.approx(lines[0]["step_time_s"] / 60) and minutes[0] < minutes[1] < minutes[2]
    assert lines[2]["time/eval_s"] > 0, "the final evaluation is timed too"
    assert lines[1]["step:max"] == 2.0, "one optimizer step per loop step"
    assert [r["sampler/weights_step"] for r in lines[:2]] == [0, 1], "each step samples the newest weights"
    assert lines[1]["tokens_total/sampled"] == lines[0]["tokens/sampled"] + lines[1]["tokens/sampled"]
    # samples.jsonl: each step's first group (logger.train_groups) with its advantages, each evaluation's episodes.
    episodes = samples(tmp_path)
    for step in (0, 1):
        group = [line for line in episodes if line["split"] == "train" and line["step"] == step]
        assert [(line["group"], line["episode"]) for line in group] == [(0, episode) for episode in range(8)]
        problem = Digits().problems(8, seed=config.seed * STEPS_PER_SEED + step)[0]
        mean = sum(line["reward"] for line in group) / 8
        for line in group:
            [turn] = line["turns"]
            assert problem.prompt in turn["observation"] and turn["observation"].endswith("assistant\n")
            assert turn["reward"] == line["reward"] and line["advantages"] == [pytest.approx(line["reward"] - mean)]
            assert turn["stop_reason"] in ("stop", "length") and turn["action"]
    held_out = Digits().problems(8, seed=config.seed, split="eval")
    for record in lines:
        evaluated = [line for line in episodes if line["split"] == "eval" and line["step"] == record["step"]]
        assert [problem.prompt in line["turns"][0]["observation"]
                for problem, line in zip(held_out, evaluated, strict=True)] == [True] * 8
        assert sum(line["metrics"]["accuracy"] for line in evaluated) / 8 == record["eval/accuracy"]
    run_folder = next((tmp_path / "checkpoints").iterdir())
    # The run keeps its latest weights for sampling (a PEFT folder) and those that scored best held out (the earliest
    # of equals); each other replaced version was deleted.
    best_accuracy, best_step = max((record["eval/accuracy"], -record["step"]) for record in lines)
    assert sorted(p.name for p in (run_folder / "sampler_weights").iterdir()) == sorted(
        {f"step-{-best_step:06d}", "step-000002"})
    best = read_state(tmp_path)["best"]
    assert (best["step"], best["eval/accuracy"]) == (-best_step, best_accuracy), best
    assert best["checkpoint"].endswith(f"/sampler_weights/step-{-best_step:06d}"), best
    assert sorted(p.name for p in (run_folder / "weights").iterdir()) == ["step-2"], "the last step is saved"
    assert read_state(tmp_path)["step"] == 2
    curves = plt.imread(tmp_path / "curves.png")
    assert curves.shape[0] > 400 and curves.shape[1] > 800, "a figure of several panels"
    assert curves[..., :3].std() > 0.05, "with something drawn on it"


LEARNING = {"steps": 12, "eval_every": 12, "eval_prompts": 16}


@pytest.fixture(scope="module")
def learned(shared_actors, tiny_model_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("learned")
    config = tiny_config(tiny_model_dir, folder, **LEARNING)
    return folder, train(config, Digits(), shared_actors(config))


def test_the_tiny_model_learns_a_task(learned):
    folder, learned = learned
    # Its best held-out accuracy came last: the step-0 version, best until then, was deleted when it was beaten.
    # (Versions are named after the learner's optimizer steps, fewer than the loop's where a step had nothing to
    # train.)
    best = read_state(folder)["best"]
    assert best["step"] == LEARNING["steps"] and best["eval/accuracy"] == learned[-1]["eval/accuracy"]
    assert [p.name for p in folder.glob("checkpoints/*/sampler_weights/*")] == [best["checkpoint"].rsplit("/")[-1]]
    rewards = [record["reward/mean"] for record in learned if "reward/mean" in record]
    assert rewards[0] < 0.3, rewards
    assert min(rewards[-2:]) > 0.8, rewards
    assert learned[0]["eval/accuracy"] < 0.3 and learned[-1]["eval/accuracy"] > 0.8, learned[-1]


def test_steps_0_evaluates_the_adapter_the_run_starts_from(learned, shared_actors, tiny_model_dir, tmp_path):
    folder, history = learned
    config = tiny_config(tiny_model_dir, tmp_path, steps=0, eval_prompts=LEARNING["eval_prompts"])
    config = replace(config, model=replace(config.model, adapter=str(folder)))
    [record] = train(config, Digits(), shared_actors(config))
    assert record["step"] == 0 and record["eval/accuracy"] == history[-1]["eval/accuracy"] > 0.8, record

    def answers(run_folder: Path, step: int) -> list[str]:
        return [line["turns"][0]["action"] for line in samples(run_folder) if line["split"] == "eval" and
                line["step"] == step]

    # The weights the learned run ended with, served alike, answer its held-out problems greedily as they did.
    assert answers(tmp_path, 0) == answers(folder, LEARNING["steps"]) and len(answers(tmp_path, 0)) == 16
    assert not (tmp_path / "state.json").exists(), "nothing trained, nothing saved"


def test_on_policy_distillation_learns_a_teachers_behaviour_from_its_logprobs_alone(learned, shared_actors,
                                                                                     tiny_model_dir, tmp_path):
    # The teacher: the run that learned to answer in digits (rank 8, every layer). The student: rank 4 without the
    # MLP's layers, trained on the teacher's per-token KL of the student's own samples, its rewards weighted 0.
    folder, taught = learned
    config = tiny_config(tiny_model_dir, tmp_path, steps=LEARNING["steps"], eval_every=LEARNING["steps"],
                         eval_prompts=LEARNING["eval_prompts"], algo={"teacher": str(folder), "reward_coef": 0.0,
                                                                      "kl_coef": 1.0})
    config = replace(config, model=replace(config.model, lora_rank=4, train_mlp=False))
    history = train(config, Digits(), shared_actors(config))
    steps = history[:-1]
    kl, rewards = [r["kl/sampler_vs_teacher"] for r in steps], [r["reward/mean"] for r in steps]
    # Measured: KL 8.4 at step 0 (the student is the base model) down to 0.01 by step 11; reward 0.1 up to 1.0.
    assert kl[0] > 1.0 and max(kl[-2:]) < kl[0] / 3, kl
    assert rewards[0] < 0.3 and min(rewards[-2:]) > 0.6, rewards
    assert history[0]["eval/accuracy"] < 0.3 and history[-1]["eval/accuracy"] > 0.6, history[-1]
    assert all(r["time/reference_s"] > 0 for r in steps), "the teacher's logprobs are a phase of their own"
    trained = [line for line in samples(tmp_path) if line["split"] == "train"]
    assert trained and all(value == 0.0 for line in trained for value in line["advantages"]), "no reward trains"
    # The same teacher as a model of its own (the adapter merged into the base: rl-export), held in a learner of its
    # own: the same samples at step 0 (the student is the base model either way), scored alike.
    from rl.driver.state import adapter_folder
    from rl.export import export

    export(adapter_folder(folder), tmp_path / "teacher_model", base=tiny_model_dir)
    config = tiny_config(tiny_model_dir, tmp_path / "from_model", steps=1, eval_every=0, algo={
        "teacher_model": str(tmp_path / "teacher_model"), "reward_coef": 0.0, "kl_coef": 1.0})
    [first] = train(replace(config, model=replace(config.model, lora_rank=4, train_mlp=False)), Digits())
    assert first["reward/mean"] == steps[0]["reward/mean"] and first["tokens/sampled"] == steps[0]["tokens/sampled"]
    assert first["kl/sampler_vs_teacher"] == pytest.approx(kl[0], abs=1e-4), (first, steps[0])
    assert first["memory/teacher_gib"] > 0 and first["memory/teacher_gib"] != first["memory/learner_gib"]


def test_distillation_alone_trains_on_prompts_without_answers(learned, shared_actors, tiny_model_dir, tmp_path):
    from rl.train import source_of

    folder, _ = learned
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a number like {n}."}) + "\n" for n in range(100, 120)))
    config = tiny_config(tiny_model_dir, tmp_path / "run", steps=2, eval_every=0, eval_prompts=4, algo={
        "teacher": str(folder), "reward_coef": 0.0, "kl_coef": 1.0})
    config = replace(config, data=DataConfig(train=str(prompts)))
    task = source_of(config)
    assert {problem.answer for problem in task.train} == {None} and (len(task.train), task.held_out) == (20, ()), \
        "with eval_every=0 every prompt trains"
    assert task.reward(task.train[0], "Answer: 7") == 0.0 and task.accuracy(task.train[0], "7") == 0.0
    history = train(config, task, shared_actors(config))
    assert [record["datums"] for record in history] == [64, 64], "every sample trains on the teacher's KL"
    assert all(record["kl/sampler_vs_teacher"] > 1.0 and record["reward/mean"] == 0.0 for record in history)
    # Held-out accuracy needs answers; a run that trains on its rewards needs them in every problem.
    with pytest.raises(ValueError, match=r'data.train: 4 of the held-out problems have no "answer", which held-out '
                                         r"accuracy needs: give data.eval=FILE of problems with answers, or "
                                         r"eval_every=0"):
        source_of(replace(config, eval_every=5))
    with pytest.raises(ValueError, match=r"data.train=.*prompts.jsonl, line 1: no 'answer'"):
        source_of(replace(config, algo=replace(config.algo, reward_coef=0.5)))


def test_a_loss_over_pairs_pairs_each_groups_best_and_worst_episode():
    def episode(reward: float, stop: str = "done") -> Episode:
        return Episode([Turn([1, 2], sampled([int(reward * 10) + 3, 9], [-0.5, -0.25]), reward, {})], stop)

    groups = [[episode(0.2), episode(1.0), episode(0.0), episode(1.0)],  # the first of equals
              [episode(0.5), episode(0.5)],  # alike: no pair
              [episode(0.0, "max_turns"), episode(0.3), episode(0.6)]]
    rollout = rl_loop.Rollout(groups, weights_step=0, seconds=1.0)
    config = TrainConfig()
    chosen, rejected, *rest = rl_loop.group_pairs(config, rollout)
    assert (chosen.tokens, rejected.tokens) == ([1, 2, 13, 9], [1, 2, 3, 9]) and len(rest) == 2
    assert [sequence.tokens[2] for sequence in rest] == [9, 3], "an episode cut off by a limit pairs too"
    dropped = replace(config, env=replace(config.env, truncated="drop"))
    assert [sequence.tokens[2] for sequence in rl_loop.group_pairs(dropped, rollout)[2:]] == [9, 6], (
        "unless env.truncated=drop")
    datum = chosen.reply_datum()
    assert datum.loss_fn_inputs.keys() == {"target_tokens", "weights"}, "what the pair losses read"
    assert datum.loss_fn_inputs["weights"].data == [0.0, 1.0, 1.0] and datum.model_input.to_ints() == [1, 2, 13]


def test_rl_with_a_loss_over_pairs_is_online_dpo(shared_actors, tiny_model_dir, tmp_path):
    # Each group's best and worst sample, scored by the task, are a (chosen, rejected) pair for the dpo loss against
    # the base model (which the learner computes in the same pass): DPO on the policy's own samples. (Whether it
    # learns is measured on SmolLM2: recipe arithmetic_online_dpo, docs/recipes.md.)
    config = tiny_config(tiny_model_dir, tmp_path, steps=4, eval_every=0, algo={
        "loss_fn": "dpo", "loss_fn_config": {"beta": 0.1}, "learning_rate": 1e-2})
    history = train(config, Digits(), shared_actors(config))
    # Digits' rewards (the share of digits) differ within most groups of the random model's samples.
    assert all(4 <= record["pairs"] <= 8 and record["datums"] == 2 * record["pairs"] for record in history), history
    assert abs(history[0]["dpo_margin:mean"]) < 1e-4 and history[0]["dpo_accuracy:mean"] == 0.0, (
        "at step 0 the policy is the reference")
    # The loss per pair is the dpo loss of the pair's margin: log 2 at a zero margin.
    assert history[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert all(abs(record["dpo_margin:mean"]) > 1e-3 for record in history[1:]), "later pairs meet moved weights"
    assert all(record["kl/sampler_vs_learner_sq"] < 1e-6 for record in history), "the pair's own tokens were scored"
    assert f"| pairs {history[0]['pairs']} | dpo acc 0 |" in summary_line(history[0]), summary_line(history[0])
    # Settings a pair loss has no use for are refused, not ignored.
    for algo, message in (({"kl_coef": 0.1}, "algo.kl_coef=0.1: 0 with a loss over pairs"),
                          ({"num_substeps": 2}, "algo.num_substeps=2: 1 with a loss over pairs"),
                          ({"reward_coef": 0.5}, "algo.reward_coef=0.5: 1 with a loss over pairs")):
        bad = tiny_config(tiny_model_dir, tmp_path, algo={"loss_fn": "dpo", **algo})
        with pytest.raises(ValueError, match=re.escape(message)):
            check(bad)


def test_a_teacher_model_reserves_a_learners_gpus_and_resources_but_no_cpu(tiny_model_dir, tmp_path):
    # It computes only while the run's learner waits for it: on a 2-core machine (learner and sampler a core each)
    # a CPU of its own would leave the run no room to start.
    from rl.driver.run import teacher_bundle

    config = tiny_config(tiny_model_dir, tmp_path, algo={"teacher_model": str(tiny_model_dir), "kl_coef": 1.0})
    assert teacher_bundle(config) is None, "on CPUs it shares the learner's bundle"
    assert teacher_bundle(replace(config, algo=replace(config.algo, teacher_model=None))) is None
    gpus = replace(config, learner=replace(config.learner, num_gpus=1, resources={"learner_node": 1}))
    assert teacher_bundle(gpus) == {"GPU": 1, "learner_node": 1}



def test_the_reference_is_the_teacher_even_for_a_run_that_starts_from_an_adapter(tiny_model_dir, tmp_path):
    from rl.driver.run import reference_adapter

    config = tiny_config(tiny_model_dir, tmp_path, algo={"kl_coef": 1.0})
    started = replace(config, model=replace(config.model, adapter="sft_run"))
    assert reference_adapter(config) is None, "the base model"
    assert reference_adapter(started) == ("model.adapter", "sft_run")
    assert reference_adapter(replace(started, algo=replace(started.algo, teacher="rl_run"))) == ("algo.teacher",
                                                                                              "rl_run")
    # A teacher model alone is the reference as it is: the starting adapter is not loaded into its learner.
    assert reference_adapter(replace(started, algo=replace(started.algo, teacher_model="big"))) is None


def test_a_teacher_model_of_another_tokenizer_or_none_is_refused_before_any_actor_starts(tiny_model_dir, tmp_path):
    from rl.driver.run import check_teacher_tokenizer, tokenizer_of

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<teacher-only>"])
    tokenizer.save_pretrained(other)
    config = tiny_config(tiny_model_dir, tmp_path / "run", algo={"teacher_model": str(other), "kl_coef": 1.0})
    check_teacher_tokenizer(replace(config, algo=replace(config.algo, teacher_model=str(tiny_model_dir))),
                            tokenizer_of(config.model))
    with pytest.raises(ValueError, match=r"algo.teacher_model=.*other-tokenizer: its tokenizer is not .*'s \(\d+ "
                                         r"tokens against \d+, .*both must share one tokenizer"):
        train(config, Digits())
    with pytest.raises(ValueError, match=r"algo.teacher_model=nowhere: unknown base model 'nowhere'"):
        train(replace(config, algo=replace(config.algo, teacher_model="nowhere")), Digits())
    assert not (tmp_path / "run").exists(), "refused before the run began"


def test_a_model_without_a_chat_template_is_refused_and_served_with_model_chat_template(ray_local, tiny_model_dir,
                                                                                      tmp_path):
    base = tmp_path / "base-model"  # the tiny model, its tokenizer without a chat template (as a base model's)
    shutil.copytree(tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(base)
    for template in base.glob("chat_template.*"):
        template.unlink()
    config = tiny_config(base, tmp_path / "run", steps=0, eval_prompts=4)
    with pytest.raises(ValueError, match="model.chat_template=None: .*base-model's tokenizer has no chat template"):
        train(config, Digits())
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "refused before anything started"
    [record] = train(replace(config, model=replace(config.model, chat_template="plain")), Digits())
    prompts = [line["turns"][0]["observation"] for line in samples(tmp_path / "run")]
    assert prompts == [problem.prompt for problem in Digits().problems(4, seed=0, split="eval")], "the text alone"
    assert record["step"] == 0 and "eval/accuracy" in record


def test_held_out_metrics_are_the_mean_of_every_answer_and_pass_at_k_the_mean_of_each_problems_best():
    def answers(*scores: float) -> list[Episode]:
        return [Episode([Turn([1], sampled([2], [-0.1]), 0.0, {"accuracy": score})], "done") for score in scores]

    assert held_out_metrics([answers(1.0), answers(0.0), answers(1.0)]) == {"eval/accuracy": 2 / 3}
    assert held_out_metrics([answers(1.0, 0.0, 0.0), answers(0.0, 0.0, 0.0)]) == {
        "eval/accuracy": 1 / 6, "eval/pass@3": 0.5}
    # An environment that reports no accuracy is scored by its episodes' total reward.
    rewarded = [Episode([Turn([1], sampled([2], [-0.1]), reward, {})], "done") for reward in (0.5, 0.25)]
    assert held_out_metrics([rewarded]) == {"eval/accuracy": 0.375, "eval/pass@2": 0.5}


def test_eval_samples_answers_each_held_out_problem_k_times_at_eval_temperature(learned, shared_actors,
                                                                                tiny_model_dir, tmp_path):
    folder, _ = learned
    config = tiny_config(tiny_model_dir, tmp_path, steps=0, eval_prompts=LEARNING["eval_prompts"], eval_samples=4,
                         eval_temperature=1.6)
    config = replace(config, model=replace(config.model, adapter=str(folder)))
    [record] = train(config, Digits(), shared_actors(config))
    answers = [line for line in samples(tmp_path) if line["split"] == "eval"]
    assert [(line["group"], line["episode"]) for line in answers] == [(p, k) for p in range(16) for k in range(4)]
    scores = [[line["metrics"]["accuracy"] for line in answers if line["group"] == problem] for problem in range(16)]
    assert record["eval/accuracy"] == sum(map(sum, scores)) / 64
    # Measured at 1.6: mean@4 0.48, pass@4 0.94, 50 different answers of 64 (greedy gives one a problem).
    assert record["eval/pass@4"] == sum(map(max, scores)) / 16 > record["eval/accuracy"] > 0.2
    assert len({line["turns"][0]["action"] for line in answers}) > 16, "sampled: a problem's answers differ"


def test_off_policy_learner_and_sampler_split_the_cores(ray_local, tiny_model_dir, tmp_path):
    """They work at the same time: with threads unset, each takes half the cores (on-policy, each takes all)."""
    half = max(1, os.cpu_count() // 2)

    def threads(actor) -> int:
        return ray.get(actor.__ray_call__.remote(lambda self: torch.get_num_threads()))

    with Run(tiny_config(tiny_model_dir, tmp_path, algo={"off_policy": True})) as run:
        assert threads(run.learner) == half
        assert [threads(replica.actor) for replica in run.pool._replicas] == [half]


@dataclass(frozen=True)
class AlikeTask(Digits):
    """Digits on which every answer scores 1: every group agrees, so no step has anything to train."""

    name: str = "alike"

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0


def test_off_policy_a_step_with_nothing_to_train_ends_once_the_next_rollout_has_sampled(
        ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """As a step that trains does (its publish waits for the next rollout): a step that ended at once would leave
    the next one to wait for two rollouts."""
    events, rollout, record_step = [], rl_loop.rollout, Run.record

    async def noted_rollout(run, environment, step, *weights):
        sampled = await rollout(run, environment, step, *weights)
        events.append(f"rollout {step} sampled")
        return sampled

    def noted_record(self, record, *, started):
        events.append(f"step {record['step']} logged")
        record_step(self, record, started=started)

    monkeypatch.setattr(rl_loop, "rollout", noted_rollout)
    monkeypatch.setattr(Run, "record", noted_record)
    history = train(tiny_config(tiny_model_dir, tmp_path, steps=3, eval_every=0, algo={"off_policy": True}),
                    AlikeTask())
    assert [record["datums"] for record in history] == [0, 0, 0]
    assert [record["sampler/weights_step"] for record in history] == [0, 0, 0], "nothing trained, nothing published"
    assert events == ["rollout 0 sampled", "rollout 1 sampled", "step 0 logged", "rollout 2 sampled",
                      "step 1 logged", "step 2 logged"]


@dataclass(frozen=True)
class FlakyTask(Digits):
    """Digits whose reward raises from `fail_at_step` on; or a task with no prompts at all."""

    name: str = "flaky"
    fail_at_step: int = 1
    prompts: bool = True

    def problems(self, count, *, seed, split="train"):
        return super().problems(count, seed=seed, split=split) if self.prompts else []

    def reward(self, problem: Problem, completion: str) -> float:
        # step 0's evaluation scores 8 held-out answers, then each step 64 samples
        if self.fail_at_step is not None and len(_calls) >= 8 + 64 * self.fail_at_step:
            raise KeyError("no such answer")
        _calls.append(completion)
        return super().reward(problem, completion)

    def accuracy(self, problem: Problem, completion: str) -> float:  # evaluation does not count as a reward call
        return float(Digits.reward(self, problem, completion) == 1.0)


_calls: list[str] = []


def test_a_failing_reward_is_named_and_the_last_checkpoint_resumes(shared_actors, tiny_model_dir, tmp_path):
    _calls.clear()
    config = tiny_config(tiny_model_dir, tmp_path, steps=3, checkpoint_every=1, checkpoint_keep=2,
                         algo={"loss_fn": "dro"})
    shared = shared_actors(config)  # as in a sweep: the failed run's actors serve on
    with pytest.raises(RuntimeError, match=r"environment 'flaky' raised in step 1, group \d, episode \d, "
                                           r"turn 0: step: KeyError\('no such answer'\)"):
        train(config, FlakyTask(), shared)
    assert read_state(tmp_path)["step"] == 1, "step 0's checkpoint was saved before step 1 failed"
    history = train(replace(config, resume=True), Digits(), shared)
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert [(line["step"], line["split"]) for line in samples(tmp_path)][::8] == [
        (0, "train"), (0, "eval"), (1, "train"), (2, "train"), (3, "eval")], "each step's samples once"
    [run_folder] = (tmp_path / "checkpoints").iterdir()
    assert sorted(path.name for path in (run_folder / "weights").iterdir()) == ["step-2", "step-3"], \
        "checkpoint_keep=2: the last two, the one saved before the resume deleted"

    with pytest.raises(ValueError, match=r"task 'flaky' gave no prompts \(asked for 8 from split 'eval'"):
        train(tiny_config(tiny_model_dir, tmp_path / "empty"), FlakyTask(prompts=False, fail_at_step=None))
    assert not (tmp_path / "empty").exists(), "refused before a learner or sampler started"


def test_a_resumed_run_log_keeps_the_metrics_and_samples_of_the_steps_before_it(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), logger=LoggerConfig(wandb_mode="disabled"))
    log = RunLog(config)
    for step in range(3):
        log.samples([{"step": step, "split": "train", "turns": []}] * 2)
        log.log({"step": step, "step_time_s": 1.0, "time_total/minutes": step / 60})
    log.close()
    assert [line["step"] for line in samples(tmp_path)] == [0, 0, 1, 1, 2, 2]
    resumed = RunLog(config, start_step=2)
    assert [record["step"] for record in resumed.history] == [0, 1]
    resumed.close()
    assert [line["step"] for line in samples(tmp_path)] == [0, 0, 1, 1], "step 2 is about to be redone"
    assert [record["step"] for record in metrics(tmp_path)] == [0, 1]


def test_a_run_ends_by_saying_where_its_files_are_and_its_final_metrics(tmp_path):
    from rl.metrics import closing_line, curve_panels, summary_line

    (tmp_path / "metrics.jsonl").touch()
    (tmp_path / "curves.png").touch()
    history = [{"step": 0, "eval/accuracy": 0.25, "reward/mean": 0.0, "loss": 0.5},
               {"step": 5, "eval/accuracy": 0.75, "reward/mean": 0.5, "loss": 0.25},
               {"step": 10, "eval/accuracy": 0.75, "eval/pass@2": 1.0, "eval/math/accuracy": 0.5,
                "eval/gsm8k/accuracy": 1.0, "eval/length": 9.0, "time_total/minutes": 1.5}]
    assert closing_line(history, tmp_path) == (f"{tmp_path}: metrics.jsonl, curves.png | eval/accuracy 0.75 (best 0.75 "
                                               "at step 5) | eval/pass@2 1 | eval/gsm8k/accuracy 1 | "
                                               "eval/math/accuracy 0.5 | reward/mean 0.5 | loss 0.25 | "
                                               "time_total/minutes 1.5")
    assert summary_line(history[2]) == "step 10 | eval acc 0.75 | pass@2 1 | math/accuracy 0.5 | gsm8k/accuracy 1"
    [accuracy_panel, *_] = curve_panels(history)
    assert accuracy_panel == ("reward / accuracy", "step", ("reward/mean", "env/task_reward", "eval/accuracy",
                                                            "eval/judge_reward", "eval/win_rate", "dpo_accuracy:mean",
                                                            "eval/dpo_accuracy:mean", "eval/pair_accuracy",
                                                            "eval/gsm8k/accuracy", "eval/math/accuracy"))


def test_the_publish_modes_train_the_same(two_steps):
    # Merged weights and a LoRA beside them sum in different orders: their logprobs agree within ~1e-6, not to the
    # bit, so a near-tie may send a seeded sample another way and everything after it with it. The modes are
    # compared on rewards with a tolerance; each is checked against its learner in the test above.
    merged, adapted = (two_steps[mode][2] for mode in ("merge", "adapter"))
    for merged_step, adapted_step in zip(merged[:2], adapted[:2], strict=True):
        # A mean over 64 samples, equal when no near-tie flips a sample (measured: equal).
        assert merged_step["reward/mean"] == pytest.approx(adapted_step["reward/mean"], abs=0.1)


def test_evaluations_fall_every_eval_every_steps_and_after_the_last_and_checkpoints_likewise():
    from rl.driver.run import checkpoint_due, evaluates

    def evaluated(eval_every: int, steps: int) -> list[int]:
        return [step for step in range(steps + 1) if evaluates(TrainConfig(eval_every=eval_every, steps=steps), step)]

    assert evaluated(5, 12) == [0, 5, 10, 12]
    assert evaluated(5, 10) == [0, 5, 10]
    assert evaluated(0, 12) == []

    def saved(checkpoint_every: int, steps: int) -> list[int]:
        config = TrainConfig(checkpoint_every=checkpoint_every, steps=steps)
        return [next_step for next_step in range(1, steps + 1) if checkpoint_due(config, next_step)]

    assert saved(10, 25) == [10, 20, 25]
    assert saved(5, 10) == [5, 10]
    assert saved(0, 12) == [12], "0: after the last step only"


def test_a_learner_and_a_sampler_that_resolved_auto_differently_are_refused_and_gpus_are_checked(capsys):
    from types import SimpleNamespace

    from rl.driver.run import check_devices

    config = TrainConfig()  # model.dtype auto
    learner = {"dtype": "bfloat16", "device": "cpu", "native_bf16": True}
    check_devices(config, learner, SimpleNamespace(info={"dtype": "bfloat16"}))
    out = capsys.readouterr().out
    assert "learner and sampler compute in bfloat16 on cpu (model.dtype=auto)" in out and "warning" not in out
    check_devices(config, {**learner, "native_bf16": False}, SimpleNamespace(info={"dtype": "bfloat16"}))
    assert "warning: cpu has no native bf16" in capsys.readouterr().out
    with pytest.raises(ValueError, match="model.dtype=auto became bfloat16 in the learner and float32 in the sampler"):
        check_devices(config, learner, SimpleNamespace(info={"dtype": "float32"}))
    no_pool = None  # SFT without evaluation
    check_devices(config, {"dtype": "float32", "device": "cpu", "native_bf16": False}, no_pool)
    assert "learner computes in float32" in capsys.readouterr().out
    on_gpu = replace(config, learner=replace(config.learner, num_gpus=0.5),
                     sampler=replace(config.sampler, num_gpus=0.5))
    check_devices(on_gpu, {**learner, "device": "cuda:0"}, SimpleNamespace(info={"dtype": "bfloat16"}))
    assert ("learner and sampler compute in bfloat16 on cuda:0 (model.dtype=auto; learner 0.5 GPU; each sampler "
            "replica 0.5 GPU)") in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"learner.num_gpus=0.5, but the learner computes on its CPU"):
        check_devices(on_gpu, learner, SimpleNamespace(info={"dtype": "bfloat16"}))
