"""`rl-train` as a user launches it: every recipe on the tiny model in one sweep, and clear errors. (resume=true
through rl-train is tested with a killed driver in test_cluster.py.)"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow
import pyarrow.parquet

RL_TRAIN = str(Path(sys.executable).parent / "rl-train")
RECIPES = ("arithmetic_rl", "gsm_rl", "arithmetic_dpo", "gsm_sft", "calculator_rl", "guess_number_rl",
           "arithmetic_online_dpo", "arithmetic_judge")
MULTI_TURN = ("calculator_rl", "guess_number_rl")
RL_LOOP = ("arithmetic_rl", "gsm_rl", *MULTI_TURN, "arithmetic_online_dpo")
SMALL = ("model=tiny", "eval_prompts=2", "algo.prompts_per_step=2", "algo.max_tokens=8", "algo.train_examples=4")


def rl_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([RL_TRAIN, *overrides], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def rl_train_at_once(*launches: tuple[str, ...], cwd: Path) -> list[subprocess.CompletedProcess]:
    """`rl_train` with each launch's overrides, the processes all at once."""
    with ThreadPoolExecutor(len(launches)) as threads:
        return list(threads.map(lambda overrides: rl_train(*overrides, cwd=cwd), launches))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_recipe_runs_two_steps_on_the_tiny_model(tmp_path):
    # One Hydra multirun through rl's launcher (rl/sweep.py): the recipes run at once, each with a folder and a
    # wandb run of its own; those alike in their actors' settings share a learner and a sampler pool (sweep.share,
    # on by default): the four off-policy recipes one, the four on-policy ones another.
    result = rl_train("-m", f"recipe={','.join(RECIPES)}", "steps=2", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = (tmp_path / "multirun" / RECIPES[0]).glob("*/sweep.json")
    learners = {Path(job["output_dir"]).parts[-3]: job["learner"] for job in json.loads(summary.read_text())}
    off_policy = ("arithmetic_rl", *MULTI_TURN, "arithmetic_online_dpo")
    assert len({learners[recipe] for recipe in RECIPES if recipe not in off_policy}) == 1, learners
    assert len({learners[recipe] for recipe in off_policy}) == 1 and len(set(learners.values())) == 2, learners
    for recipe in RECIPES:
        (sweep,) = (tmp_path / "multirun" / recipe).iterdir()
        (run,) = [folder for folder in sweep.iterdir() if folder.is_dir() and folder.name != ".hydra"]
        lines = records(run)
        assert [r["step"] for r in lines] == [0, 1, 2] and "eval/accuracy" in lines[0], recipe
        assert all("loss" in r and "step_time_s" in r for r in lines[:2]), recipe
        first = lines[0]
        if recipe == "arithmetic_online_dpo":  # a pair where a group's rewards differ (rare on the random model)
            assert first["datums"] == 2 * first["pairs"] and 0 <= first["pairs"] <= 2, first
            assert first.get("dpo_accuracy:mean", 0.0) == 0.0, "at step 0 the policy is the reference"
        elif recipe.endswith("dpo"):  # at step 0 the policy is the reference: no margin is above 0
            assert first["dpo_accuracy:mean"] == 0.0 and abs(first["dpo_margin:mean"]) < 1e-4, first
        elif recipe in MULTI_TURN:  # 2 groups of 8 episodes of 1 to 4 turns, rewarded in [0, 1]
            assert 0.0 <= first["reward/mean"] <= 1.0 and 1.0 <= first["env/turns"] <= 4.0, first
            assert 16 <= first["tokens/sampled"] <= 16 * 4 * 8 and 0.0 <= first["env/accuracy"] <= 1.0, first
        elif recipe.endswith("rl"):  # 2 prompts x group_size samples (4, or 8 in gsm_rl), each rewarded in [0, 1]
            group = 8 if recipe == "gsm_rl" else 4
            assert 0.0 <= first["reward/mean"] <= 1.0 and 2 * group <= first["tokens/sampled"] <= 2 * group * 8, first
            assert first["tokens/prompt"] % group == 0, "each prompt counted once per sample"
        else:  # the tiny random model is about as lost as a uniform guess over its 2048 tokens
            assert 6.0 < first["eval/loss"] < 9.0, first
        assert first["eval/accuracy"] * 2 == round(first["eval/accuracy"] * 2), "a count over 2 prompts"
        assert (run / "curves.png").is_file() and len(list((run / "wandb").glob("offline-run-*"))) == 1, recipe
        # Each evaluation's episodes as text in samples.jsonl and as a wandb table; an RL step's first group too.
        samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        evaluated = [line for line in samples if line["split"] == "eval"]
        assert [(line["step"], line["group"]) for line in evaluated] == [(0, 0), (0, 1), (2, 0), (2, 1)], recipe
        assert sum(line["metrics"].get("accuracy", line["reward"]) for line in evaluated[:2]) / 2 == first[
            "eval/accuracy"], recipe
        assert len(list((run / "wandb").rglob("media/table/samples/eval_*.table.json"))) == 2, recipe
        trained = [(line["step"], line["group"]) for line in samples if line["split"] == "train"]
        group = 8 if recipe == "gsm_rl" or recipe in MULTI_TURN else 4
        assert trained == ([(0, 0)] * group + [(1, 0)] * group if recipe in RL_LOOP else []), recipe
        config = json.loads((run / "config.json").read_text())
        assert config["recipe"] == recipe and config["model"]["name"] == "tiny"
        assert json.loads((run / "state.json").read_text())["step"] == 2


def test_a_folder_named_rl_where_a_process_starts_does_not_hide_the_package(tmp_path):
    (tmp_path / "rl").mkdir()  # a run folder, or the clone itself when run from its parent: Ray's workers start there
    found = subprocess.run([sys.executable, "-c", "import rl.train, rl; print(rl.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and found.stdout.strip().endswith(os.path.join("rl", "__init__.py")), found.stderr


def test_rl_train_names_what_is_wrong(tmp_path):
    unknown_recipe, unknown_key, added_key, wrong_type, bad_values, nothing_to_resume, no_judge, no_pairs = \
        rl_train_at_once(("recipe=nope",), ("algo.learning_rat=1e-3",),
                         ("+algo.learning_rat=1e-3",),  # past Hydra, caught by the typed schema
                         ("steps=many",), ("algo.loss_fn=nosuch", "steps=-1", *SMALL), ("resume=true", *SMALL),
                         ("recipe=arithmetic_judge_rl", *SMALL), ("recipe=arithmetic_dpo", "task=digits", *SMALL),
                         cwd=tmp_path)
    assert unknown_recipe.returncode != 0 and "recipe/nope" in unknown_recipe.stderr
    assert "arithmetic_rl" in unknown_recipe.stderr, "the known recipes are listed"
    assert unknown_key.returncode != 0 and "Could not override 'algo.learning_rat'" in unknown_key.stderr
    assert added_key.returncode != 0 and "bad configuration at algo.learning_rat: not a known key" in added_key.stderr
    assert wrong_type.returncode != 0 and "Value 'many' of type 'str' could not be converted to Integer" in \
        wrong_type.stderr and "full_key: steps" in wrong_type.stderr
    assert bad_values.returncode != 0 and "steps=-1: 0 (evaluate only) or more" in bad_values.stderr
    assert "algo.loss_fn='nosuch': one of cross_entropy" in bad_values.stderr
    assert nothing_to_resume.returncode != 0 and "resume=true: no run with a checkpoint" in nothing_to_resume.stderr
    assert no_judge.returncode != 0 and "judge.adapter=None: the judge's adapter folder or run folder, or base: " \
        "recipe arithmetic_judge_rl rewards with a judge's verdicts" in no_judge.stderr
    assert "task 'digits' has no integer reference answers" in no_pairs.stderr
    assert "rl-train: the run in" in no_pairs.stderr and "it had saved no checkpoint yet" in no_pairs.stderr
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("wandb")), "nothing started"


def test_the_jsonl_recipes_train_on_your_own_file(tmp_path):
    # A Parquet file, its conversations in a column of another name (as the HF hub's data sets have them); and each
    # jsonl recipe launched without a file, at the same time.
    conversations = [[{"role": "user", "content": f"{a} + 1?"}, {"role": "assistant", "content": str(a + 1)}]
                     for a in range(10)]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"chat": c} for c in conversations]),
                                tmp_path / "mine.parquet")
    result, *unset = rl_train_at_once(
        ("recipe=sft_jsonl", "data.train=mine.parquet", "data.fields={messages:chat}", "steps=2", *SMALL),
        *((f"recipe={recipe}",) for recipe in ("rl_jsonl", "dpo_jsonl", "rlhf_jsonl")), cwd=tmp_path)
    for recipe, refused in zip(("rl_jsonl", "dpo_jsonl", "rlhf_jsonl"), unset, strict=True):
        assert refused.returncode != 0 and f"data.train=None: a file of your examples: recipe {recipe}" in \
            refused.stderr, refused.stderr[-2000:]
    assert "recipe rlhf_jsonl rewards with a judge's verdicts (recipe preference_model_jsonl trains one: rl-train " \
        "recipe=preference_model_jsonl data.train=FILE" in refused.stderr, refused.stderr[-2000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: 8 examples to train on from mine.parquet, 2 held out of its own" in result.stdout, result.stdout
    (run,) = (tmp_path / "outputs" / "sft_jsonl").iterdir()
    assert f"run folder: {run}" in result.stdout and f"{run}: metrics.jsonl, samples.jsonl, curves.png, checkpoints, " \
        "wandb | eval/loss " in result.stdout, result.stdout[-2000:]
    lines = records(run)
    assert [r["step"] for r in lines] == [0, 1, 2] and all("eval/loss" in lines[i] for i in (0, 2))
    assert not any("eval/accuracy" in r or "memory/sampler0_gib" in r for r in lines), "no verifier, no sampler"
    assert (run / "curves.png").is_file()


def test_rlhf_from_your_preference_pairs_a_preference_model_then_rl_from_it(tmp_path):
    pairs = [{"prompt": f"What is {a} + {b}?", "chosen": f"Answer: {a + b}", "rejected": f"Answer: {a + b + 1}"}
             for a in range(4) for b in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    model = rl_train("recipe=preference_model_jsonl", "data.train=pairs.jsonl", "steps=1", "eval_every=1",
                     "hydra.run.dir=pm", *SMALL, cwd=tmp_path)
    assert model.returncode == 0, model.stderr[-3000:]
    lines = records(tmp_path / "pm")
    assert [r["step"] for r in lines] == [0, 1] and all(0 <= line["eval/pair_accuracy"] <= 1 for line in lines)
    assert "data: 10 examples to train on from pairs.jsonl, 2 held out of its own" in model.stdout
    assert "| eval pair acc " in model.stdout and "eval/pair_accuracy " in model.stdout, "step lines and the end"
    rl = rl_train("recipe=rlhf_jsonl", "data.train=pairs.jsonl", "judge.adapter=pm", "steps=1", "hydra.run.dir=rl",
                  *SMALL, cwd=tmp_path)
    assert rl.returncode == 0, rl.stderr[-3000:]
    first, last = records(tmp_path / "rl")
    assert 0 < first["reward/mean"] < 1 and first["env/task_reward"] == 0.0 and first["time/judge_s"] > 0, first
    # Held out without answers: the greedy answers against the first evaluation's, which is even with itself.
    assert "data: 10 examples to train on from pairs.jsonl, 2 held out of its own" in rl.stdout
    assert first["eval/win_rate"] == 0.5 and 0 <= last["eval/win_rate"] <= 1, (first, last)
    assert not any("eval/accuracy" in line for line in (first, last)), "prompts alone: no answers"
    assert "best held-out win rate " in rl.stdout and "| eval win rate " in rl.stdout, rl.stdout[-2000:]
    baseline = json.loads((tmp_path / "rl" / "eval_baseline.json").read_text())
    assert [len(prompt) > 0 and reference is None for prompt, _, reference in baseline] == [True, True]


def test_your_own_task_or_environment_trains_from_python(tmp_path):
    # Both example scripts at once, as two users on one machine would run them (each with its own Ray).
    scripts = Path(__file__).resolve().parents[1] / "recipes"
    launched = {recipe: subprocess.Popen([sys.executable, str(scripts / f"{recipe}.py"), "steps=1", *SMALL],
                                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, "WANDB_MODE": "disabled"})
                for recipe in ("custom_task", "custom_env")}
    for recipe, process in launched.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, (recipe, stderr[-3000:])
        (run,) = (tmp_path / "outputs" / recipe).iterdir()
        assert [r["step"] for r in records(run)] == [0, 1]
        first = records(run)[0]
        assert 0.0 <= first["reward/mean"] <= 1.0 and first["tokens/prompt"] > 0, first
        if recipe == "custom_task":  # two prompts of one turn, each sampled 4 times
            assert first["tokens/sampled"] <= 2 * 4 * 8 and first["tokens/prompt"] % 4 == 0, first
        else:  # two groups of 4 episodes of 1 to 3 turns
            assert 1.0 <= first["env/turns"] <= 3.0 and first["tokens/sampled"] <= 2 * 4 * 3 * 8, first


def test_resume_true_continues_the_latest_run_beside_the_new_folder(tmp_path):
    # rl-train gives each launch a new folder; resume=true without hydra.run.dir continues the run beside it
    # whose state was written last (rl-train's whole resume path, a sweep killed and continued, is in
    # test_cluster.py).
    from rl.config import TrainConfig
    from rl.driver.state import STATE
    from rl.train import resume_folder

    older, newer, launched = (tmp_path / name for name in ("10-00-00", "09-00-00", "11-00-00"))
    for folder, mtime in ((older, 1_000), (newer, 2_000)):  # by when its state was written, not by name
        folder.mkdir()
        (folder / STATE).write_text("{}")
        os.utime(folder / STATE, (mtime, mtime))
    assert resume_folder(TrainConfig(output_dir=str(launched))) == newer
    assert resume_folder(TrainConfig(output_dir=str(older))) == older, "a folder with a state is itself the run"
