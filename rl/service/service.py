"""What each Tinker endpoint does, on our learner and sampler pool; `rl/service/app.py` maps HTTP onto it.

One learner actor per base model holds every user's LoRA runs (rl.service.learners: users served in turns,
a dead actor replaced and its runs restored); one sampler pool per base model (adapter publish mode: many
tenants on one engine) serves every published adapter. Each request is checked against the model's limits
(rl.service.limits) before it is queued. Model ids follow the SDK's own
scheme, `{session_id}:train:{model_seq_id}`, so runs created by `create_model` and by loading a checkpoint
agree. Training requests run in seq_id order per run (FutureStore); requests arrive as our pydantic request
types (validated at the HTTP edge) and results leave as our pydantic types, which the app encodes as JSON or
protobuf. Everything about checkpoints is asked of the learner that wrote them, so the server needs no
filesystem shared with its learners (they may run on other nodes).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ray

from rl.custom_loss import custom_loss_spec
from rl.devices import actor_gpus, cluster_gpus
from rl.models import context_length, resolve_model
from rl.sampler import SamplerPool
from rl.service.futures import FutureStore
from rl.service.learners import SupervisedLearner
from rl.service.limits import Limits
from rl.service.registry import AccessDenied, Registry
from rl.types import (
    Checkpoint,
    CheckpointsListResponse,
    CheckpointStorageUsage,
    CheckpointStorageUsageResponse,
    CreateCustomLossRequest,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    Cursor,
    ExternalWeightsUrlsResponse,
    ForwardBackwardInput,
    GetInfoRequest,
    LoadWeightsRequest,
    LoraConfig,
    OptimStepRequest,
    ParsedCheckpointTinkerPath,
    SampleRequest,
    SampleResponse,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoRequest,
    WeightsInfoResponse,
)

DOWNLOAD_URL_SECONDS = 3600
"""How long a signed download URL of external weights works."""


class Service:
    def __init__(self, models: list[str], storage: Path | str, api_keys: list[str], *, replicas: int = 1,
                 dtype: str = "float32", context: dict[str, int] | None = None, max_lora_rank: int = 128,
                 max_loras: int = 4, learner_storage: str | None = None, storage_uri: str | None = None,
                 max_batch_datums: int = 1024, max_batch_tokens: int = 32768, max_sample_tokens: int = 32768,
                 turn_tokens: int = 2048, join_users: bool = True, sampler_versions: int = 8,
                 learner_resources: dict[str, float] | None = None, sampler_resources: dict[str, float] | None = None):
        """`storage` holds the registry (runs, ownership, public checkpoints); the learners keep checkpoints in
        `learner_storage` (default: storage/checkpoints), a path on the learners' nodes, and upload them to
        `storage_uri` where given (a home every node reaches: rl.checkpoints.CheckpointStore). `context` sets a
        model's context length; a model it does not name gets its own (rl.models.context_length). The `max_*`
        limits bound each request (rl.service.limits); the SDK is told to split batches into requests of about
        `turn_tokens` tokens, each one turn at the learner (`client_config`); with `join_users`, the waiting
        users' forward_backward calls go in one learner pass (rl.service.learners). Each pool keeps the
        `sampler_versions` sampler checkpoints sampled (or saved) most recently ready to sample; an older one is
        published again from its checkpoint when next asked for. `learner_resources` and `sampler_resources`:
        custom Ray resources each learner and each sampler replica asks for, to place them on a cluster's nodes."""
        if sampler_versions < 1:
            raise ValueError(f"sampler_versions={sampler_versions}: keep at least 1 sampler checkpoint ready")
        self.storage = Path(storage)
        self.registry = Registry(self.storage, api_keys)
        self.futures = FutureStore()
        self.models = {name: str(resolve_model(name)) for name in models}
        self.limits = {name: Limits(context=(context or {}).get(name) or context_length(name),
                                    max_batch_datums=max_batch_datums,
                                    max_batch_tokens=max_batch_tokens, max_sample_tokens=max_sample_tokens)
                       for name in models}
        self.max_lora_rank = max_lora_rank
        self.turn_tokens = turn_tokens
        # Absolute: a learner on another node does not run in this process's working directory.
        checkpoints = str(Path(learner_storage or self.storage / "checkpoints").resolve())
        # Every model's learner and replicas share the cluster's GPUs, if it has any (rl.devices)
        learner_gpus, replica_gpus = actor_gpus(None, None, cluster_gpus=cluster_gpus(), learners=len(models),
                                                replicas=replicas * len(models))
        self.learners = {name: SupervisedLearner(name, self.registry, join_users=join_users, num_gpus=learner_gpus,
                                                resources=learner_resources, storage=checkpoints,
                                                storage_uri=storage_uri, dtype=dtype)
                         for name in models}
        self.pools = {name: SamplerPool(name, replicas=replicas, num_gpus=replica_gpus, resources=sampler_resources,
                                        max_model_len=self.limits[name].context, dtype=dtype,
                                        max_lora_rank=max_lora_rank, max_loras=max_loras, publish_mode="adapter")
                      for name in models}
        self.devices = {name: ray.get(learner.actor.describe.remote())["device"]
                        for name, learner in self.learners.items()}
        """Where each model's learner computes ("cpu", "cuda")."""
        if learner_gpus and "cpu" in self.devices.values():
            self.close()
            raise ValueError(f"the learners have {learner_gpus:g} GPU each, but compute on their CPUs "
                             f"({self.devices}): the torch on their nodes sees no GPU (a CPU build of torch?)")
        self.samplers: dict[str, dict[str, Any]] = {}
        """sampling_session_id -> {"owner", "session_id", "base_model", "model_path"}."""
        self.sampler_versions = sampler_versions
        self._ready: dict[str, OrderedDict[str, None]] = {name: OrderedDict() for name in models}
        """Per base model, the published sampler checkpoints, least recently used first (`_used`)."""
        self._publishing: dict[str, asyncio.Future] = {}
        """Sampler checkpoints being published again, so that requests arriving together publish once."""
        self._url_key = secrets.token_bytes(32)
        """Signs download URLs of external weights; a restarted server signs anew (URLs expire within the hour)."""
        self.custom_losses: dict[str, tuple[str, CreateCustomLossRequest]] = {}
        """loss_id -> (owner, the loss as created); kept for the server's lifetime, as the SDK's session is."""

    @asynccontextmanager
    async def supervising(self):
        """While the server runs: each learner replaced as soon as it dies, not only when a call finds it dead."""
        watchers = [asyncio.ensure_future(learner.watch()) for learner in self.learners.values()]
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        for learner in self.learners.values():
            learner.close()

    # ---- training runs ---------------------------------------------------------------------------------------

    def _base(self, name: str) -> str:
        if name not in self.models:
            raise ValueError(f"base_model {name!r} is not served here; served: {', '.join(self.models)}")
        return name

    def _learner(self, user: str, model_id: str):
        run = self.registry.run(user, model_id)
        self.registry.touch(model_id)
        return self.learners[run["base_model"]]

    def create_model(self, user: str, request: CreateModelRequest) -> str:
        self.registry.check_session(user, request.session_id)
        base = self._base(request.base_model)
        lora = request.lora_config or LoraConfig(rank=32)
        if lora.seed is None:  # drawn here and recorded, so that a replaced learner makes the same adapter again
            lora = lora.model_copy(update={"seed": secrets.randbits(31)})
        if lora.rank > self.max_lora_rank:
            raise ValueError(f"lora_config.rank {lora.rank} exceeds this server's max_lora_rank {self.max_lora_rank}")
        model_id = f"{request.session_id}:train:{request.model_seq_id}"

        async def create() -> dict:
            await self.learners[base].call(user, model_id, "create", base, lora, model_id=model_id)
            self.registry.add_run(user, model_id, base, lora.model_dump(), request.user_metadata)
            return {"model_id": model_id}

        return self.futures.submit(user, create, key=("new run", model_id))  # a resend: the same request

    def get_info(self, user: str, request: GetInfoRequest) -> dict:
        run = self.registry.run(user, request.model_id)
        return {"model_id": request.model_id, "is_lora": True, "lora_rank": run["lora"]["rank"],
                "model_data": {"model_name": run["base_model"], "tokenizer_id": self.models[run["base_model"]]}}

    def create_custom_loss(self, user: str, request: CreateCustomLossRequest) -> str:
        """Checks the traced graph against rl.custom_loss's allow-list (a ValueError names the node) and keeps it."""
        self.registry.check_session(user, request.session_id)
        custom_loss_spec(request.name, request.inputs, request.graph)
        loss_id = f"{request.session_id}:loss:{request.custom_loss_seq_id}"
        self.custom_losses[loss_id] = (user, request)

        async def created() -> dict:
            return {"loss_id": loss_id}

        return self.futures.submit(user, created)

    def _custom_loss(self, user: str, batch: ForwardBackwardInput) -> CreateCustomLossRequest | None:
        if batch.loss_fn != "custom":
            return None
        loss_id = (batch.loss_fn_config or {}).get("loss_id")
        owner, request = self.custom_losses.get(loss_id, (None, None))
        if owner != user:
            raise ValueError(f"loss_fn_config['loss_id'] {loss_id!r} names no custom loss of this user's "
                             "sessions (create it with ServiceClient.create_custom_loss)")
        return request

    def forward_backward(self, user: str, model_id: str, seq_id: int, batch: ForwardBackwardInput,
                         forward_only: bool) -> str:
        learner = self._learner(user, model_id)
        try:
            custom_loss = self._custom_loss(user, batch)
            self.limits[learner.base_model].check_batch(batch)
        except ValueError as error:
            self.futures.refused(user, model_id, seq_id, error)
            raise
        method = "forward" if forward_only else "forward_backward"
        return self.futures.submit_ordered(user, model_id, seq_id, lambda: learner.call(
            user, model_id, method, model_id, batch, custom_loss=custom_loss))

    def optim_step(self, user: str, request: OptimStepRequest) -> str:
        learner, model_id = self._learner(user, request.model_id), request.model_id
        return self.futures.submit_ordered(user, model_id, request.seq_id,
                                           lambda: learner.call(user, model_id, "optim_step", model_id,
                                                                request.adam_params))

    def save_weights(self, user: str, request: SaveWeightsRequest) -> str:
        learner, model_id = self._learner(user, request.model_id), request.model_id
        return self.futures.submit_ordered(user, model_id, request.seq_id, lambda: learner.call(
            user, model_id, "save_weights", model_id, request.path, overwrite=request.overwrite,
            ttl_seconds=request.ttl_seconds, user_metadata=request.user_metadata))

    def save_weights_for_sampler(self, user: str, request: SaveWeightsForSamplerRequest) -> str:
        """Saves and publishes to the pool; with `sampling_session_seq_id`, answers with a sampling session."""
        model_id = request.model_id
        learner, base = self._learner(user, model_id), self.registry.run(user, model_id)["base_model"]
        name = request.path or f"sampler-{request.seq_id}-{secrets.token_hex(3)}"

        async def save() -> dict:
            version = await self.pools[base].publish(await learner.call(
                user, model_id, "save_weights_for_sampler", model_id, name, ttl_seconds=request.ttl_seconds,
                user_metadata=request.user_metadata))
            self._used(base, version.tinker_path)
            if request.sampling_session_seq_id is None:
                return {"path": version.tinker_path}
            return {"sampling_session_id": self._new_sampler(user, model_id.split(":")[0], base,
                                                             version.tinker_path)}

        return self.futures.submit_ordered(user, model_id, request.seq_id, save)

    def save_weights_external(self, user: str, request: SaveWeightsExternalRequest) -> str:
        learner, model_id = self._learner(user, request.model_id), request.model_id
        return self.futures.submit_ordered(user, model_id, request.seq_id, lambda: learner.call(
            user, model_id, "save_weights_external", model_id, request.path, ttl_seconds=request.ttl_seconds))

    async def external_weights_urls(self, user: str, model_id: str, checkpoint_id: str,
                                    base_url: str) -> ExternalWeightsUrlsResponse:
        """Download URLs for each file of an external-weights checkpoint, signed by this server, valid an hour."""
        path = self._owned_checkpoint(user, model_id, checkpoint_id)
        if ParsedCheckpointTinkerPath.from_tinker_path(path).checkpoint_type != "external":
            raise ValueError(f"{path} is not an external_weights checkpoint (save_weights_external makes them)")
        learner = self.learners[self.registry.run(user, model_id)["base_model"]]
        expires = datetime.now(UTC) + timedelta(seconds=DOWNLOAD_URL_SECONDS)
        names = await learner.ask("checkpoint_files", path)
        return ExternalWeightsUrlsResponse(expires=expires, urls={
            name: f"{base_url.rstrip('/')}/api/v1/external_files/{self._sign(path, name, expires)}" for name in names})

    def _sign(self, path: str, name: str, expires: datetime) -> str:
        payload = base64.urlsafe_b64encode(json.dumps([path, name, int(expires.timestamp())]).encode()).decode()
        return f"{payload}.{self._signature(payload)}"

    def _signature(self, payload: str) -> str:
        return hmac.new(self._url_key, payload.encode(), hashlib.sha256).hexdigest()

    async def external_file(self, token: str) -> bytes:
        """The file a signed URL names, if its signature is this server's and it has not expired."""
        payload, _, signature = token.partition(".")
        if not hmac.compare_digest(signature, self._signature(payload)):
            raise AccessDenied("this download URL's signature is not valid")
        path, name, expires = json.loads(base64.urlsafe_b64decode(payload))
        if time.time() > expires:
            raise AccessDenied("this download URL has expired; ask for new ones (get_external_weights_urls)")
        run = self.registry.runs[ParsedCheckpointTinkerPath.from_tinker_path(path).training_run_id]
        return await self.learners[run["base_model"]].ask("checkpoint_file", path, name)

    def load_weights(self, user: str, request: LoadWeightsRequest) -> str:
        path, optimizer = request.path, request.optimizer
        base = self._checkpoint_base(user, path)
        if request.model_id is not None:  # into an existing run, in its seq_id order
            learner, model_id = self._learner(user, request.model_id), request.model_id
            return self.futures.submit_ordered(user, model_id, request.seq_id, lambda: learner.call(
                user, model_id, "load_weights", path, optimizer=optimizer, model_id=model_id))
        self.registry.check_session(user, request.session_id)
        model_id = f"{request.session_id}:train:{request.model_seq_id}"

        async def load() -> dict:
            info = await self.learners[base].ask("weights_info", path)
            lora = LoraConfig(rank=info.lora_rank, train_unembed=info.train_unembed, train_mlp=info.train_mlp,
                              train_attn=info.train_attn)
            await self.learners[base].call(user, model_id, "load_weights", path, optimizer=optimizer,
                                           model_id=model_id)
            # Registered as soon as it exists (nothing awaited between): a replacement restores every registered run
            self.registry.add_run(user, model_id, base, lora.model_dump(), request.user_metadata)
            return {"path": path, "model_id": model_id}

        return self.futures.submit(user, load, key=("new run", model_id))  # a resend: the same request

    def _checkpoint_base(self, user: str, path: str) -> str:
        """The base model of a checkpoint `user` may read (theirs or public): its learner holds the checkpoint."""
        run = self.registry.runs.get(ParsedCheckpointTinkerPath.from_tinker_path(path).training_run_id)
        if run is None or not self.registry.readable(user, path):
            raise ValueError(f"no checkpoint at {path}")
        return run["base_model"]

    # ---- sampling --------------------------------------------------------------------------------------------

    async def create_sampling_session(self, user: str, request: CreateSamplingSessionRequest) -> dict:
        self.registry.check_session(user, request.session_id)
        path = request.model_path
        if path is None:
            return {"sampling_session_id": self._new_sampler(user, request.session_id,
                                                             self._base(request.base_model or ""), None)}
        base = self._checkpoint_base(user, path)
        await self._publish(base, path)
        return {"sampling_session_id": self._new_sampler(user, request.session_id, base, path)}

    async def _publish(self, base: str, path: str) -> None:
        """Makes a sampler checkpoint ready to sample: published again (verified) when it was saved earlier (by
        another run, before a restart, or let go as the least recently used), and marked as used."""
        while not self.pools[base].published(path):  # again if retired while it was published (many in use)
            if path not in self._publishing:
                async def publish() -> None:
                    try:
                        await self.pools[base].publish(await self.learners[base].ask("sampler_weights", path))
                    finally:
                        del self._publishing[path]

                self._publishing[path] = asyncio.ensure_future(publish())
            await asyncio.shield(self._publishing[path])
        self._used(base, path)

    def _used(self, base: str, path: str) -> None:
        """Marks a published sampler checkpoint as the most recently used; retires the least recently used beyond
        `sampler_versions` (their files and each replica's adapter let go: every save would otherwise hold ~22 MB
        of Ray's object store for SmolLM2 at rank 16, as long as the server runs)."""
        ready = self._ready[base]
        ready[path] = None
        ready.move_to_end(path)
        while len(ready) > self.sampler_versions:
            self.pools[base].retire(ready.popitem(last=False)[0])

    def _new_sampler(self, user: str, session_id: str, base: str, path: str | None) -> str:
        sampler_id = self.pools[base].create_sampling_session(path)
        self.samplers[sampler_id] = {"owner": user, "session_id": session_id, "base_model": base, "model_path": path}
        return sampler_id

    def list_sessions(self, user: str, limit: int, offset: int) -> dict:
        """The user's sessions on this server since it started, newest first."""
        owned = [sid for sid, session in reversed(self.registry.sessions.items()) if session["owner"] == user]
        return {"sessions": owned[offset:offset + limit]}

    def get_session(self, user: str, session_id: str) -> dict:
        """A session's training runs (theirs by id: SESSION:train:N) and sampling sessions, with its metadata."""
        session = self.registry.check_session(user, session_id)
        runs = [model_id for model_id, _ in self.registry.owned_runs(user) if model_id.startswith(f"{session_id}:")]
        samplers = [sid for sid, sampler in self.samplers.items() if sampler["session_id"] == session_id]
        return {"training_run_ids": runs, "sampler_ids": samplers, "user_metadata": session["user_metadata"],
                "display_name": session["display_name"]}

    def sampler(self, user: str, sampler_id: str) -> dict:
        found = self.samplers.get(sampler_id)
        if found is None or found["owner"] != user:
            raise ValueError(f"unknown sampling session {sampler_id!r}")
        return found

    def sample(self, user: str, request: SampleRequest) -> str:
        if request.sampling_session_id is not None:
            base = self.sampler(user, request.sampling_session_id)["base_model"]
        else:
            path = request.model_path
            base = self._checkpoint_base(user, path) if path else self._base(request.base_model or "")
            if request.base_model is not None and request.base_model != base:
                raise ValueError(f"base_model {request.base_model!r} disagrees with model_path {path!r}, whose base "
                                 f"model is {base!r}")
            request = request.model_copy(update={"base_model": None})
        self.limits[base].check_sample(request)
        key = (request.sampling_session_id, request.seq_id) if request.sampling_session_id else None
        path = (self.samplers[request.sampling_session_id]["model_path"] if request.sampling_session_id
                else request.model_path)

        async def sample() -> SampleResponse:
            if path is not None:
                await self._publish(base, path)
            return await self.pools[base].sample(request)

        return self.futures.submit(user, sample, key=key)

    # ---- listings --------------------------------------------------------------------------------------------

    async def training_runs(self, user: str, limit: int, offset: int) -> TrainingRunsResponse:
        owned = self.registry.owned_runs(user)
        page = [await self.training_run(user, model_id) for model_id, _ in owned[offset:offset + limit]]
        return TrainingRunsResponse(training_runs=page, cursor=Cursor(offset=offset, limit=limit,
                                                                     total_count=len(owned)))

    async def training_run(self, user: str, model_id: str) -> TrainingRun:
        run = self.registry.run(user, model_id)
        checkpoints = (await self.run_checkpoints(user, model_id)).checkpoints
        latest = {kind: next((c for c in reversed(checkpoints) if c.checkpoint_type == kind), None)
                  for kind in ("training", "sampler")}
        return TrainingRun(training_run_id=model_id, base_model=run["base_model"], model_owner=run["owner"],
                           lora_rank=run["lora"]["rank"], last_request_time=run["last_request_time"],
                           last_checkpoint=latest["training"], last_sampler_checkpoint=latest["sampler"],
                           user_metadata=run["user_metadata"])

    async def run_checkpoints(self, user: str, model_id: str) -> CheckpointsListResponse:
        run = self.registry.run(user, model_id)
        listed = await self.learners[run["base_model"]].ask("list_checkpoints", model_id)
        return CheckpointsListResponse(checkpoints=[self._public(c) for c in listed.checkpoints])

    async def user_checkpoints(self, user: str, limit: int | None, offset: int) -> CheckpointsListResponse:
        every = [checkpoint for model_id, _ in self.registry.owned_runs(user)
                 for checkpoint in (await self.run_checkpoints(user, model_id)).checkpoints]
        limit = len(every) if limit is None else limit
        return CheckpointsListResponse(checkpoints=every[offset:offset + limit],
                                       cursor=Cursor(offset=offset, limit=limit, total_count=len(every)))

    async def checkpoint_storage_usage(self, user: str, project_id: str | None) -> CheckpointStorageUsageResponse:
        if project_id is not None:
            raise ValueError(f"project_id {project_id!r}: rl-serve has no projects; ask without it for your own usage")
        every = (await self.user_checkpoints(user, None, 0)).checkpoints
        size = sum(checkpoint.size_bytes or 0 for checkpoint in every)
        return CheckpointStorageUsageResponse(data=[CheckpointStorageUsage(
            org_user_urn=user, checkpoint_count=len(every), size_bytes=size, size_gigabytes=size / 1e9)])

    def _public(self, checkpoint: Checkpoint) -> Checkpoint:
        return checkpoint.model_copy(update={"public": checkpoint.tinker_path in self.registry.public})

    async def set_public(self, user: str, model_id: str, checkpoint_id: str, public: bool) -> None:
        path = self._owned_checkpoint(user, model_id, checkpoint_id)
        await self.weights_info(user, WeightsInfoRequest(tinker_path=path))  # it must exist
        self.registry.set_public(path, public)

    async def set_checkpoint_ttl(self, user: str, model_id: str, checkpoint_id: str, ttl_seconds: int | None) -> None:
        path = self._owned_checkpoint(user, model_id, checkpoint_id)
        await self.learners[self.registry.run(user, model_id)["base_model"]].ask("set_checkpoint_ttl", path,
                                                                                 ttl_seconds)

    async def delete_checkpoint(self, user: str, model_id: str, checkpoint_id: str) -> None:
        path = self._owned_checkpoint(user, model_id, checkpoint_id)
        base = self.registry.run(user, model_id)["base_model"]
        await self.learners[base].ask("delete_checkpoint", path)
        self.registry.set_public(path, False)
        if self.pools[base].published(path):  # nothing samples a deleted checkpoint
            self._ready[base].pop(path, None)
            self.pools[base].retire(path)

    def _owned_checkpoint(self, user: str, model_id: str, checkpoint_id: str) -> str:
        self.registry.run(user, model_id)
        return f"tinker://{model_id}/{checkpoint_id}"

    async def weights_info(self, user: str, request: WeightsInfoRequest) -> WeightsInfoResponse:
        base = self._checkpoint_base(user, request.tinker_path)
        return await self.learners[base].ask("weights_info", request.tinker_path)

    def client_config(self) -> dict:
        """What the SDK asks at start: among it, how to split a forward_backward batch into requests. Each
        request is one turn at the learner (rl.service.learners), so requests of about `turn_tokens` tokens keep
        a user's large batch from holding the others up for long, and keep each within max_batch_datums and
        max_batch_tokens. (The SDK counts a datum's bytes; a token takes at least 8, its id and its target's,
        and usually 12-24 with weights or advantages.)"""
        limits = list(self.limits.values())
        tokens = min([self.turn_tokens] + [limit.max_batch_tokens for limit in limits])
        return {"use_pyqwest_transport": False, "custom_loss_server_side": True,
                "fwdbwd_max_chunk_len": min(limit.max_batch_datums for limit in limits),
                "fwdbwd_max_chunk_bytes_count": 8 * tokens}

    def capabilities(self) -> dict:
        """Each served model with its limits (rl.service.limits; the SDK's SupportedModel reads model_name and
        max_context_length, and ignores the other limits, which the raw JSON carries)."""
        return {"supported_models": [{"model_name": name, "max_context_length": self.limits[name].context,
                                      "trainable": True, "sampleable": True, **self.limits[name].as_dict()}
                                     for name in self.models]}
