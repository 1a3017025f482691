"""Weights for sampling: what the learner publishes once and every sampler replica proves it serves.

A published version is a PEFT adapter folder's two files, their content hash, and a probe: a fixed token
sequence with the learner's logprobs of it under those weights. The learner computes all of it when it saves
(`Learner.save_weights_for_sampler`), records the hash and the probe with the checkpoint, and puts the files in
Ray's object store, so the bytes go from the learner's node to each replica's without passing through the driver
and no filesystem is shared. The hash is computed once, from the bytes written; a replica checks it once, on
the bytes it loads, and then reproduces the probe's logprobs (`rl.sampler.SamplerPool.publish`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_scale(config: dict) -> float:
    """s in a LoRA's update s * B @ A, from its PEFT adapter_config: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_content_hash(files: dict[str, bytes]) -> str:
    """sha256 over a PEFT adapter's config and weights: what a sampler proves it loaded."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(files[name])
    return digest.hexdigest()


@dataclass(frozen=True)
class SamplerWeights:
    """One published weight version, as the learner hands it to a sampler pool."""

    tinker_path: str
    step: int
    """The learner's optimizer step when the weights were saved."""
    content_hash: str
    files: object
    """A Ray ObjectRef to the adapter's files (dict[str, bytes]: ADAPTER_CONFIG and ADAPTER_WEIGHTS)."""
    probe_tokens: list[int]
    probe_logprobs: list[float]
    """The learner's logprobs of probe_tokens[1:] under these weights: what a replica must reproduce."""
