"""Sampling requests and results, and the sessions that bind a sampler to one model's weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, field_validator, model_validator

from rl.types._base import StrictModel, refuse_unsupported
from rl.types.tensors import ModelInput

StopReason = Literal["length", "stop"]


class SamplingParams(StrictModel):
    """How to draw tokens."""

    max_tokens: PositiveInt | None = None
    """At most this many new tokens; None lets the sampler fill the context."""
    seed: int | None = None
    """The same seed, prompt and weights give the same samples."""
    stop: str | list[str] | list[int] | None = None
    """Stop strings or stop token ids. None keeps the tokenizer's end-of-sequence stop."""
    temperature: NonNegativeFloat = 1.0
    """0 is greedy decoding."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 keeps all."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Keep the smallest set of tokens whose probability reaches top_p."""

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("top_k must be -1 (off) or a positive number of tokens")
        return value


class SampleRequest(StrictModel):
    """Draw `num_samples` continuations of `prompt` from the base model, a saved adapter, or a session's model."""

    num_samples: PositiveInt = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    """A `tinker://RUN/sampler_weights/NAME` path; None samples the base model."""
    sampling_session_id: str | None = None
    seq_id: NonNegativeInt | None = None
    """The request's number within its sampling session; required with sampling_session_id."""
    prompt_logprobs: bool | None = None
    """Also return the logprob of each prompt token given the tokens before it."""
    topk_prompt_logprobs: NonNegativeInt = 0
    """Also return the k most likely tokens at each prompt position, with their logprobs."""
    topk_sample_logprobs: NonNegativeInt = 0
    """Also return the k most likely tokens at each sampled position, with their logprobs (distillation)."""
    prompt_logprobs_last_n: PositiveInt | None = None
    """Prompt logprobs (and top-k) only for the last n prompt tokens; the earlier ones come back as None."""
    prompt_alt_tokens_k: NonNegativeInt = 0
    target_prompt_logprobs: list[int] | None = None
    record_stability_info: bool | None = None
    """The last three: SDK 0.38 options not supported here (refused unless at their defaults)."""
    type: Literal["sample"] = "sample"

    @model_validator(mode="after")
    def _check_session(self) -> SampleRequest:
        if self.sampling_session_id is not None and self.seq_id is None:
            raise ValueError("seq_id is required when sampling_session_id is given")
        if self.prompt_logprobs_last_n is not None and not self.prompt_logprobs:
            raise ValueError("prompt_logprobs_last_n needs prompt_logprobs=True")
        refuse_unsupported(self, {"prompt_alt_tokens_k": 0, "target_prompt_logprobs": None,
                                  "record_stability_info": (None, False)})
        return self


class SampledSequence(StrictModel):
    """One sampled continuation: its tokens, the sampler's logprob of each, and why it stopped."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    topk_logprobs: list[list[tuple[int, float]]] | None = None
    """With topk_sample_logprobs=k: per sampled token, the k most likely (token id, logprob) pairs."""


class SampleResponse(StrictModel):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    """One per prompt token; None for the first token, which has no context."""
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    """Per prompt position, up to k (token id, logprob) pairs; None where undefined."""
    model_path: str | None = None
    """The weights that produced these samples: a `sampler_weights` path, or None for the base model."""
    content_hash: str | None = None
    """The content hash of those weights, as the sampler verified it when it loaded them."""
    type: Literal["sample"] = "sample"


class CreateSamplingSessionRequest(StrictModel):
    """Binds a new sampling session to a base model or to saved sampler weights."""

    session_id: str
    sampling_session_seq_id: NonNegativeInt
    base_model: str | None = None
    model_path: str | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"

    @model_validator(mode="after")
    def _check_target(self) -> CreateSamplingSessionRequest:
        if self.base_model is None and self.model_path is None:
            raise ValueError("give base_model or model_path")
        return self


class CreateSamplingSessionResponse(StrictModel):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"
