"""Sampling: vLLM replicas on Ray that hot-load LoRA adapters and prove every load, and a pool that routes.

The silent failure this module exists to prevent: new weights never reach the engine and rollouts keep coming
from stale ones while training looks normal. So every weight version gets a fresh LoRA id (vLLM silently keeps
serving the old weights when an id is reused), travels as bytes through Ray's object store (no shared
filesystem), and is verified on each replica before it serves: the replica reports the content hash of what it
loaded, and its prompt logprobs on a fixed probe sequence must match the learner's within a tolerance set by
the engine's dtype. A mismatch is a `WeightSyncError`, never a stale rollout. Each response names the weights
that produced it.

`Sampler` is one replica (a Ray actor class); `SamplerPool` owns N of them, routes each request to the replica
with the least outstanding work, replaces a replica that dies and retries its requests once elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rl.engine import EngineDeadError, EngineLoop, start_vllm_engine
from rl.memory import resident_memory
from rl.models import resolve_model
from rl.types import ModelInput, SampledSequence, SampleRequest, SampleResponse, SamplingParams
from rl.weights import ADAPTER_CONFIG, SamplerWeights, adapter_content_hash

PUBLISH_MODES = ("adapter", "merge")
"""adapter: LoRA adapters hot-loaded side by side, any published version servable (many tenants, one engine).
merge: the latest version folded into the engine's weights, base-model speed (a run that owns its replicas)."""
# Mean |difference| allowed between a replica's and the learner's probe logprobs: an absolute part plus a part
# relative to the probe's mean |logprob|, by engine dtype. Measured: ~2e-6 in float32. In bfloat16 the two
# implementations (PEFT adds LoRA in float32, vLLM in bf16) drift apart as the adapter grows, and the probe's
# random tokens have large |logprob| that bf16 rounds coarsely: 0.16 (about 1% of the mean |logprob|) after 17
# steps of the main job, so bf16 gets a relative allowance.
SYNC_TOLERANCE = {"float32": (1e-3, 0.0), "bfloat16": (0.05, 0.02), "float16": (0.05, 0.02)}


class WeightSyncError(RuntimeError):
    """A replica does not serve the weights it was given: wrong bytes, or logprobs that disagree."""


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


