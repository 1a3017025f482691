"""What one request may ask of the server, checked at the HTTP edge before any work is queued.

Each served model has its limits: a datum (training or sampling) fits the model's served context, a
forward_backward request holds at most `max_batch_datums` datums and `max_batch_tokens` tokens, and a sample
request asks for at most `max_sample_tokens` tokens (num_samples x max_tokens). The learner runs any batch inside
these limits within its memory (rl.learner micro-batches by tokens and checkpoints activations of long rows), so
no accepted request can take a worker down. A request over a limit gets a ValueError (the HTTP 400) that names
the field, its value and the limit; `capabilities` lists them for clients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rl.types import ForwardBackwardInput, SampleRequest


@dataclass(frozen=True)
class Limits:
    context: int
    """Tokens of one datum: a training datum's model_input, or a sampling prompt plus its max_tokens."""
    max_batch_datums: int
    max_batch_tokens: int
    """Tokens of all of a forward_backward request's datums together."""
    max_sample_tokens: int
    """num_samples x max_tokens of one sample request (max_tokens unset: the room left in the context)."""

    def __post_init__(self):
        if self.max_batch_tokens < self.context:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) is below the model's context "
                             f"({self.context}): a datum of the full context could not be trained")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def check_batch(self, batch: ForwardBackwardInput) -> None:
        if len(batch.data) > self.max_batch_datums:
            raise ValueError(f"data holds {len(batch.data)} datums; this server takes at most "
                             f"{self.max_batch_datums} per forward_backward (max_batch_datums): split the batch")
        total = 0
        for index, datum in enumerate(batch.data):
            length = datum.model_input.length
            if length > self.context:
                raise ValueError(f"data[{index}].model_input has {length} tokens, over the model's context of "
                                 f"{self.context}")
            total += length
        if total > self.max_batch_tokens:
            raise ValueError(f"data holds {total} tokens in all; this server takes at most {self.max_batch_tokens} "
                             "per forward_backward (max_batch_tokens): split the batch")

    def check_sample(self, request: SampleRequest) -> None:
        prompt = request.prompt.length
        if prompt >= self.context:
            raise ValueError(f"prompt has {prompt} tokens; the model's context of {self.context} leaves no room to "
                             "sample")
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and prompt + max_tokens > self.context:
            raise ValueError(f"prompt ({prompt} tokens) + sampling_params.max_tokens ({max_tokens}) exceeds the "
                             f"model's context of {self.context} tokens")
        each = max_tokens or self.context - prompt
        if request.num_samples * each > self.max_sample_tokens:
            raise ValueError(f"num_samples x sampling_params.max_tokens = {request.num_samples} x {each} = "
                             f"{request.num_samples * each} tokens; this server samples at most "
                             f"{self.max_sample_tokens} per request (max_sample_tokens): ask in several requests")
