"""The configuration is checked whole before anything starts: every bad value is named with its rule."""

from dataclasses import replace

import pytest

from rl.config import AlgoConfig, LearnerConfig, ModelConfig, SamplerConfig, TrainConfig, check
from rl.driver.run import adam_params


def refusal(config: TrainConfig) -> str:
    with pytest.raises(ValueError) as caught:
        check(config)
    return str(caught.value)


def test_the_defaults_and_every_recipe_pass():
    check(TrainConfig())
    check(TrainConfig(algo=AlgoConfig(loop="dpo", loss_fn="dpo", loss_fn_config={"beta": 0.1})))
    check(TrainConfig(algo=AlgoConfig(loop="sft", loss_fn="cross_entropy")))
    for loss in ("importance_sampling", "ppo", "cispo", "dro"):
        check(TrainConfig(algo=AlgoConfig(loss_fn=loss)))


def test_every_bad_value_is_named_at_once():
    message = refusal(TrainConfig(steps=-1, eval_every=-2, eval_prompts=0, checkpoint_keep=0,
                                  model=ModelConfig(dtype="fp8", lora_rank=0),
                                  learner=LearnerConfig(micro_batch_tokens=0), sampler=SamplerConfig(replicas=0,
                                                                                                      publish_mode="x",
                                                                                                      kv_cache_gib=0)))
    for expected in ("steps=-1: 0 (evaluate only) or more", "eval_every=-2: 0 (never) or more",
                     "eval_prompts=0: at least 1", "checkpoint_keep=0: unset (all kept) or at least 1",
                     "model.dtype='fp8': one of auto, float32, bfloat16, float16", "model.lora_rank=0: at least 1",
                     "learner.micro_batch_tokens=0: at least 1", "sampler.replicas=0: at least 1",
                     "sampler.publish_mode='x': one of adapter, merge",
                     "sampler.kv_cache_gib=0: unset or more than 0"):
        assert expected in message, (expected, message)
    assert message.count("\n") == 10, "one line per bad value, no more"


def test_an_adapter_of_no_layer_is_refused():
    message = refusal(TrainConfig(model=ModelConfig(train_attn=False, train_mlp=False, train_unembed=False)))
    assert "model.train_attn=False: true, or model.train_mlp or model.train_unembed" in message
    check(TrainConfig(model=ModelConfig(train_attn=False, train_unembed=False)))  # the MLP's alone


def test_unknown_loss_and_loops_that_do_not_fit_their_loss():
    assert "algo.loss_fn='nosuch': one of cross_entropy, importance_sampling" in refusal(
        TrainConfig(algo=AlgoConfig(loss_fn="nosuch")))
    assert "algo.loss_fn='cross_entropy': the rl loop trains with a policy loss (one that reads advantages: " \
           "importance_sampling, ppo, gspo, cispo, dro), or a loss over pairs (dpo, ipo, simpo: each group's best " \
           "and worst sample, online DPO)" in refusal(TrainConfig(algo=AlgoConfig(loss_fn="cross_entropy")))
    assert "algo.loss_fn='importance_sampling': the dpo loop trains with a loss over preference pairs (dpo, ipo, " \
           "simpo)" in refusal(TrainConfig(algo=AlgoConfig(loop="dpo")))
    assert "algo.loss_fn='dpo': the sft loop trains with cross_entropy" in refusal(
        TrainConfig(algo=AlgoConfig(loop="sft", loss_fn="dpo")))
    assert "algo.loop='ppo': one of rl, dpo, sft" in refusal(TrainConfig(algo=AlgoConfig(loop="ppo")))
    assert "loss_fn_config['beta'] is not used by ppo" in refusal(
        TrainConfig(algo=AlgoConfig(loss_fn="ppo", loss_fn_config={"beta": 0.1})))


def test_impossible_sizes_for_rl():
    message = refusal(TrainConfig(algo=AlgoConfig(group_size=1, temperature=0.0, max_tokens=600)))
    assert "algo.group_size=1: at least 2" in message
    assert "algo.temperature=0.0: more than 0" in message
    assert "model.max_model_len=512: more than algo.max_tokens (600)" in message
    check(TrainConfig(algo=AlgoConfig(loop="sft", loss_fn="cross_entropy", group_size=1, temperature=0.0)))


