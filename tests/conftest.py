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
