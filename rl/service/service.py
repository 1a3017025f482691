"""What each Tinker endpoint does, on our learner and sampler pool; `rl/service/app.py` maps HTTP onto it.

One learner actor per base model holds every user's LoRA runs; one sampler pool per base model (adapter
publish mode: many tenants on one engine) serves every published adapter. Model ids follow the SDK's own
scheme, `{session_id}:train:{model_seq_id}`, so runs created by `create_model` and by loading a checkpoint
agree. Training requests run in seq_id order per run (FutureStore); results are our pydantic types, which the
app encodes as JSON or protobuf.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import ray

from rl.checkpoints import CheckpointStore
from rl.learner import LearnerActor
from rl.models import resolve_model
from rl.sampler import SamplerPool
from rl.service.futures import FutureStore
from rl.service.registry import Registry
from rl.types import (
    AdamParams,
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    ForwardBackwardInput,
    LoraConfig,
    SampleRequest,
    TrainingRun,
    TrainingRunsResponse,
)

SAMPLE_KEYS_IGNORED_AT_DEFAULT = {"topk_sample_logprobs": 0, "prompt_alt_tokens_k": 0, "record_stability_info": False}
"""asample fields the SDK always sends; we serve them only at their defaults and refuse anything else."""


class Service:
    def __init__(self, models: list[str], storage: Path | str, api_keys: list[str], *, replicas: int = 1,
                 dtype: str = "float32", max_model_len: int = 1024, max_lora_rank: int = 32, max_loras: int = 4):
        self.storage = Path(storage)
        self.registry = Registry(self.storage, api_keys)
        self.futures = FutureStore()
        self.checkpoints = CheckpointStore(self.storage / "checkpoints")
        self.models = {name: str(resolve_model(name)) for name in models}
        self.max_model_len = max_model_len
        self.learners = {name: LearnerActor.remote(name, storage=str(self.checkpoints.root), dtype=dtype)
                         for name in models}
        self.pools = {name: SamplerPool(name, replicas=replicas, max_model_len=max_model_len, dtype=dtype,
                                        max_lora_rank=max_lora_rank, max_loras=max_loras, publish_mode="adapter")
                      for name in models}
        self.samplers: dict[str, dict[str, Any]] = {}
        """sampling_session_id -> {"owner", "base_model", "model_path"}."""

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        for learner in self.learners.values():
            ray.kill(learner)

    # ---- training runs ---------------------------------------------------------------------------------------

    def _base(self, name: str) -> str:
        if name not in self.models:
            raise ValueError(f"base_model {name!r} is not served here; served: {', '.join(self.models)}")
        return name

    def _learner(self, user: str, model_id: str):
        run = self.registry.run(user, model_id)
        self.registry.touch(model_id)
        return self.learners[run["base_model"]]

    def create_model(self, user: str, body: dict) -> str:
        self.registry.check_session(user, body["session_id"])
        base = self._base(body["base_model"])
        lora = LoraConfig.model_validate(body.get("lora_config") or {"rank": 32})
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"

        async def create() -> dict:
            await self.learners[base].create.remote(base, lora, model_id=model_id)
            self.registry.add_run(user, model_id, base, lora.model_dump(), body.get("user_metadata"))
            return {"model_id": model_id}

        return self.futures.submit(user, create)

    def get_info(self, user: str, body: dict) -> dict:
        run = self.registry.run(user, body["model_id"])
        return {"model_id": body["model_id"], "is_lora": True, "lora_rank": run["lora"]["rank"],
                "model_data": {"model_name": run["base_model"], "tokenizer_id": self.models[run["base_model"]]}}

    def forward_backward(self, user: str, model_id: str, seq_id: int, batch: ForwardBackwardInput,
                         forward_only: bool) -> str:
        learner = self._learner(user, model_id)
        call = learner.forward if forward_only else learner.forward_backward
        return self.futures.submit_ordered(user, model_id, seq_id, lambda: call.remote(model_id, batch))

    def optim_step(self, user: str, body: dict) -> str:
        learner, model_id = self._learner(user, body["model_id"]), body["model_id"]
        params = AdamParams.model_validate(body["adam_params"])
        return self.futures.submit_ordered(user, model_id, body["seq_id"],
                                           lambda: learner.optim_step.remote(model_id, params))

    def save_weights(self, user: str, body: dict) -> str:
        learner, model_id = self._learner(user, body["model_id"]), body["model_id"]
        return self.futures.submit_ordered(user, model_id, body["seq_id"], lambda: learner.save_weights.remote(
            model_id, body.get("path"), overwrite=bool(body.get("overwrite"))))

    def save_weights_for_sampler(self, user: str, body: dict) -> str:
        """Saves and publishes to the pool; with `sampling_session_seq_id`, answers with a sampling session."""
        model_id = body["model_id"]
        learner, base = self._learner(user, model_id), self.registry.run(user, model_id)["base_model"]
        name = body.get("path") or f"sampler-{body['seq_id']}-{secrets.token_hex(3)}"

        async def save() -> dict:
            version = await self.pools[base].publish(
                await learner.save_weights_for_sampler.remote(model_id, name, overwrite=True))
            if body.get("sampling_session_seq_id") is None:
                return {"path": version.tinker_path}
            return {"sampling_session_id": self._new_sampler(user, base, version.tinker_path)}

        return self.futures.submit_ordered(user, model_id, body["seq_id"], save)

    def load_weights(self, user: str, body: dict) -> str:
        path, optimizer = body["path"], bool(body.get("optimizer"))
        if not self.registry.readable(user, path):
            raise ValueError(f"no checkpoint at {path}")
        saved = self.checkpoints.metadata(path)
        base = saved["base_model"]
        if "model_id" in body:  # into an existing run, in its seq_id order
            learner, model_id = self._learner(user, body["model_id"]), body["model_id"]
            return self.futures.submit_ordered(user, model_id, body["seq_id"], lambda: learner.load_weights.remote(
                path, optimizer=optimizer, model_id=model_id))
        self.registry.check_session(user, body["session_id"])
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"

        async def load() -> dict:
            await self.learners[base].load_weights.remote(path, optimizer=optimizer, model_id=model_id)
            self.registry.add_run(user, model_id, base, saved["lora_config"], body.get("user_metadata"))
            return {"path": path, "model_id": model_id}

        return self.futures.submit(user, load)

    # ---- sampling --------------------------------------------------------------------------------------------

    async def create_sampling_session(self, user: str, body: dict) -> dict:
        self.registry.check_session(user, body["session_id"])
        path = body.get("model_path")
        if path is None:
            return {"sampling_session_id": self._new_sampler(user, self._base(body["base_model"]), None)}
        if not self.registry.readable(user, path):
            raise ValueError(f"no checkpoint at {path}")
        base = self.checkpoints.metadata(path)["base_model"]
        await self._publish(base, path)
        return {"sampling_session_id": self._new_sampler(user, base, path)}

    async def _publish(self, base: str, path: str) -> None:
        """Publishes a sampler checkpoint saved earlier (another run's, or before a restart), verified."""
        if not self.pools[base].published(path):
            await self.pools[base].publish(await self.learners[base].sampler_weights.remote(path))

    def _new_sampler(self, user: str, base: str, path: str | None) -> str:
        sampler_id = self.pools[base].create_sampling_session(path)
        self.samplers[sampler_id] = {"owner": user, "base_model": base, "model_path": path}
        return sampler_id

    def sampler(self, user: str, sampler_id: str) -> dict:
        found = self.samplers.get(sampler_id)
        if found is None or found["owner"] != user:
            raise ValueError(f"unknown sampling session {sampler_id!r}")
        return found

    def sample(self, user: str, body: dict) -> tuple[str, int]:
        for key, default in SAMPLE_KEYS_IGNORED_AT_DEFAULT.items():
            if body.pop(key, default) != default:
                raise ValueError(f"{key} is not supported by this server (only {default!r})")
        for key in ("prompt_logprobs_last_n", "target_prompt_logprobs"):
            if body.pop(key, None) is not None:
                raise ValueError(f"{key} is not supported by this server")
        request = SampleRequest.model_validate(body)
        if request.sampling_session_id is not None:
            base = self.sampler(user, request.sampling_session_id)["base_model"]
        else:
            path = request.model_path
            if path is not None and not self.registry.readable(user, path):
                raise ValueError(f"no checkpoint at {path}")
            base = self.checkpoints.metadata(path)["base_model"] if path else self._base(request.base_model or "")
            request = request.model_copy(update={"base_model": None})
        key = (request.sampling_session_id, request.seq_id) if request.sampling_session_id else None
        return self.futures.submit(user, lambda: self.pools[base].sample(request), key=key), request.num_samples

    # ---- listings --------------------------------------------------------------------------------------------

    def training_runs(self, user: str, limit: int, offset: int) -> TrainingRunsResponse:
        owned = self.registry.owned_runs(user)
        page = [self.training_run(user, model_id) for model_id, _ in owned[offset:offset + limit]]
        return TrainingRunsResponse(training_runs=page, cursor=Cursor(offset=offset, limit=limit,
                                                                     total_count=len(owned)))

    def training_run(self, user: str, model_id: str) -> TrainingRun:
        run = self.registry.run(user, model_id)
        checkpoints = self.run_checkpoints(user, model_id).checkpoints
        latest = {kind: next((c for c in reversed(checkpoints) if c.checkpoint_type == kind), None)
                  for kind in ("training", "sampler")}
        return TrainingRun(training_run_id=model_id, base_model=run["base_model"], model_owner=run["owner"],
                           lora_rank=run["lora"]["rank"], last_request_time=run["last_request_time"],
                           last_checkpoint=latest["training"], last_sampler_checkpoint=latest["sampler"],
                           user_metadata=run["user_metadata"])

    def run_checkpoints(self, user: str, model_id: str) -> CheckpointsListResponse:
        self.registry.run(user, model_id)
        return CheckpointsListResponse(checkpoints=[self._public(c) for c in self.checkpoints.list(model_id)])

    def user_checkpoints(self, user: str, limit: int, offset: int) -> CheckpointsListResponse:
        every = [self._public(c) for model_id, _ in self.registry.owned_runs(user)
                 for c in self.checkpoints.list(model_id)]
        return CheckpointsListResponse(checkpoints=every[offset:offset + limit],
                                       cursor=Cursor(offset=offset, limit=limit, total_count=len(every)))

    def _public(self, checkpoint: Checkpoint) -> Checkpoint:
        return checkpoint.model_copy(update={"public": checkpoint.tinker_path in self.registry.public})

    def checkpoint_path(self, user: str, model_id: str, checkpoint_id: str) -> str:
        self.registry.run(user, model_id)
        return f"tinker://{model_id}/{checkpoint_id}"

    def delete_checkpoint(self, user: str, model_id: str, checkpoint_id: str) -> None:
        path = self.checkpoint_path(user, model_id, checkpoint_id)
        self.checkpoints.delete(path)
        self.registry.set_public(path, False)

    def weights_info(self, user: str, body: dict) -> dict:
        path = body["tinker_path"]
        if not self.registry.readable(user, path):
            raise ValueError(f"no checkpoint at {path}")
        metadata = self.checkpoints.metadata(path)
        lora = metadata["lora_config"]
        return {"base_model": metadata["base_model"], "is_lora": True, "lora_rank": lora["rank"],
                **{key: lora[key] for key in ("train_unembed", "train_mlp", "train_attn")}}

    def capabilities(self) -> dict:
        return {"supported_models": [{"model_name": name, "max_context_length": self.max_model_len,
                                      "trainable": True, "sampleable": True} for name in self.models]}
