"""One sampler replica: a vLLM engine with LoRA in a Ray actor, which loads published weights and samples.

The silent failure this package exists to prevent: new weights never reach the engine and rollouts keep coming
from stale ones while training looks normal. So every weight version gets a fresh LoRA id (vLLM silently keeps
serving the old weights when an id is reused) and its bytes come through Ray's object store (no shared
filesystem); the replica reports the content hash of what it loaded, and the pool (`rl.sampler.pool`) checks
it and the replica's logprobs on the learner's probe sequence before the version serves. Each response names
the weights that produced it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.memory import resident_memory
from rl.models import resolve_dtype, resolve_model
from rl.sampler.engine import MAX_LOGPROBS, EngineLoop, start_vllm_engine
from rl.types import SampledSequence, SampleRequest, SampleResponse, SamplingParams
from rl.weights import ADAPTER_CONFIG, SamplerWeights, adapter_content_hash

PUBLISH_MODES = ("adapter", "merge")
"""adapter: LoRA adapters hot-loaded side by side, any published version servable (many tenants, one engine).
merge: one version at a time folded into the engine's weights, base-model speed; a request for another version waits
while the engine finishes the merged one's, then that version is merged (a run, or a sweep's runs, that own the
replicas: `VersionTurns`)."""
@dataclass(frozen=True)
class AdapterVersion:
    """One published weight version, as replicas receive it."""

    weights: SamplerWeights
    lora_int_id: int
    """Unique per version: vLLM keeps serving old weights when an id is reused."""

    @property
    def tinker_path(self) -> str:
        return self.weights.tinker_path

    @property
    def step(self) -> int:
        return self.weights.step


class VersionTurns:
    """Merge mode's rule for serving several versions with one set of weights: requests for the merged version run
    together; a request for another version waits until they have finished, then its version is merged and every
    request waiting for it runs together. Versions take turns in the order their first waiting request came, and
    a request for the merged version that comes while another version waits queues behind it, so none starves.

    One switch costs a merge (~0.3 s for SmolLM2 on one core), so a sweep's runs, whose rollouts are bursts of
    requests for one version, sample at base-model speed one run at a time."""

    def __init__(self, switch: Callable[[AdapterVersion | None], Awaitable[None]]):
        self._switch = switch
        """Folds a version (None: the base model) into the weights; called with no request running."""
        self.serving: int | None = None
        """The lora_int_id merged (None: the base model; -1: unknown, after a switch that failed)."""
        self.switches = 0
        self._running = 0
        self._switching = False
        self._waiting: dict[int | None, tuple[AdapterVersion | None, list[asyncio.Future]]] = {}
        """Versions waiting for their turn, in the order their first request came, with those requests."""

    @contextlib.asynccontextmanager
    async def turn(self, version: AdapterVersion | None) -> AsyncIterator[None]:
        """Holds the engine's weights at `version` for as long as the block runs."""
        key = version and version.lora_int_id
        if key == self.serving and not self._switching and not self._waiting:
            self._running += 1
        else:
            admitted = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(key, (version, []))[1].append(admitted)
            self._next()
            try:
                await admitted  # counted in _running once admitted; a failed switch raises here
            except asyncio.CancelledError:
                if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
                    self._running -= 1  # admitted, then cancelled before it ran
                    self._next()
                raise
        try:
            yield
        finally:
            self._running -= 1
            self._next()

    def _next(self) -> None:
        if self._running or self._switching or not self._waiting:
            return
        key, (version, _) = next(iter(self._waiting.items()))
        if key == self.serving:
            self._admit(key, None)
        else:
            self._switching = True
            asyncio.get_running_loop().create_task(self._switch_to(key, version))

    async def _switch_to(self, key: int | None, version: AdapterVersion | None) -> None:
        error = None
        try:
            self.serving = -1  # half-installed until the merge returns
            await self._switch(version)
            self.serving = key
            self.switches += 1
        except Exception as failed:  # its requests hear why; the next version's switch starts from scratch
            error = failed
        finally:
            self._switching = False
        self._admit(key, error)
        self._next()

    def _admit(self, key: int | None, error: Exception | None) -> None:
        _, waiting = self._waiting.pop(key)
        for admitted in waiting:
            if admitted.done():  # its caller gave up waiting
                continue
            if error is not None:
                admitted.set_exception(error)
            else:
                self._running += 1
                admitted.set_result(None)


