"""Saving and loading weights, `tinker://` checkpoint paths, and the listings of runs and checkpoints.

A training run's checkpoints live at `tinker://RUN/weights/NAME` (adapter, optimizer state and step, to resume
training), `tinker://RUN/sampler_weights/NAME` (a PEFT adapter folder, for sampling) and
`tinker://RUN/external_weights/NAME` (a PEFT adapter folder to download, through URLs the server signs).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, model_validator

from rl.types._base import StrictModel, refuse_unsupported
from rl.types.training import AdamOptimizerConfig

CheckpointType = Literal["training", "sampler", "external"]
_PATH_SEGMENTS: dict[str, CheckpointType] = {"weights": "training", "sampler_weights": "sampler",
                                             "external_weights": "external"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


def check_checkpoint_name(name: str) -> str:
    """A checkpoint or run name becomes a folder name: letters, digits and `._:-`, not starting with a dot."""
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"checkpoint name {name!r} must be letters, digits and '._:-', starting with a letter "
                         "or digit")
    return name


class ParsedCheckpointTinkerPath(StrictModel):
    """The parts of a `tinker://RUN/{weights|sampler_weights}/NAME` path."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str
    """`weights/NAME`, `sampler_weights/NAME` or `external_weights/NAME`, as Tinker's REST routes name one."""

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        prefix = "tinker://"
        parts = tinker_path[len(prefix):].split("/") if tinker_path.startswith(prefix) else []
        if len(parts) != 3 or parts[1] not in _PATH_SEGMENTS or not parts[0] or not parts[2]:
            raise ValueError(f"{tinker_path!r} is not a checkpoint path; expected tinker://RUN/weights/NAME, "
                             "tinker://RUN/sampler_weights/NAME or tinker://RUN/external_weights/NAME")
        check_checkpoint_name(parts[2])
        return cls(tinker_path=tinker_path, training_run_id=parts[0], checkpoint_type=_PATH_SEGMENTS[parts[1]],
                   checkpoint_id=f"{parts[1]}/{parts[2]}")

    @property
    def name(self) -> str:
        return self.checkpoint_id.split("/", 1)[1]


class SaveWeightsRequest(StrictModel):
    """Saves a run's adapter and optimizer state as `tinker://RUN/weights/{path}`."""

    model_id: str
    path: str | None = None
    """The checkpoint's name; None names it after the step."""
    seq_id: NonNegativeInt | None = None
    ttl_seconds: int | None = Field(default=None, ge=1)
    """The checkpoint is removed this long after it is saved; None keeps it."""
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    """Kept with the checkpoint and listed with it."""
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(StrictModel):
    path: str
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerRequest(StrictModel):
    """Publishes a run's adapter for sampling, either under a name or straight into a new sampling session."""

    model_id: str
    path: str | None = None
    sampling_session_seq_id: NonNegativeInt | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    """snapshot: the weights as they are now. inflight (weights that follow training) is not supported here."""
    seq_id: NonNegativeInt | None = None
    ttl_seconds: int | None = Field(default=None, ge=1)
    """As in SaveWeightsRequest."""
    user_metadata: dict[str, str] | None = None
    """As in SaveWeightsRequest."""
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"

    @model_validator(mode="after")
    def _check_target(self) -> SaveWeightsForSamplerRequest:
        if (self.path is None) == (self.sampling_session_seq_id is None):
            raise ValueError("give exactly one of path and sampling_session_seq_id")
        refuse_unsupported(self, {"kind": "snapshot"})
        return self


class SaveWeightsForSamplerResponse(StrictModel):
    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"

    @model_validator(mode="after")
    def _check_target(self) -> SaveWeightsForSamplerResponse:
        if self.path is None and self.sampling_session_id is None:
            raise ValueError("give path or sampling_session_id")
        return self


class SaveWeightsExternalRequest(StrictModel):
    """Exports a run's adapter as a PEFT folder at `tinker://RUN/external_weights/{path}`, to download."""

    model_id: str
    path: str
    seq_id: NonNegativeInt | None = None
    ttl_seconds: int | None = Field(default=None, ge=1)
    age_encryption_recipients: list[str] | None = None
    """Not supported here (refused when set)."""
    type: Literal["save_weights_external"] = "save_weights_external"

    @model_validator(mode="after")
    def _check_supported(self) -> SaveWeightsExternalRequest:
        refuse_unsupported(self, {"age_encryption_recipients": None})
        return self


