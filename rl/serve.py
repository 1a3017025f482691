"""`rl-serve`: a Tinker-compatible HTTP server, so the official `tinker` SDK runs unchanged on our machines.

    rl-serve                                   # SmolLM2-135M-Instruct on 127.0.0.1:8000, storage ./rl-storage
    rl-serve models=[tiny] port=8123 storage=/data/rl
    RL_API_KEYS=tml-alice,tml-bob rl-serve host=0.0.0.0
    RAY_AUTH_MODE=token rl-serve address=auto storage_uri=s3://bucket/rl   # on a Ray cluster's head (docs/cluster.md)

Point the SDK at it with TINKER_BASE_URL=http://HOST:PORT and TINKER_API_KEY=tml-... (any tml- key when the
server has no keys). Without API keys the server is single-user and listens on loopback only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import ray
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rl.config import hydra_schema

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    models: list[str] = field(default_factory=lambda: ["SmolLM2-135M-Instruct"])
    """Base models to serve, by name (rl.models.resolve_model) or local folder."""
    storage: str = "rl-storage"
    """Checkpoints and the run registry; a restarted server on the same folder lists them again."""
    address: str | None = None
    """The Ray to run the learners and samplers on: None starts one in this process; "auto" joins the cluster that
    `ray start` runs on this machine (or RAY_ADDRESS's, as in a Ray job); or the head's HOST:PORT."""
    learner_storage: str | None = None
    """Where the learners keep checkpoints, a folder on their nodes (default: storage/checkpoints)."""
    storage_uri: str | None = None
    """A home for the checkpoints that every node reaches (any fsspec URL: s3://, gs://, file:// of a shared
    mount), as rl-train's: each is uploaded there, and a learner replaced on another node downloads what it lacks."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each learner asks for (`learner_resources={learner_node:1}`), as rl-train's
    learner.resources: on a cluster, the nodes started with them hold the learners."""
    sampler_resources: dict[str, float] = field(default_factory=dict)
    """The same for each sampler replica (`sampler_resources={sampler_node:1}`)."""
    api_keys: list[str] = field(default_factory=list)
    """Each key is one user (tml-...); RL_API_KEYS (comma-separated) adds more. None: single user, loopback."""
    replicas: int = 1
    dtype: str = "float32"
    context: dict[str, int] = field(default_factory=dict)
    """Context length per model (`+context.tiny=512`); a model not named gets its own (max_position_embeddings)."""
    max_lora_rank: int = 128
    """The largest LoRA rank a run may ask for (Tinker serves up to 128 on dense models)."""
    max_loras: int = 4
    max_body_mb: int = 64
    max_batch_datums: int = 1024
    """Datums per forward_backward request."""
    max_batch_tokens: int = 32768
    """Tokens per forward_backward request, all datums together (one datum: at most the model's context)."""
    max_sample_tokens: int = 32768
    """num_samples x max_tokens per sample request."""
    turn_tokens: int = 2048
    """About how many tokens the SDK sends per forward_backward request (it splits larger batches): one request
    is one user's turn at the learner, so this bounds how long a large batch holds other users up."""
    join_users: bool = True
    """The forward_backward calls of the users waiting at a learner go in one pass of it, each row through its own
    run's adapter (exact), rather than one call each (docs/tinker.md, "Turns")."""
    sampler_versions: int = 8
    """Sampler checkpoints each model's pool keeps ready to sample, the most recently sampled or saved: each holds
    its files in Ray's object store and an adapter on every replica (~22 MB for SmolLM2 at rank 16). An older one
    is published again from its checkpoint when next sampled (~0.5 s for SmolLM2)."""


def api_keys(config: ServeConfig) -> list[str]:
    return list(config.api_keys) + [key for key in os.environ.get("RL_API_KEYS", "").split(",") if key.strip()]


def build_service(config: ServeConfig, keys: list[str]):
    """The `Service` that `config` describes, serving `keys` (what `serve` runs; benchmarks build it too)."""
    from rl.service.service import Service

    return Service(config.models, Path(config.storage), keys, replicas=config.replicas, dtype=config.dtype,
                   context=config.context, max_lora_rank=config.max_lora_rank, max_loras=config.max_loras,
                   learner_storage=config.learner_storage, storage_uri=config.storage_uri,
                   max_batch_datums=config.max_batch_datums, max_batch_tokens=config.max_batch_tokens,
                   max_sample_tokens=config.max_sample_tokens, turn_tokens=config.turn_tokens,
                   join_users=config.join_users, sampler_versions=config.sampler_versions,
                   learner_resources=config.learner_resources, sampler_resources=config.sampler_resources)


def serve(config: ServeConfig) -> None:
    keys = api_keys(config)
    if not keys and config.host not in LOOPBACK:
        raise ValueError(f"host={config.host}: with no API keys the server is open to anyone who can reach it, "
                         "so it only listens on loopback; set api_keys or RL_API_KEYS to serve other hosts")
    # Imported after that check: the app imports the service, torch and transformers (~8 s).
    import uvicorn

    from rl.service.app import build_app

    if not ray.is_initialized():
        # "local" when no address is given: Ray's own default joins a cluster running on this machine.
        ray.init(address=config.address or "local", include_dashboard=False, log_to_driver=False)
    service = build_service(config, keys)
    who = f"{len(keys)} API keys" if keys else "no API keys: single user, loopback only"
    devices = ", ".join(sorted(set(service.devices.values())))
    print(f"rl-serve: {', '.join(config.models)} on http://{config.host}:{config.port} ({who}); learners on "
          f"{devices}; storage {Path(config.storage).resolve()}", flush=True)
    try:
        uvicorn.run(build_app(service, max_body_bytes=config.max_body_mb * 2**20), host=config.host,
                    port=config.port, log_level="warning")
    finally:
        service.close()


ConfigStore.instance().store(name="serve_schema", node=hydra_schema(ServeConfig))


@hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "configs"), config_name="serve",
            version_base="1.3")
def main(composed) -> None:
    serve(OmegaConf.to_object(composed))


if __name__ == "__main__":
    main()
