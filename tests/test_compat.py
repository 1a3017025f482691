"""tinker-cookbook (0.6.1), unchanged, against `rl-serve`: its arithmetic RL, chat SL, DPO and on-policy
distillation recipes run from their own command lines on the tiny model, offline, through the official SDK over
HTTP.

Needs the `compat` extra (`scripts/setup.sh auto compat`; CI installs it). Each recipe runs in a process of its
own, pointed at one server: the model is named by its folder (the same name the server serves), the renderer
is the cookbook's ChatML one (`qwen3_instruct`), and nothing reaches a hub (HF_HUB_OFFLINE; the DPO recipe's
`Anthropic/hh-rlhf` and the distillation's `allenai/tulu-3-sft-mixture` are local folders of those names, which
`datasets.load_dataset` reads first).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is not installed: scripts/setup.sh auto compat")
pytest.importorskip("chz", reason="the compat extra is not installed: scripts/setup.sh auto compat")

from rl.service.app import ServerThread  # noqa: E402
from rl.service.service import Service  # noqa: E402


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, tmp_path_factory):
    # Rank 32: the DPO recipe's command line cannot set it (the cookbook's default).
    running = ServerThread(Service([str(tiny_model_dir)], tmp_path_factory.mktemp("storage"), [],
                                   context={str(tiny_model_dir): 256}, max_lora_rank=32))
    yield running
    running.stop()
    running.service.close()


def run_recipe(server, module: str, arguments: list[str], folder: Path) -> Path:
    """Runs `python -m module arguments...` against the server; returns its log folder."""
    log = folder / "log"
    env = {**os.environ, "TINKER_API_KEY": "tml-compat", "TINKER_TELEMETRY": "0", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(folder / "hf")}
    done = subprocess.run([sys.executable, "-m", module, *arguments, f"base_url={server.url}", f"log_path={log}",
                           "behavior_if_log_dir_exists=raise"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return log


def final_checkpoint(log: Path) -> dict:
    records = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    final = [record for record in records if record.get("name") == "final"]
    assert final and final[-1]["sampler_path"].startswith("tinker://"), records
    return final[-1]


def metrics(log: Path) -> list[dict]:
    return [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]


def test_math_rl_arithmetic(server, tiny_model_dir, tmp_path):
    # The recipe's default loss is stable_reinforce, which rl-serve refuses by name (docs/tinker.md).
    log = run_recipe(server, "tinker_cookbook.recipes.math_rl.train", [
        f"model_name={tiny_model_dir}", "renderer_name=qwen3_instruct", "env=arithmetic", "group_size=4",
        "groups_per_batch=2", "max_tokens=8", "max_steps=2", "lora_rank=8", "learning_rate=1e-4",
        "loss_fn=importance_sampling", "eval_every=0", "save_every=0"], tmp_path)
    final_checkpoint(log)
    rows = [row for row in metrics(log) if "env/all/reward/total" in row]
    assert len(rows) == 2, metrics(log)
    # The cookbook's own check that sampler and learner agree on the sampled tokens (its kl_sample_train).
    assert all(abs(row["optim/kl_sample_train_v1"]) < 1e-3 for row in rows), rows


def test_chat_sl(server, tiny_model_dir, tmp_path):
    import tinker_cookbook

    conversations = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    log = run_recipe(server, "tinker_cookbook.recipes.chat_sl.train", [
        f"model_name={tiny_model_dir}", "renderer_name=qwen3_instruct", f"dataset={conversations}", "batch_size=8",
        "max_length=256", "max_steps=2", "lora_rank=8", "learning_rate=1e-4", "save_every=0", "eval_every=0",
        "infrequent_eval_every=0"], tmp_path)
    final_checkpoint(log)
    rows = [row for row in metrics(log) if "train_mean_nll" in row]
    assert len(rows) == 2 and all(0 < row["train_mean_nll"] < 20 for row in rows), rows


def test_dpo(server, tiny_model_dir, tmp_path):
    data = tmp_path / "Anthropic" / "hh-rlhf"
    data.mkdir(parents=True)
    pairs = [(a, b) for a in range(2, 6) for b in (3, 6)]
    for split, rows in (("train", pairs[:8]), ("test", pairs[:1])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({
            "chosen": f"\n\nHuman: What is {a} + {b}?\n\nAssistant: {a + b}",
            "rejected": f"\n\nHuman: What is {a} + {b}?\n\nAssistant: {a + b + 1}"}) + "\n" for a, b in rows))
    log = run_recipe(server, "tinker_cookbook.recipes.preference.dpo.train", [
        f"model_name={tiny_model_dir}", "renderer_name=qwen3_instruct", "dataset=hhh", "batch_size=4",
        "max_length=256", "max_steps=2", "learning_rate=1e-5", "dpo_beta=0.1"], tmp_path)
    final_checkpoint(log)
    rows = [row for row in metrics(log) if "dpo_loss" in row]
    assert len(rows) == 2 and all(0 < row["dpo_loss"] < 5 for row in rows), rows


def test_on_policy_distillation(server, tiny_model_dir, tmp_path):
    # The teacher: an adapter trained through the SDK on the answer to a prompt the recipe asks, so its logprobs of
    # the student's samples differ from the student's (the base model's at step 0). The recipe's prompts: a local
    # folder named as the hub data set it reads (tulu3), first user messages of conversations.
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=server.url, api_key="tml-teacher")
    try:
        trainer = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0).result()
        tokenizer = trainer.get_tokenizer()
        tokens = tokenizer.encode("What is 2 + 3? The answer is 5.")
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        for _ in range(4):
            trainer.forward_backward([datum], "cross_entropy").result()
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        teacher = trainer.save_weights_for_sampler("teacher").result().path
    finally:  # its session's heartbeats would go on, and warn that "Tinker is down" once the server stops
        service.close("success").result()
    data = tmp_path / "allenai" / "tulu-3-sft-mixture"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]}) + "\n"
        for a in range(2, 6) for b in (3, 6)))
    log = run_recipe(server, "tinker_cookbook.recipes.distillation.on_policy_distillation", [
        f"model_name={tiny_model_dir}", "renderer_name=qwen3_instruct", f"teacher_model={tiny_model_dir}",
        f"teacher_checkpoint={teacher}", "dataset=tulu3", "group_size=2", "groups_per_batch=2", "max_tokens=8",
        "max_steps=2", "lora_rank=8", "learning_rate=1e-4", "eval_every=0", "save_every=0"], tmp_path)
    final_checkpoint(log)
    rows = [row for row in metrics(log) if "teacher_kl" in row]
    # The teacher's reverse KL of the student's samples, through compute_logprobs on the teacher's checkpoint.
    assert len(rows) == 2 and all(row["teacher_kl"] > 0.01 for row in rows), rows


def test_a_cookbook_environment_runs_in_the_rl_loop(shared_actors, tiny_model_dir, tmp_path):
    """The cookbook's multi-turn guess-the-number game, unchanged, through rl.cookbook's adapter."""
    import asyncio

    from test_rl_loop import tiny_config
    from tinker_cookbook.recipes.multiplayer_rl.guess_number.env import GuessNumberDatasetBuilder

    from rl.cookbook import CookbookEnvironment
    from rl.driver.rl import train

    train_set, test_set = asyncio.run(GuessNumberDatasetBuilder(
        batch_size=2, renderer_name="qwen3_instruct", train_group_size=4, model_name=str(tiny_model_dir),
        test_group_size=1)())
    config = tiny_config(tiny_model_dir, tmp_path, steps=2, eval_every=2, eval_prompts=2,
                         algo={"prompts_per_step": 2, "group_size": 4})
    history = train(config, CookbookEnvironment("guess_number", train_set, test_set), shared_actors(config))
    for record in history[:2]:
        assert record["datums"] >= 0 and 1.0 <= record["env/turns"] <= 8.0, record
        # The game re-renders its history with the model's turns as role "player", where the model was sampled
        # after "assistant": its next prompts do not extend the sampled tokens, and the loop says so.
        assert record["env/rerendered_turns"] > 0, record
        if record["datums"]:
            assert record["kl/sampler_vs_learner_sq"] < 1e-6, record
    # It reports no `accuracy`: evaluation gives its mean return (-1 for each unparsable guess, 1 when found).
    assert -8.0 <= history[2]["eval/accuracy"] <= 1.0