class Sampler:
    """One vLLM engine with LoRA; many concurrent requests are batched together by its engine loop."""

    def __init__(self, base_model: str, *, max_model_len: int = 1024, max_lora_rank: int = 16, max_loras: int = 4,
                 dtype: str = "float32", seed: int = 0, lora_fast_path: bool = True, publish_mode: str = "adapter"):
        from vllm.platforms import current_platform

        if publish_mode not in PUBLISH_MODES:
            raise ValueError(f"publish_mode {publish_mode!r}: choose one of {', '.join(PUBLISH_MODES)}")
        if lora_fast_path and current_platform.is_cpu() and publish_mode == "adapter":
            from rl import vllm_lora_fastpath

            vllm_lora_fastpath.install()
        folder = resolve_model(base_model)
        llm = start_vllm_engine(folder, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                max_lora_rank=max_lora_rank if publish_mode == "adapter" else 0, max_loras=max_loras)
        self._engine = EngineLoop(llm)
        self._merger = None
        if publish_mode == "merge":
            from rl.vllm_merge import AdapterMerger

            self._merger = AdapterMerger(llm, folder)
        self._merged: int | None = None
        """Merge mode: the lora_int_id of the version in the engine's weights (None: the base model)."""
        config = llm.llm_engine.model_config
        self.vocab_size = config.get_vocab_size()
        self.max_model_len = config.max_model_len
        self.dtype = str(config.dtype).removeprefix("torch.")
        self._adapters = Path(tempfile.mkdtemp(prefix="rl-adapters-"))
        self._loaded: dict[int, Path] = {}

    def describe(self) -> dict[str, int | str]:
        return {"vocab_size": self.vocab_size, "max_model_len": self.max_model_len, "dtype": self.dtype}

    async def load(self, version: AdapterVersion) -> str:
        """Loads a version into the engine; returns the content hash of what it loaded.

        Adapter mode writes the adapter locally and adds it as a LoRA; merge mode folds it into the weights once
        the requests already queued have finished (those queued later see the new weights).
        """
        from vllm.lora.request import LoRARequest

        files: dict[str, bytes] = await version.weights.files
        if "lm_head" in json.loads(files[ADAPTER_CONFIG])["target_modules"]:
            raise ValueError(f"{version.tinker_path} adapts lm_head, which vLLM's LoRA cannot serve (it adapts the "
                             "decoder's linear layers only): train runs meant for sampling with "
                             "LoraConfig(train_unembed=False)")
        if self._merger is not None:
            self._merged = -1  # set before the merge is queued: no request queued after it is stamped as older
            await asyncio.wrap_future(self._engine.call(lambda: self._merge(files), drain=True))
            self._merged = version.lora_int_id
            return adapter_content_hash(files)
        if version.lora_int_id not in self._loaded:
            folder = self._adapters / f"{version.lora_int_id}-{version.weights.content_hash[:12]}"
            folder.mkdir()
            for name, content in files.items():
                (folder / name).write_bytes(content)
            self._loaded[version.lora_int_id] = folder
        folder = self._loaded[version.lora_int_id]
        request = LoRARequest(folder.name, version.lora_int_id, str(folder))
        await asyncio.wrap_future(self._engine.call(lambda: self._engine.llm.llm_engine.add_lora(request)))
        return adapter_content_hash(files)

    async def sample(self, request: SampleRequest, version: AdapterVersion | None = None) -> SampleResponse:
        from vllm.lora.request import LoRARequest

        prompt = self._checked_prompt(request)
        lora = None
        if self._merger is not None:
            wanted = version and version.lora_int_id
            if wanted != self._merged:
                raise ValueError(f"this replica (publish_mode=merge) serves one weight version, not "
                                 f"{version.tinker_path if version else 'the base model'}: publish it first")
        elif version is not None:
            if version.lora_int_id not in self._loaded:
                await self.load(version)
            lora = LoRARequest(self._loaded[version.lora_int_id].name, version.lora_int_id,
                               str(self._loaded[version.lora_int_id]))
        params = vllm_sampling_params(request, max_tokens=self._max_tokens(request, len(prompt)))
        output = await asyncio.wrap_future(self._engine.generate(prompt, params, lora))
        return _response(output, request, version)

    def _merge(self, files: dict[str, bytes]) -> None:
        self._merger.merge(files)
        self._engine.llm.reset_prefix_cache()  # cached KV blocks were computed by the previous weights

    def _checked_prompt(self, request: SampleRequest) -> list[int]:
        prompt = request.prompt.to_ints()
        if not prompt:
            raise ValueError("prompt is empty: sampling needs at least one token")
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
        """Removes the adapter folders this replica wrote (they live as long as it does: vLLM reads an evicted
        adapter's folder again when a request asks for it)."""
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
    return VllmSamplingParams(
        n=request.num_samples, max_tokens=max_tokens, seed=params.seed, temperature=params.temperature,
        top_k=0 if params.top_k == -1 else params.top_k, top_p=params.top_p, stop=stop_strings or None,
        stop_token_ids=stop_ids or None, ignore_eos=stop == [], logprobs=0, prompt_logprobs=prompt_logprobs,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _response(output, request: SampleRequest, version: AdapterVersion | None) -> SampleResponse:
    sequences = [
        SampledSequence(stop_reason="length" if sample.finish_reason == "length" else "stop",
                        tokens=list(sample.token_ids),
                        logprobs=[step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids,
                                                                              strict=True)])
        for sample in output.outputs
    ]
    prompt_logprobs = topk = None
    if output.prompt_logprobs is not None:
        tokens = output.prompt_token_ids
        prompt_logprobs = [None if step is None else step[token].logprob
                           for step, token in zip(output.prompt_logprobs, tokens, strict=True)]
        if request.topk_prompt_logprobs:
            topk = [None if step is None else sorted(((token, entry.logprob) for token, entry in step.items()
                                                      if entry.rank <= request.topk_prompt_logprobs),
                                                     key=lambda pair: -pair[1])
                    for step in output.prompt_logprobs]
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs if request.prompt_logprobs else None,
                          topk_prompt_logprobs=topk, model_path=version and version.tinker_path,
                          content_hash=version and version.weights.content_hash)


