"""The typed configuration of a run: the source of truth that Hydra's YAML groups fill in.

`configs/` holds one YAML file per choice of each group (model, algo, task, learner, sampler, cluster, logger)
and one per recipe; `rl-train recipe=NAME key=value ...` composes them and `load()` checks the result against
these dataclasses once (an unknown key or a wrong type is an error naming it). Each component then receives only
its own part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = "SmolLM2-135M-Instruct"
    dtype: str = "bfloat16"
    lora_rank: int = 16
    max_model_len: int = 512


@dataclass
class AlgoConfig:
    loss_fn: str = "importance_sampling"
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    learning_rate: float = 2e-4
    grad_clip_norm: float = 1.0
    prompts_per_step: int = 16
    group_size: int = 4
    temperature: float = 1.0
    max_tokens: int = 32


@dataclass
class TaskConfig:
    name: str = "addition"
    format_reward: float = 0.2
    """Training-only reward for the right format with a wrong answer (0 turns shaping off)."""


@dataclass
class LearnerConfig:
    num_cpus: float = 1
    num_gpus: float = 0
    micro_batch_tokens: int = 2048


@dataclass
class SamplerConfig:
    replicas: int = 1
    num_cpus: float = 1
    num_gpus: float = 0


@dataclass
class ClusterConfig:
    address: str | None = None
    """None starts Ray in this process; "auto" or "ray://HOST:PORT" joins a running cluster."""
    num_cpus: int | None = None


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"
    """"offline" writes a local wandb run; "online" syncs; "disabled" turns wandb off. WANDB_MODE overrides."""
    project: str = "rl"
    group: str | None = None


@dataclass
class TrainConfig:
    recipe: str = "arithmetic_rl"
    steps: int = 30
    seed: int = 0
    eval_every: int = 5
    eval_prompts: int = 64
    output_dir: str = "outputs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def load(composed: DictConfig) -> TrainConfig:
    """Checks a composed Hydra config against `TrainConfig`; a ValueError names an unknown or mistyped key."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, composed)
    except Exception as error:  # omegaconf raises several types; all mean "this config is wrong"
        key = getattr(error, "full_key", None) or "?"
        reason = str(error).splitlines()[0]
        raise ValueError(f"bad configuration at {key}: {reason}") from None
    return OmegaConf.to_object(merged)
