"""`rl-train`: compose a run's configuration with Hydra, check it, and launch its recipe.

    rl-train recipe=arithmetic_rl                          # the main job
    rl-train recipe=arithmetic_rl model=tiny steps=2       # a smoke run on the tiny model
    rl-train -m recipe=arithmetic_rl algo.learning_rate=1e-4,3e-4   # a sweep: one folder and wandb run each
"""

from __future__ import annotations

from pathlib import Path

import hydra
import ray
from omegaconf import DictConfig

from rl.config import ClusterConfig, TrainConfig, load
from rl.driver import rl as rl_loop
from rl.metrics import RunLog
from rl.tasks import make_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"arithmetic_rl": rl_loop.train}


def connect(cluster: ClusterConfig) -> None:
    """Starts Ray in this process, or joins a cluster; a sweep's later runs reuse the same Ray."""
    if not ray.is_initialized():
        ray.init(address=cluster.address, num_cpus=cluster.num_cpus, include_dashboard=False,
                 log_to_driver=False)


def run(config: TrainConfig) -> list[dict]:
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}: known recipes are {', '.join(RECIPES)}")
    task = make_task(config.task.name, format_reward=config.task.format_reward)
    connect(config.cluster)
    log = RunLog(config)
    try:
        return RECIPES[config.recipe](config, task, log)
    finally:
        log.close()


@hydra.main(config_path=str(CONFIGS), config_name="config", version_base="1.3")
def main(composed: DictConfig) -> None:
    run(load(composed))


if __name__ == "__main__":
    main()