class Sampler:
    """One vLLM engine with LoRA; many concurrent requests are batched together by its engine loop."""

    def __init__(self, base_model: str, *, max_model_len: int = 1024, max_lora_rank: int = 16, max_loras: int = 4,
                 dtype: str = "float32", seed: int = 0, lora_fast_path: bool = True, publish_mode: str = "adapter",
                 prefix_caching: bool = True, kv_cache_gib: float | None = None, gpu_share: float = 0):
        """`gpu_share`: the replica's num_gpus (on a GPU it shares, vLLM takes that share of its memory)."""
        from vllm.platforms import current_platform

        if publish_mode not in PUBLISH_MODES:
            raise ValueError(f"publish_mode {publish_mode!r}: choose one of {', '.join(PUBLISH_MODES)}")
        fast_path = lora_fast_path and current_platform.is_cpu() and publish_mode == "adapter"
        if fast_path:
            from rl.sampler import vllm_lora_fastpath

            vllm_lora_fastpath.install()
        folder = resolve_model(base_model)
        dtype = resolve_dtype(dtype, "cpu" if current_platform.is_cpu() else "cuda")
        llm = start_vllm_engine(folder, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                max_lora_rank=max_lora_rank if publish_mode == "adapter" else 0, max_loras=max_loras,
                                prefix_caching=prefix_caching, kv_cache_gib=kv_cache_gib, gpu_share=gpu_share)
        self._engine = EngineLoop(llm)
        self._merger = None
        self._turns = VersionTurns(self._switch)
        self._merging = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merge")
        """Merge mode: where merges are computed (`AdapterMerger.prepare`), beside the engine's thread."""
        self._next_merge: tuple[str, asyncio.Task] | None = None
        """Merge mode: the merge `prepare` began, with the content hash of its weights."""
        self._output_lora_refusal = output_lora_refusal(
            publish_mode, fast_path, llm.llm_engine.model_config.architecture,
            llm.apply_model(lambda model: "lm_head" in (getattr(model, "embedding_modules", None) or {}))[0])
        if publish_mode == "merge":
            from rl.sampler.vllm_merge import AdapterMerger

            self._merger = AdapterMerger(llm, folder)
        self._merged_hash: str | None = None
        """Merge mode: the content hash of the files merged last (None: the base model)."""
        config = llm.llm_engine.model_config
        self.vocab_size = config.get_vocab_size()
        self.max_model_len = config.max_model_len
        self.dtype = str(config.dtype).removeprefix("torch.")
        cache = llm.llm_engine.vllm_config.cache_config
        self.kv_cache_tokens = cache.num_gpu_blocks * cache.block_size
        self._adapters = Path(tempfile.mkdtemp(prefix="rl-adapters-"))
        self._loaded: dict[int, Path] = {}

    def describe(self) -> dict[str, int | str]:
        """The engine's vocabulary, context, dtype, and how many tokens its KV cache holds."""
        return {"vocab_size": self.vocab_size, "max_model_len": self.max_model_len, "dtype": self.dtype,
                "kv_cache_tokens": self.kv_cache_tokens}

    async def load(self, version: AdapterVersion,
                   probe: SampleRequest | None = None) -> tuple[str, SampleResponse | None]:
        """Loads a version into the engine; returns the content hash of what it loaded and, with `probe`, the
        version's response to it (merge mode: sampled before any other version is merged again).

        Adapter mode writes the adapter locally and adds it as a LoRA; merge mode folds it into the weights once
        the requests for the version merged before have finished (`VersionTurns`).
        """
        from vllm.lora.request import LoRARequest

        if self._merger is not None:
            prepared = probe and self._prepared(probe)
            async with self._turns.turn(version):  # merged now, unless it already was
                return self._merged_hash, probe and await self._generate(*prepared, probe, version)
        files: dict[str, bytes] = await version.weights.files
        if "lm_head" in json.loads(files[ADAPTER_CONFIG])["target_modules"] and self._output_lora_refusal:
            raise ValueError(f"{version.tinker_path} adapts lm_head, {self._output_lora_refusal}: sample it with "
                             "publish_mode=merge, or train with LoraConfig(train_unembed=False)")
        if version.lora_int_id not in self._loaded:
            folder = self._adapters / f"{version.lora_int_id}-{version.weights.content_hash[:12]}"
            folder.mkdir()
            for name, content in files.items():
                (folder / name).write_bytes(content)
            self._loaded[version.lora_int_id] = folder
        folder = self._loaded[version.lora_int_id]
        request = LoRARequest(folder.name, version.lora_int_id, str(folder))
        await asyncio.wrap_future(self._engine.call(lambda: self._engine.llm.llm_engine.add_lora(request)))
        return adapter_content_hash(files), probe and await self.sample(probe, version)

    async def prepare(self, weights: SamplerWeights) -> None:
        """Merge mode: begins merging `weights` beside the engine, which goes on sampling the merged version, so
        that the switch to them (`load`, once its requests have finished) only installs the merged layers. A run
        publishes its next version while its next rollout still samples: on a CPU the merge then runs on the core
        the learner, done with its step, leaves idle. One merge is kept: a later `prepare` replaces it."""
        if self._merger is not None:
            if self._next_merge is not None:  # its version, if switched to after all, is merged then
                self._next_merge[1].cancel()
            merging = asyncio.ensure_future(self._merged(weights))
            # A merge replaced before its switch fails to no one: its error is retrieved here, not logged as lost
            merging.add_done_callback(lambda task: task.cancelled() or task.exception())
            self._next_merge = (weights.content_hash, merging)

    async def forget(self, lora_int_id: int) -> None:
        """Lets go of a retired version (adapter mode): vLLM's copy of the adapter and its folder here. The pool
        asks once no request for the version is under way."""
        folder = self._loaded.pop(lora_int_id, None)
        if folder is not None:
            def remove() -> None:
                self._engine.llm.llm_engine.remove_lora(lora_int_id)
                shutil.rmtree(folder)

            await asyncio.wrap_future(self._engine.call(remove))

    async def sample(self, request: SampleRequest, version: AdapterVersion | None = None) -> SampleResponse:
        prepared = self._prepared(request)
        if self._merger is not None:
            async with self._turns.turn(version):
                return await self._generate(*prepared, request, version)
        if version is not None and version.lora_int_id not in self._loaded:
            await self.load(version)
        return await self._generate(*prepared, request, version)

    def _prepared(self, request: SampleRequest) -> tuple[list[int], Any]:
        """The request's prompt, checked, and its vLLM sampling parameters."""
        prompt = self._checked_prompt(request)
        return prompt, vllm_sampling_params(request, max_tokens=self._max_tokens(request, len(prompt)))

    async def _generate(self, prompt: list[int], params, request: SampleRequest,
                        version: AdapterVersion | None) -> SampleResponse:
        from vllm.lora.request import LoRARequest

        lora = None
        if version is not None and self._merger is None:
            folder = self._loaded[version.lora_int_id]
            lora = LoRARequest(folder.name, version.lora_int_id, str(folder))
        output = await asyncio.wrap_future(self._engine.generate(prompt, params, lora))
        return _response(output, request, version)

    async def _switch(self, version: AdapterVersion | None) -> None:
        """Merge mode: folds `version` (None: no adapter, the base model) into the engine's weights, with the merge
        `prepare` began for it if there is one."""
        weights = version and version.weights
        if self._next_merge is not None and self._next_merge[0] == (weights and weights.content_hash):
            merging, self._next_merge = self._next_merge[1], None
            content_hash, layers = await merging
        else:
            content_hash, layers = await self._merged(weights)
        await asyncio.wrap_future(self._engine.call(lambda: self._install(layers), drain=True))
        self._merged_hash = content_hash

    async def _merged(self, weights: SamplerWeights | None) -> tuple[str | None, dict]:
        """`weights` (None: the base model) merged in the merge thread: the content hash of the files it merged
        and the merged layers (`AdapterMerger.prepare`)."""
        files = await weights.files if weights is not None else None
        return await asyncio.wrap_future(self._merging.submit(
            lambda: (files and adapter_content_hash(files), self._merger.prepare(files))))

    def _install(self, layers: dict) -> None:
        self._merger.install(layers)
        # Cached KV blocks were computed by the previous weights: reused, they would give prompts the old model's
        # context. vLLM declines (False) while a request holds blocks; the drained engine runs none.
        if not self._engine.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after the weights changed (a request still held blocks): "
                               "cached prompts would be served with the previous weights' keys and values")

    def _checked_prompt(self, request: SampleRequest) -> list[int]:
        prompt = request.prompt.to_ints()
        if not prompt:
            raise ValueError("prompt is empty: sampling needs at least one token")
        for field in ("topk_sample_logprobs", "topk_prompt_logprobs"):
            if getattr(request, field) > MAX_LOGPROBS:
                raise ValueError(f"{field}={getattr(request, field)}: at most {MAX_LOGPROBS} are served")
        if (request.prompt_logprobs_last_n or 0) > len(prompt) - 1:
            raise ValueError(f"prompt_logprobs_last_n={request.prompt_logprobs_last_n}: the prompt has "
                             f"{len(prompt) - 1} tokens with a logprob (all but the first)")
        bad = [token for token in prompt if not 0 <= token < self.vocab_size]
        if bad:
            raise ValueError(f"prompt holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        return prompt

    def _max_tokens(self, request: SampleRequest, prompt_length: int) -> int:
        room = self.max_model_len - prompt_length
        wanted = request.sampling_params.max_tokens or room
        if wanted > room:
            raise ValueError(f"prompt ({prompt_length} tokens) + max_tokens ({wanted}) exceeds the context of "
                             f"{self.max_model_len} tokens")
        return wanted

    def alive(self) -> bool:
        return self._engine.dead is None

    def close(self) -> None:
        """Removes the adapter folders this replica wrote (each lives until its version is retired, `forget`: vLLM
        reads an evicted adapter's folder again when a request asks for it)."""
        self._merging.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._adapters, ignore_errors=True)

    def memory(self, *, reset_peak: bool = False) -> dict[str, float]:
        """This process's resident memory in GiB: now, and its peak since the last reset (rl.memory)."""
        return resident_memory(reset_peak=reset_peak)