class SaveWeightsExternalResponse(StrictModel):
    path: str
    size_bytes: NonNegativeInt | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class ExternalWeightsUrlsResponse(StrictModel):
    """Where to download each file of an external-weights checkpoint (relative path -> URL), and until when."""

    urls: dict[str, str]
    expires: datetime


class LoadWeightsRequest(StrictModel):
    """Loads a training checkpoint into an existing run (model_id, seq_id) or into a new one (session_id,
    model_seq_id)."""

    path: str
    optimizer: bool
    """Restore the optimizer state and step too, to resume exactly; else only the adapter."""
    model_id: str | None = None
    seq_id: NonNegativeInt | None = None
    session_id: str | None = None
    model_seq_id: NonNegativeInt | None = None
    base_model: str | None = None
    """The checkpoint's base model, when the client knows it (the checkpoint records its own)."""
    user_metadata: dict[str, Any] | None = None
    """Kept with a run created from the checkpoint."""
    optimizer_config: AdamOptimizerConfig | None = None
    weights_access_token: str | None = None
    """For weights outside this server: not supported here (refused when set)."""
    type: Literal["load_weights"] = "load_weights"

    @model_validator(mode="after")
    def _check_addressing(self) -> LoadWeightsRequest:
        if (self.model_id is None) == (self.session_id is None):
            raise ValueError("give model_id (load into a run) or session_id with model_seq_id (create from it)")
        if self.session_id is not None and self.model_seq_id is None:
            raise ValueError("model_seq_id is required with session_id")
        refuse_unsupported(self, {"weights_access_token": None})
        return self


class LoadWeightsResponse(StrictModel):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] = "load_weights"


class Checkpoint(StrictModel):
    """A saved checkpoint as listed by the checkpoint store."""

    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: NonNegativeInt | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None
    """None: never expires."""


TTL_SECONDS_RANGE = (3600, 10 * 365 * 24 * 3600)
"""What set_checkpoint_ttl accepts, as Tinker documents it: one hour to ten years."""


class SetCheckpointTtlRequest(StrictModel):
    ttl_seconds: int | None = Field(ge=TTL_SECONDS_RANGE[0], le=TTL_SECONDS_RANGE[1])
    """None removes the expiry."""


class Cursor(StrictModel):
    """Where a page of a listing starts, how long it is, and how many items there are in all."""

    offset: NonNegativeInt
    limit: NonNegativeInt
    total_count: NonNegativeInt


class CheckpointsListResponse(StrictModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class CheckpointStorageUsage(StrictModel):
    """One owner's stored checkpoints: how many, and their bytes (gigabytes are decimal, 10**9 bytes)."""

    org_user_urn: str
    checkpoint_count: NonNegativeInt
    size_bytes: NonNegativeInt
    size_gigabytes: float


class CheckpointStorageUsageResponse(StrictModel):
    """GET /billing/usage/checkpoints/current: the caller's own checkpoints (there are no projects or rates here)."""

    data: list[CheckpointStorageUsage]


class CheckpointArchiveUrlResponse(StrictModel):
    """Where to download a checkpoint as one archive, and until when that address works."""

    url: str
    expires: datetime


class WeightsInfoRequest(StrictModel):
    """Asks what a checkpoint needs to load: its base model and adapter shape."""

    tinker_path: str
    type: Literal["weights_info"] = "weights_info"


class TrainingRun(StrictModel):
    """A LoRA training run: its base model, owner, adapter rank and latest checkpoints."""

    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, Any] | None = None


class TrainingRunsResponse(StrictModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoResponse(StrictModel):
    """What is needed to load a checkpoint: its base model and adapter shape."""

    base_model: str
    optimizer_config: AdamOptimizerConfig = Field(default_factory=AdamOptimizerConfig)
    is_lora: bool = True
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
