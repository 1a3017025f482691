"""Training requests and results: creating a LoRA run, forward/backward with a named loss, optimizer steps."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from rl.types._base import StrictModel
from rl.types.tensors import Datum, TensorData

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce",
                     "custom", "dpo", "ipo", "simpo"]
"""The losses a forward_backward can name: the SDK's (rl.losses says which are refused, and why), plus native
one-pass losses over preference pairs: `dpo`, `ipo` and `simpo`."""


class LoraConfig(StrictModel):
    """Which LoRA adapter a training run trains."""

    rank: PositiveInt
    seed: int | None = None
    """Seeds the adapter's initial weights: the same seed gives the same adapter. None draws one at random."""
    train_unembed: bool = True
    """Adapt the output projection (lm_head) too."""
    train_mlp: bool = True
    """Adapt the MLP projections."""
    train_attn: bool = True
    """Adapt the attention projections."""


class AdamOptimizerConfig(StrictModel):
    """The optimizer family, fixed when a run is created. AdamW is the only one."""

    type: Literal["adamw"] = "adamw"


class AdamParams(StrictModel):
    """Hyperparameters of one AdamW step. They may change from step to step (a schedule is the caller's)."""

    learning_rate: NonNegativeFloat = 1e-4
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    eps: PositiveFloat = 1e-12
    weight_decay: NonNegativeFloat = 0.0
    """Decoupled (AdamW) weight decay."""
    grad_clip_norm: NonNegativeFloat = 0.0
    """Clip the global gradient norm to this value before the step; 0 turns clipping off."""


class OptimStepRequest(StrictModel):
    """One AdamW step on a run's accumulated gradients, in the run's seq_id order."""

    model_id: str
    adam_params: AdamParams
    seq_id: NonNegativeInt | None = None
    type: Literal["optim_step"] = "optim_step"


class OptimStepResponse(StrictModel):
    metrics: dict[str, float] | None = None
    """Keys are `name:reduction`, e.g. `grad_norm:mean` (before clipping), `learning_rate:mean`, `step:max`."""


class CreateModelRequest(StrictModel):
    """Creates a LoRA training run on a base model within a client session."""

    session_id: str
    model_seq_id: NonNegativeInt
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: AdamOptimizerConfig = Field(default_factory=AdamOptimizerConfig)
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(StrictModel):
    """Asks for a training run's base model, tokenizer and adapter rank."""

    model_id: str
    type: Literal["get_info"] = "get_info"


class ForwardBackwardInput(StrictModel):
    """A batch of datums, the loss to compute on it, and that loss's settings (e.g. PPO's clip bounds)."""

    data: list[Datum]
    loss_fn: LossFnType
    loss_fn_config: dict[str, float | str] | None = None

    @property
    def tokens(self) -> int:
        """The model_input tokens of all its datums: the work it asks of the learner."""
        return sum(datum.model_input.length for datum in self.data)


class CustomLossInput(StrictModel):
    """One input of a custom loss: `logprobs` first, then the `loss_fn_inputs` keys it reads, with their ranks."""

    name: str
    rank: Literal[0, 1, 2]


class CustomLossNode(StrictModel):
    """One node of a traced custom loss, as torch.fx records it (see rl.custom_loss for how it is read)."""

    op: Literal["placeholder", "get_attr", "call_function", "call_method", "call_module", "output"]
    name: str
    target: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CustomLossGraph(StrictModel):
    format: Literal[1] = 1
    nodes: list[CustomLossNode]


class CreateCustomLossRequest(StrictModel):
    """Stores a custom loss traced by the SDK; `forward_backward` runs it as loss_fn="custom" by its id."""

    session_id: str
    custom_loss_seq_id: NonNegativeInt
    name: str
    inputs: list[CustomLossInput]
    graph: CustomLossGraph
    type: Literal["create_custom_loss"] = "create_custom_loss"


class CreateCustomLossResponse(StrictModel):
    loss_id: str
    type: Literal["create_custom_loss"] = "create_custom_loss"


class ForwardBackwardOutput(StrictModel):
    """Per-datum outputs of the loss (always `logprobs` of the target tokens) and batch metrics.

    Metric keys are `name:reduction` (`loss:sum`, `dpo_accuracy:mean`, ...): the reduction says how the
    metrics of several chunks of one batch combine.
    """

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = Field(default_factory=dict)