def test_distillation_needs_a_teacher_a_kl_coefficient_and_the_rl_loop(tmp_path):
    assert "algo.teacher=None: an adapter to distill from" in refusal(TrainConfig(algo=AlgoConfig(reward_coef=0)))
    message = refusal(TrainConfig(algo=AlgoConfig(teacher=str(tmp_path / "nowhere"))))
    assert f"algo.teacher='{tmp_path / 'nowhere'}': a PEFT adapter folder or a run folder, but there is no" in message
    assert "algo.kl_coef=0.0: more than 0 with a teacher" in message
    assert "algo.teacher=" in refusal(TrainConfig(algo=AlgoConfig(loop="sft", loss_fn="cross_entropy",
                                                                   teacher=str(tmp_path))))
    assert "algo.teacher_model='big': unset: the dpo loop does not sample" in refusal(TrainConfig(algo=AlgoConfig(
        loop="dpo", loss_fn="dpo", teacher_model="big")))
    assert "algo.kl_coef=0.0: more than 0 with a teacher" in refusal(TrainConfig(algo=AlgoConfig(teacher_model="big")))
    # The teacher alone teaches a group of one: no group-relative advantage is needed.
    check(TrainConfig(algo=AlgoConfig(teacher=str(tmp_path), kl_coef=1.0, reward_coef=0.0, group_size=1)))
    assert "algo.group_size=1: at least 2" in refusal(TrainConfig(algo=AlgoConfig(
        teacher=str(tmp_path), kl_coef=1.0, group_size=1)))
    # The recipe: the main job's, learning from the teacher alone, which the command line must give.
    from hydra import compose, initialize_config_dir

    from rl.config import load
    from rl.train import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        recipe = load(compose("config", overrides=["output_dir=unused", "recipe=arithmetic_distill"]))
        main_job = load(compose("config", overrides=["output_dir=unused", "recipe=arithmetic_rl"]))
    assert "algo.teacher=None: an adapter to distill from" in refusal(recipe)
    assert (recipe.algo.reward_coef, recipe.algo.kl_coef) == (0.0, 1.0)
    assert replace(recipe.algo, teacher=None, reward_coef=1.0, kl_coef=0.0, loss_fn="importance_sampling",
                   loss_fn_config={}, learning_rate=main_job.algo.learning_rate) == main_job.algo
    assert (recipe.algo.loss_fn, recipe.algo.learning_rate) == ("ppo", 2e-4)
    assert (recipe.model, recipe.task, recipe.sampler, recipe.steps) == (main_job.model, main_job.task,
                                                                          main_job.sampler, main_job.steps)


def test_the_command_line_sets_maps_whole_and_pins_actors_to_nodes_as_docs_cluster_md_shows():
    from hydra import compose, initialize_config_dir

    from rl.config import load
    from rl.train import CONFIGS

    def composed(*overrides: str) -> TrainConfig:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return load(compose("config", overrides=["output_dir=unused", *overrides]))

    config = composed("learner.resources={learner_node: 1}", "sampler.resources={sampler_node: 1, big_disk: 0.5}",
                      "algo.loss_fn_config={clip_low_threshold: 0.7}")
    assert config.learner.resources == {"learner_node": 1.0}
    assert config.algo.loss_fn_config == {"clip_low_threshold": 0.7}
    assert config.sampler.resources == {"sampler_node": 1.0, "big_disk": 0.5}
    with pytest.raises(Exception, match="learner.resources={learner_node: many}"):
        composed("learner.resources={learner_node: many}")
    with pytest.raises(Exception, match="learner.micro_batch_tokenz"):
        composed("learner.micro_batch_tokenz=1")  # the rest of the schema stays closed


def test_learning_rate_schedules():
    def rates(schedule: str) -> list[float]:
        config = TrainConfig(steps=4, algo=AlgoConfig(learning_rate=1e-3, lr_schedule=schedule, grad_clip_norm=0.5))
        assert {adam_params(config, step).grad_clip_norm for step in range(4)} == {0.5}
        return [adam_params(config, step).learning_rate for step in range(4)]

    assert rates("constant") == [1e-3] * 4
    assert rates("linear") == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # 0 only after the last step
    half = 2 ** -0.5  # cos(pi / 4)
    assert rates("cosine") == pytest.approx([1e-3, 1e-3 * (1 + half) / 2, 5e-4, 1e-3 * (1 - half) / 2])
    assert "algo.lr_schedule='step': one of constant, linear, cosine" in refusal(
        TrainConfig(algo=AlgoConfig(lr_schedule="step")))


def test_warmup_then_the_schedule_and_adams_settings_reach_each_step():
    algo = AlgoConfig(learning_rate=1e-3, lr_schedule="linear", warmup_steps=3, weight_decay=0.1, adam_beta1=0.8,
                      adam_beta2=0.99, adam_epsilon=1e-8)
    params = [adam_params(TrainConfig(steps=7, algo=algo), step) for step in range(7)]
    # Steps 0-2 at 1/4, 2/4, 3/4; the 4 steps after them linear from 1 down: 1, 3/4, 1/2, 1/4.
    assert [p.learning_rate for p in params] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert {(p.weight_decay, p.beta1, p.beta2, p.eps) for p in params} == {(0.1, 0.8, 0.99, 1e-8)}
    everything_warms = TrainConfig(steps=2, algo=replace(algo, warmup_steps=5))
    assert [adam_params(everything_warms, step).learning_rate for step in range(2)] == pytest.approx([1e-3 / 6,
                                                                                                    2e-3 / 6])
    message = refusal(TrainConfig(algo=AlgoConfig(warmup_steps=-1, weight_decay=-0.1, adam_beta1=1.0,
                                                  adam_beta2=-0.5, adam_epsilon=0.0)))
    for expected in ("algo.warmup_steps=-1: 0 or more", "algo.weight_decay=-0.1: 0 or more",
                     "algo.adam_beta1=1.0: from 0 up to, not including, 1", "algo.adam_beta2=-0.5: from 0 up to",
                     "algo.adam_epsilon=0.0: more than 0"):
        assert expected in message, message
