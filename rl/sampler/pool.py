"""The sampler pool: N replicas (`rl.sampler.replica`) behind one `sample`, and verified weight publishing.

`publish` loads a version the learner saved for sampling (`rl.weights.SamplerWeights`) into every replica and
verifies each: the content hash of what it loaded, and its prompt logprobs on the probe sequence against the
learner's, within a tolerance set by the engine's dtype. A mismatch is a `WeightSyncError`, never a stale
rollout. Requests go to the replica with the least outstanding work; a replica that dies is replaced and its
requests are retried once elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from rl.sampler.engine import EngineDeadError
from rl.sampler.replica import AdapterVersion, Sampler
from rl.types import ModelInput, SampleRequest, SampleResponse, SamplingParams
from rl.weights import SamplerWeights

# Mean |difference| allowed between a replica's and the learner's probe logprobs: an absolute part plus a part
# relative to the probe's mean |logprob|, by engine dtype. Measured: ~2e-6 in float32. In bfloat16 the two
# implementations (PEFT adds LoRA in float32, vLLM in bf16) drift apart as the adapter grows, and the probe's
# random tokens have large |logprob| that bf16 rounds coarsely: 0.16 (about 1% of the mean |logprob|) after 17
# steps of the main job, so bf16 gets a relative allowance.
SYNC_TOLERANCE = {"float32": (1e-3, 0.0), "bfloat16": (0.05, 0.02), "float16": (0.05, 0.02)}


class WeightSyncError(RuntimeError):
    """A replica does not serve the weights it was given: wrong bytes, or logprobs that disagree."""


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
                 tolerance: float | None = None, threads: int | None = None, prefix_caching: bool = True,
                 kv_cache_gib: float | None = None):
        """`tolerance` (mean |logprob difference| on the probe) overrides the default for the engine's dtype;
        `publish_mode` is one of PUBLISH_MODES; `threads`: each replica's CPU threads (None: its num_cpus);
        `kv_cache_gib`: each replica's KV cache (None: vLLM's default, 1 GiB on CPU).

        vLLM on CPU serves on OMP_NUM_THREADS threads, which Ray sets to an actor's num_cpus when the process
        starts; it has to be set then (runtime_env), not later: OpenMP gives each new thread, the engine's
        included, the count the process started with, and vLLM's CPU attention fails when two threads disagree.
        On 2 cores SmolLM2 sampled ~140 tokens/s on one thread and ~230 on two."""
        self.base_model = base_model
        self._actor_class = ray.remote(Sampler)
        self._actor_options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources or {},
                               "max_restarts": 0}
        if threads is not None:
            self._actor_options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
        self._placement = (placement_group, first_bundle)
        """Replica i runs in bundle first_bundle + i of the placement group, when there is one."""
        self._kwargs = {"max_model_len": max_model_len, "max_lora_rank": max_lora_rank, "max_loras": max_loras,
                        "dtype": dtype, "seed": seed, "lora_fast_path": lora_fast_path,
                        "publish_mode": publish_mode, "prefix_caching": prefix_caching, "kv_cache_gib": kv_cache_gib,
                        "gpu_share": num_gpus}
        self._engines_started = itertools.count()
        self._replicas = [_Replica(self._start_actor(index)) for index in range(replicas)]
        self.info = ray.get(self._replicas[0].actor.describe.remote())
        self.tolerance = (tolerance, 0.0) if tolerance is not None else SYNC_TOLERANCE.get(self.info["dtype"],
                                                                                          (0.05, 0.02))
        self._versions: dict[str, AdapterVersion | None] = {}
        """Every published model path -> its version; None once retired (`retire`): its files (~22 MB of Ray's
        object store for SmolLM2 at rank 16) are let go, and nothing samples it until it is published again."""
        self._lora_ids = itertools.count(1)
        self._sessions: dict[str, str | None] = {}
        self._in_flight: dict[int, int] = {}
        """lora_int_id -> the requests for that version under way."""

    def _start_actor(self, index: int) -> ray.actor.ActorHandle:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, first_bundle = self._placement
        options = dict(self._actor_options)
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=first_bundle + index)
        # Each engine, a replacement too, seeds the noise of unseeded requests its own way: replicas started
        # alike would otherwise answer the same unseeded request alike, and a replacement replay its predecessor.
        seed = self._kwargs["seed"] + next(self._engines_started)
        return self._actor_class.options(**options).remote(self.base_model, **{**self._kwargs, "seed": seed})

    # ---- weights ---------------------------------------------------------------------------------------------

    async def publish(self, weights: SamplerWeights) -> AdapterVersion:
        """Loads weights the learner saved for sampling into every replica and verifies each; returns the version
        now servable. The driver and the service publish through this alone."""
        version = AdapterVersion(weights=weights, lora_int_id=next(self._lora_ids))
        outcomes = await asyncio.gather(*(self._verify_or_replace(replica, version) for replica in self._replicas),
                                        return_exceptions=True)
        if failed := next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None):
            if all(other is None or other.lora_int_id != version.lora_int_id for other in self._versions.values()):
                self._let_go(version)  # nothing can sample a version that failed: the replicas' copies go
            raise failed
        replaced, self._versions[version.tinker_path] = self._versions.get(version.tinker_path), version
        if replaced is not None:  # the path saved again (overwrite): its former version goes as a retired one does
            self._let_go(replaced)
        return version

    def prepare(self, weights: SamplerWeights) -> None:
        """Merge mode: each replica begins merging `weights` beside the version it serves (`Sampler.prepare`), so
        that their `publish`, once that version's requests have finished, costs little more than the check. Not
        awaited: what goes wrong is reported by the publish."""
        if self._kwargs["publish_mode"] == "merge":
            for replica in self._replicas:
                replica.actor.prepare.remote(weights)

    async def _verify_or_replace(self, replica: _Replica, version: AdapterVersion) -> None:
        """A replica that died is replaced; its successor loads and verifies the version on first use."""
        try:
            await self._verify(replica, version)
        except (ray.exceptions.RayActorError, EngineDeadError):
            self._replace(replica)

    async def _verify(self, replica: _Replica, version: AdapterVersion) -> None:
        weights = version.weights
        probe = SampleRequest(prompt=ModelInput.from_ints(weights.probe_tokens), prompt_logprobs=True,
                              sampling_params=SamplingParams(max_tokens=1, temperature=0.0))
        loaded_hash, probed = await replica.actor.load.remote(version, probe)
        if loaded_hash != weights.content_hash:
            raise WeightSyncError(f"a replica loaded {version.tinker_path} with content hash {loaded_hash[:12]}, "
                                  f"expected {weights.content_hash[:12]}")
        served = probed.prompt_logprobs[1:]
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
        if model_path is not None and version is None:
            raise ValueError(f"model_path {model_path}: retired (a run's version once a newer one served, or the "
                             "least recently sampled of many); publish it again to sample it")
        work = request.num_samples * (request.sampling_params.max_tokens or self.info["max_model_len"])
        with self._sampling(version):
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

    @contextlib.contextmanager
    def _sampling(self, version: AdapterVersion | None) -> Iterator[None]:
        """Counts a request for `version` as under way; a version no longer served (retired or replaced) meanwhile
        is let go after the last."""
        if version is None:
            yield
            return
        key = version.lora_int_id
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
                if self._versions.get(version.tinker_path) is not version:
                    self._let_go(version)

    def retire(self, model_path: str) -> None:
        """Lets go of a published version that nobody will sample again (a run's previous version, once its next
        one serves; a server's least recently sampled): its files in Ray's object store (~22 MB for SmolLM2 at rank
        16) and, once no request for it is under way, each replica's copy. Sampling it then needs a new publish."""
        version = self._version(model_path)
        self._versions[model_path] = None
        if version is not None:
            self._let_go(version)

    def _let_go(self, version: AdapterVersion) -> None:
        """Every replica forgets a version no longer served, unless requests for it are under way (then the last
        of them lets it go, `_sampling`)."""
        if version.lora_int_id in self._in_flight:
            return
        for replica in self._replicas:
            replica.verified.discard(version.lora_int_id)
            replica.actor.forget.remote(version.lora_int_id)  # not awaited: one that died has nothing to forget

    def published(self, model_path: str) -> bool:
        """Whether `model_path` can be sampled now: published, and not retired since."""
        return self._versions.get(model_path) is not None

    def _version(self, model_path: str) -> AdapterVersion | None:
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
