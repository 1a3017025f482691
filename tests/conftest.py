"""Shared fixtures. Models are built in temporary folders: tests never touch the user's cache."""

import os
from pathlib import Path

import pytest

from rl.models import build_tiny_model

# Each vLLM engine's KV cache on CPU where a test does not size it (rl.sampler.engine; Ray's workers and rl-train's
# processes inherit it): vLLM's 1 GiB took ~5 s of every sampler's start, for models that need a few MiB.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "0.125")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama model (seed 0), built once per test session."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def ray_local():
    """An in-process Ray instance shared by every test that needs actors."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_actors(ray_local):
    """`shared_actors(config)`: a learner and sampler pool that tests' runs share one after another, as a sweep's
    runs share them (rl.sweep): each run keeps its own adapter, seeds, folder and checkpoints, and the actors start
    (~15 s on two cores) once for many tests. The set held is replaced when a run needs another (other actor
    settings, `rl.sweep.share_key`; a pool where it has none; a larger LoRA rank than its pool serves), and when
    its learner died (so that one test's lost learner fails that test alone). Tests of what a run does with actors
    of its own (starting them, losing them, the cores they split) start their own."""
    from dataclasses import replace

    import ray

    from rl.driver.run import Shared, samples
    from rl.sweep import share_key

    held: list = []  # (the config its actors started for, the Shared): one set at a time

    def learner_alive(shared) -> bool:
        try:
            ray.get(shared.learner.describe.remote())
            return True
        except ray.exceptions.RayActorError:
            return False

    def serves(started, shared, config) -> bool:
        return (share_key(started) == share_key(config) and config.model.lora_rank <= started.model.lora_rank and
                (shared.pool is not None or not samples(config)) and learner_alive(shared))

    def actors_for(config):
        if held and not serves(*held[0], config):
            held.pop()[1].close()
        if not held:
            # Its pool serves LoRA ranks up to 8 or the run's, so runs of rank 4 and 8 fit.
            started = replace(config, model=replace(config.model, lora_rank=max(8, config.model.lora_rank)))
            held.append((started, Shared.start([started])))
        return held[0][1]

    yield actors_for
    if held:
        held[0][1].close()