@dataclass
class _Replica:
    actor: ray.actor.ActorHandle
    outstanding: int = 0
    """Tokens this replica has still to generate for the requests routed to it."""
    verified: set[int] = field(default_factory=set)
    """The lora_int_ids it has loaded and proven."""


class SamplerPool:
    """N sampler replicas behind one `sample`: least-outstanding-work routing, verified weight publishing."""

    def __init__(self, base_model: str, *, replicas: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                 resources: dict[str, float] | None = None, placement_group=None, first_bundle: int = 0,
                 max_model_len: int = 1024, max_lora_rank: int = 16, max_loras: int = 4, dtype: str = "float32",
                 seed: int = 0, lora_fast_path: bool = True, publish_mode: str = "adapter",
                 tolerance: float | None = None, threads: int | None = None):
        """`tolerance` (mean |logprob difference| on the probe) overrides the default for the engine's dtype;
        `publish_mode` is one of PUBLISH_MODES; `threads`: each replica's CPU threads (None: its num_cpus).

        vLLM on CPU serves on OMP_NUM_THREADS threads, which Ray sets to an actor's num_cpus when the process
        starts; it has to be set then (runtime_env), not later: OpenMP gives each new thread, the engine's
        included, the count the process started with, and vLLM's CPU attention fails when two threads disagree.
        On 2 cores SmolLM2 sampled ~140 tokens/s on one thread and ~230 on two."""
        self.base_model = base_model
        self.publish_mode = publish_mode
        self._actor_class = ray.remote(Sampler)
        self._actor_options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources or {},
                               "max_restarts": 0}
        if threads is not None:
            self._actor_options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
        self._placement = (placement_group, first_bundle)
        """Replica i runs in bundle first_bundle + i of the placement group, when there is one."""
        self._kwargs = {"max_model_len": max_model_len, "max_lora_rank": max_lora_rank, "max_loras": max_loras,
                        "dtype": dtype, "seed": seed, "lora_fast_path": lora_fast_path,
                        "publish_mode": publish_mode}
        self._replicas = [_Replica(self._start_actor(index)) for index in range(replicas)]
        self.info = ray.get(self._replicas[0].actor.describe.remote())
        self.tolerance = (tolerance, 0.0) if tolerance is not None else SYNC_TOLERANCE.get(self.info["dtype"],
                                                                                          (0.05, 0.02))
        self._versions: dict[str, AdapterVersion] = {}
        self._latest: AdapterVersion | None = None
        self._lora_ids = itertools.count(1)
        self._sessions: dict[str, str | None] = {}

    def _start_actor(self, index: int) -> ray.actor.ActorHandle:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, first_bundle = self._placement
        options = dict(self._actor_options)
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=first_bundle + index)
        return self._actor_class.options(**options).remote(self.base_model, **self._kwargs)

    # ---- weights ---------------------------------------------------------------------------------------------

    async def publish(self, weights: SamplerWeights) -> AdapterVersion:
        """Loads weights the learner saved for sampling into every replica and verifies each; returns the version
        now servable. The driver and the service publish through this alone."""
        version = AdapterVersion(weights=weights, lora_int_id=next(self._lora_ids))
        await asyncio.gather(*(self._verify_or_replace(replica, version) for replica in self._replicas))
        self._versions[version.tinker_path] = version
        self._latest = version
        return version

    async def _verify_or_replace(self, replica: _Replica, version: AdapterVersion) -> None:
        """A replica that died is replaced; its successor loads and verifies the version on first use."""
        try:
            await self._verify(replica, version)
        except (ray.exceptions.RayActorError, EngineDeadError):
            self._replace(replica)

    async def _verify(self, replica: _Replica, version: AdapterVersion) -> None:
        if self.publish_mode == "merge":  # the load replaces what the replica served, verified or not
            replica.verified.clear()
        weights = version.weights
        loaded_hash = await replica.actor.load.remote(version)
        if loaded_hash != weights.content_hash:
            raise WeightSyncError(f"a replica loaded {version.tinker_path} with content hash {loaded_hash[:12]}, "
                                  f"expected {weights.content_hash[:12]}")
        request = SampleRequest(prompt=ModelInput.from_ints(weights.probe_tokens), prompt_logprobs=True,
                                sampling_params=SamplingParams(max_tokens=1, temperature=0.0))
        served = (await replica.actor.sample.remote(request, version)).prompt_logprobs[1:]
        difference = sum(abs(a - b) for a, b in zip(served, weights.probe_logprobs, strict=True)) / len(served)
        absolute, relative = self.tolerance
        allowed = absolute + relative * sum(map(abs, weights.probe_logprobs)) / len(served)
        if difference > allowed:
            raise WeightSyncError(f"a replica serving {version.tinker_path} disagrees with the learner on the probe "
                                  f"sequence: mean |logprob difference| {difference:.4f} > tolerance {allowed:.4f} "
                                  "(stale or corrupted weights)")
        replica.verified.add(version.lora_int_id)

    # ---- sampling --------------------------------------------------------------------------------------------

    def create_sampling_session(self, model_path: str | None) -> str:
        """A session bound to a published model path (None: the base model)."""
        if model_path is not None:
            self._version(model_path)
        session_id = f"sampling-{secrets.token_hex(6)}"
        self._sessions[session_id] = model_path
        return session_id

    async def sample(self, request: SampleRequest) -> SampleResponse:
        """Samples on the least busy replica; a replica that dies is replaced and the request retried once."""
        model_path = request.model_path
        if request.sampling_session_id is not None:
            if request.sampling_session_id not in self._sessions:
                raise ValueError(f"unknown sampling_session_id {request.sampling_session_id!r}")
            model_path = self._sessions[request.sampling_session_id]
        if request.base_model is not None and request.base_model != self.base_model:
            raise ValueError(f"base_model {request.base_model!r}: this pool serves {self.base_model!r}")
        version = self._version(model_path) if model_path is not None else None
        if self.publish_mode == "merge" and version is not self._latest:
            raise ValueError(f"model_path {model_path or '(the base model)'}: with publish_mode=merge the pool "
                             f"serves only the latest published version ({self._latest.tinker_path}); "
                             "publish_mode=adapter serves any")
        work = request.num_samples * (request.sampling_params.max_tokens or self.info["max_model_len"])
        for attempt in range(2):
            replica = min(self._replicas, key=lambda r: r.outstanding)
            replica.outstanding += work
            try:
                if version is not None and version.lora_int_id not in replica.verified:
                    await self._verify(replica, version)
                return await replica.actor.sample.remote(request, version)
            except (ray.exceptions.RayActorError, EngineDeadError):
                if attempt == 1:
                    raise
                self._replace(replica)
            finally:
                replica.outstanding -= work
        raise AssertionError("unreachable")

    def published(self, model_path: str) -> bool:
        return model_path in self._versions

    def _version(self, model_path: str) -> AdapterVersion:
        if model_path not in self._versions:
            raise ValueError(f"unknown model path {model_path!r}: publish it before sampling from it")
        return self._versions[model_path]

    def _replace(self, replica: _Replica) -> None:
        """Swaps a dead replica for a fresh one (which loads and verifies adapters on first use)."""
        if replica in self._replicas:
            ray.kill(replica.actor, no_restart=True)
            index = self._replicas.index(replica)
            self._replicas[index] = _Replica(self._start_actor(index))

    async def memory(self, *, reset_peak: bool = False) -> list[dict[str, float]]:
        """Each replica's resident memory (`Sampler.memory`), in replica order."""
        return await asyncio.gather(*(replica.actor.memory.remote(reset_peak=reset_peak)
                                      for replica in self._replicas))

    def shutdown(self) -> None:
        """Stops every replica, each after removing its adapter folders (one that does not answer is stopped
        anyway)."""
        closing = [replica.actor.close.remote() for replica in self._replicas]
        ray.wait(closing, num_returns=len(closing), timeout=30)
        for replica in self._replicas:
            ray.kill(replica.actor, no_restart=True)