def vllm_sampling_params(request: SampleRequest, *, max_tokens: int):
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    params: SamplingParams = request.sampling_params
    stop = params.stop
    stop_strings = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    stop_ids = [s for s in stop or [] if isinstance(s, int)] if not isinstance(stop, str) else []
    prompt_logprobs = None
    if request.prompt_logprobs or request.topk_prompt_logprobs:
        prompt_logprobs = request.topk_prompt_logprobs
    # Greedy decoding gives every sample the same sequence, and vLLM refuses n > 1 with temperature 0: ask for
    # one and repeat it (`_response`).
    return VllmSamplingParams(
        n=1 if params.temperature == 0 else request.num_samples, max_tokens=max_tokens, seed=params.seed,
        temperature=params.temperature,
        top_k=0 if params.top_k == -1 else params.top_k, top_p=params.top_p, stop=stop_strings or None,
        stop_token_ids=stop_ids or None, ignore_eos=stop == [], logprobs=request.topk_sample_logprobs,
        prompt_logprobs=prompt_logprobs, output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _top(step, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of one position's vLLM logprobs (which add the chosen token)."""
    return sorted(((token, entry.logprob) for token, entry in step.items() if entry.rank <= k),
                  key=lambda pair: -pair[1])


def _response(output, request: SampleRequest, version: AdapterVersion | None) -> SampleResponse:
    k = request.topk_sample_logprobs
    sequences = [
        SampledSequence(stop_reason="length" if sample.finish_reason == "length" else "stop",
                        tokens=list(sample.token_ids),
                        logprobs=[step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids,
                                                                              strict=True)],
                        topk_logprobs=[_top(step, k) for step in sample.logprobs] if k else None)
        for sample in output.outputs
    ] * (request.num_samples // len(output.outputs))
    prompt_logprobs = topk = None
    if output.prompt_logprobs is not None:
        tokens = output.prompt_token_ids
        # prompt_logprobs_last_n: only the last n positions are asked for
        first = len(tokens) - request.prompt_logprobs_last_n if request.prompt_logprobs_last_n else 0
        steps = [None if index < first else step for index, step in enumerate(output.prompt_logprobs)]
        prompt_logprobs = [None if step is None else step[token].logprob for step, token in zip(steps, tokens,
                                                                                                 strict=True)]
        if request.topk_prompt_logprobs:
            topk = [None if step is None else _top(step, request.topk_prompt_logprobs) for step in steps]
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs if request.prompt_logprobs else None,
                          topk_prompt_logprobs=topk, model_path=version and version.tinker_path,
                          content_hash=version and version.weights.content_hash)


def output_lora_refusal(publish_mode: str, fast_path: bool, architecture: str, declares_lm_head: bool) -> str | None:
    """Why this engine cannot serve an adapter of lm_head (None: it can)."""
    if publish_mode == "merge":
        return None  # folded into the weights like any layer
    if not declares_lm_head:  # vLLM applies an output-layer LoRA only where lm_head is an "embedding module"
        return f"which vLLM's LoRA does not serve for {architecture}"
    if not fast_path:
        # vLLM's own punica wrappers (punica_cpu / punica_gpu add_lora_logits) pick an output-layer adapter per
        # request, not per row, so prompt logprobs (which verify every publish) would use the wrong weights
        return ("whose prompt logprobs vLLM's own LoRA computes with the wrong adapter (rl's fast path, which fixes "
                "it, runs on CPU only)")
    return None
