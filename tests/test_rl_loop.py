"""The RL loop end to end on the tiny model: real learner actor, real vLLM pool, verified publishing."""

import json
from dataclasses import dataclass

from rl.driver.rl import RLConfig, train
from rl.tasks import Problem


@dataclass(frozen=True)
class LetterTask:
    """Rewards completions by how many of their characters are 'e': random text scores a spread of rewards."""

    name: str = "letters"

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        return [Problem(prompt=f"Write something ({split} {seed} {index}).", answer="e") for index in range(count)]

    def reward(self, problem: Problem, completion: str) -> float:
        return completion.count(problem.answer) / max(len(completion), 1)

    def accuracy(self, problem: Problem, completion: str) -> float:
        return float(problem.answer in completion)


def test_two_steps_train_publish_and_log(ray_local, tiny_model_dir, tmp_path):
    config = RLConfig(base_model=str(tiny_model_dir), steps=2, prompts_per_step=4, group_size=4, max_tokens=8,
                      dtype="float32", learning_rate=1e-3, eval_every=1, eval_prompts=4, output_dir=str(tmp_path))
    history = train(config, LetterTask())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history and [record["step"] for record in lines] == [0, 1]
    for record in lines:
        assert {"loss", "step_time_s", "reward/mean", "eval/accuracy", "grad_norm:mean"} <= record.keys()
        assert 0.0 <= record["reward/mean"] <= 1.0 and record["datums"] > 0
        assert 0 < record["tokens/sampled"] <= 4 * 4 * 8
    assert lines[1]["step:max"] == 2.0, "one optimizer step per loop step"
    run_folder = next((tmp_path / "checkpoints").iterdir())
    assert sorted(p.name for p in (run_folder / "sampler_weights").iterdir()) == ["step-0", "step-1", "step-2"]
