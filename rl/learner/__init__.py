"""The learner: a base model with many LoRA training runs (`learner`), how a batch becomes checked tensors,
micro-batches and target logprobs (`batch`), several runs' calls in one pass (`batching`), and fused forms of its
LoRA layers, target logprobs and CPU attention (`fused`). The losses it computes are named in `rl.losses`."""

from rl.learner.learner import (
    KNOWN_ARCHITECTURES,
    LORA_ALPHA,
    PROBE_LENGTH,
    Learner,
    LearnerActor,
    default_device,
    probe_tokens,
)

__all__ = ["KNOWN_ARCHITECTURES", "LORA_ALPHA", "PROBE_LENGTH", "Learner", "LearnerActor", "default_device",
           "probe_tokens"]
