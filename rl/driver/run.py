"""A run: what the RL, DPO and SFT loops share.

`Run` owns the learner actor holding this run's LoRA adapter, the run's log, its checkpoints, and a sampler
pool for rollouts and evaluation (started on first use). Every `checkpoint_every` steps, and after the last,
it saves the adapter with its optimizer state (`save_weights`) and then `state.json` (the next step, that
checkpoint's path, the token totals, the wandb run id), each written atomically: a run stopped anywhere resumes
from its last checkpoint with `resume=true`, and a failed run's last checkpoint loads. A run whose learner dies
ends with `LearnerLost`, on which `rl-train` restarts it from that checkpoint (`learner.max_restarts`).

Random state: every random choice a loop makes (problems, sampling seeds, data order) is drawn from
(seed, step), never from a global generator, so restoring the step restores the random state.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import random
import threading
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm
from transformers import AutoTokenizer

from rl.chat import chat_tokens, with_chat_template
from rl.config import LR_SCHEDULES, ClusterConfig, ModelConfig, TrainConfig
from rl.datasets import train_and_held_out
from rl.devices import actor_gpus, cluster_gpus
from rl.driver.episodes import Episode, episode_limits, held_out_episodes, held_out_metrics, transcript
from rl.driver.state import (
    CHECKPOINTS,
    EVAL_BASELINE,
    STATE,
    LearnerLost,
    adapter_folder,
    checkpoint_folder,
    read_state,
    write_json,
    write_state,
)
from rl.env import EnvGroupBuilder, Environment, TaskEnvironment
from rl.judge import Reply, verdict_probabilities, win_rate
from rl.learner import LearnerActor
from rl.learner.batching import CoalescedCalls
from rl.losses import LOSSES
from rl.memory import resident_memory
from rl.metrics import RunLog, timed
from rl.models import context_length, emulated_bf16_warning, resolve_model
from rl.sampler import AdapterVersion, SamplerPool
from rl.tasks import Problem, Task
from rl.types import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    SamplingParams,
)
from rl.weights import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def batch_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> list[int]:
    """The examples of `step` when cycling through a data set in epochs, each epoch in its own shuffled order."""
    orders: dict[int, list[int]] = {}  # one shuffle per epoch the batch touches
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, dataset_size)
        if epoch not in orders:
            orders[epoch] = list(range(dataset_size))
            random.Random(f"{seed}:{epoch}").shuffle(orders[epoch])
        indices.append(orders[epoch][offset])
    return indices


def adam_params(config: TrainConfig, step: int) -> AdamParams:
    """The optimizer's settings for `step`: algo.learning_rate scaled by (step + 1) / (warmup_steps + 1) during
    algo.warmup_steps, then by algo.lr_schedule at the share of the steps after the warmup gone by (1 at the first;
    linear and cosine reach 0 only after the last step)."""
    algo = config.algo
    warmup = algo.warmup_steps
    if step < warmup:
        scale = (step + 1) / (warmup + 1)
    else:
        scale = LR_SCHEDULES[algo.lr_schedule]((step - warmup) / (config.steps - warmup))
    return AdamParams(learning_rate=algo.learning_rate * scale, grad_clip_norm=algo.grad_clip_norm,
                      weight_decay=algo.weight_decay, beta1=algo.adam_beta1, beta2=algo.adam_beta2,
                      eps=algo.adam_epsilon)


def overlap_threads(overlapping: bool) -> int | None:
    """CPU threads for a learner or replica whose `threads` is unset, when they work at the same time (off-policy,
    or shared by a sweep's runs): half the driver machine's cores each. OpenMP threads of two busy processes on
    the same cores spin against each other (a learner step of 8.3 s alone took 27 s beside a busy sampler on 2
    cores). None: they take turns."""
    return max(1, (os.cpu_count() or 2) // 2) if overlapping else None


def actor_threads(config: TrainConfig, overlapping: bool) -> dict[str, int | None]:
    """The CPU threads of the run's learner and of each sampler replica: as configured, else `overlap_threads`;
    unset both ways, a replica takes every core of the machine and the learner (None) every core it may run on."""
    half = overlap_threads(overlapping)
    return {"learner": config.learner.threads or half, "sampler": config.sampler.threads or half or os.cpu_count()}


@dataclass
class Shared:
    """A run's learner and sampler pool, or those that several runs use at once (a sweep's runs on one base model,
    `rl.sweep`): each run adds its own adapter to the learner and publishes its own versions to the pool, which
    serves them in the runs' publish mode (merge: one run's version folded into the weights at a time)."""

    placement: Any
    learner: ray.actor.ActorHandle
    pool: SamplerPool | None
    """None when none of the runs samples (SFT or DPO without evaluation)."""
    teacher: ray.actor.ActorHandle | None = None
    """A learner holding algo.teacher_model, whose runs are the runs' teachers; None without one."""
    calls: CoalescedCalls | None = None
    """With `learner.batch_runs` and several runs: their forward_backward calls, coalesced into passes."""

    @classmethod
    def start(cls, configs: list[TrainConfig], *, wait: bool = True) -> Shared:
        """The actors for runs configured alike (bar what `rl.sweep.share_key` ignores), or for one run alone,
        once the cluster has room for them (`reserve`). Each run keeps its checkpoints in its own folder
        (`Learner.create(storage=...)`). The pool starts while the learner loads: each mostly imports, on a core of
        its own."""
        connect(configs[0].cluster)
        config = with_actor_gpus(configs[0], samples=any(samples(other) for other in configs))
        placement = reserve(config, wait=wait)
        try:
            overlapping = config.algo.off_policy or len(configs) > 1  # one run samples while another trains
            learner = start_learner(config, placement, Path(config.output_dir) / CHECKPOINTS, overlapping)
            # The teacher model, in a learner of its own; it only scores the runs' samples (`teacher_bundle`).
            teacher = (start_learner(config, placement, Path(config.output_dir) / CHECKPOINTS, overlapping,
                                     teacher=True) if config.algo.teacher_model else None)
            pool = None
            if any(samples(other) for other in configs):
                # In adapter mode a run's next version loads beside its last. The KV cache is the largest any run
                # asks for (unset: vLLM's default).
                kv_caches = [other.sampler.kv_cache_gib for other in configs]
                pool = start_pool(config, placement, overlapping, first_bundle=2 if teacher_bundle(config) else 1,
                                  max_loras=max(4, 2 * len(configs)),
                                  max_lora_rank=max(other.model.lora_rank for other in configs),
                                  kv_cache_gib=None if None in kv_caches else max(kv_caches))
            check_devices(config, ray.get(learner.describe.remote()), pool)
            return cls(placement, learner, pool, teacher,
                       CoalescedCalls(learner) if config.learner.batch_runs and len(configs) > 1 else None)
        except BaseException:
            remove_placement_group(placement)
            raise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        for learner in (self.learner, self.teacher):
            if learner is not None:
                ray.kill(learner)
        remove_placement_group(self.placement)


def with_actor_gpus(config: TrainConfig, *, samples: bool) -> TrainConfig:
    """`config` with the learner's and each sampler replica's num_gpus resolved against the Ray cluster
    (`rl.devices.actor_gpus`: unset, a share of its GPUs)."""
    learner, sampler = actor_gpus(config.learner.num_gpus, config.sampler.num_gpus,
                                  cluster_gpus=cluster_gpus(), learners=2 if config.algo.teacher_model else 1,
                                  replicas=config.sampler.replicas if samples else 0)
    return replace(config, learner=replace(config.learner, num_gpus=learner),
                   sampler=replace(config.sampler, num_gpus=sampler))


def check_devices(config: TrainConfig, learner: dict, pool: SamplerPool | None) -> None:
    """Says what `model.dtype` became where the actors run (`Learner.describe`), and on which device, and warns of
    bf16 where it is emulated; refuses a learner and a sampler that disagree (`auto` resolved on nodes whose CPUs
    differ), whose weight checks would fail on every publish, and a learner given a GPU that computes on its CPU
    (a torch without CUDA on its node). `config`: with num_gpus resolved (`with_actor_gpus`)."""
    sampler = pool.info["dtype"] if pool is not None else learner["dtype"]
    if sampler != learner["dtype"]:
        raise ValueError(f"model.dtype={config.model.dtype} became {learner['dtype']} in the learner and {sampler} "
                         "in the sampler (their nodes differ in native bf16 support): set model.dtype explicitly")
    if config.learner.num_gpus and learner["device"] == "cpu":
        raise ValueError(f"learner.num_gpus={config.learner.num_gpus}, but the learner computes on its CPU: the "
                         "torch on its node sees no GPU (a CPU build of torch?); set learner.num_gpus=0 to train on "
                         "CPUs")
    who = "learner and sampler compute" if pool is not None else "learner computes"
    gpus = [f"{name} {share:g} GPU" for name, share in (("learner", config.learner.num_gpus),
                                                       ("each sampler replica", pool and config.sampler.num_gpus))
            if share]
    print(f"{config.model.name}: {who} in {sampler} on {learner['device']} (model.dtype={config.model.dtype}"
          f"{''.join('; ' + gpu for gpu in gpus)})", flush=True)
    if sampler == "bfloat16" and not learner["native_bf16"]:
        print(f"warning: {emulated_bf16_warning(learner['device'])}", flush=True)


def samples(config: TrainConfig) -> bool:
    """Whether the run needs a sampler pool: to roll out (RL), or to evaluate a task's held-out problems greedily
    (examples from a data file come with no verifier to score answers)."""
    return config.algo.loop == "rl" or (config.eval_every > 0 and not config.data.given)


def start_learner(config: TrainConfig, placement, storage: Path, overlapping: bool, *,
                  teacher: bool = False) -> ray.actor.ActorHandle:
    """The learner actor in bundle 0 of the run's placement group; with `teacher`, a learner of algo.teacher_model
    in its `teacher_bundle`, or else beside the learner in bundle 0, taking nothing of it."""
    learner = config.learner
    needs, bundle = {"num_cpus": learner.num_cpus, "num_gpus": learner.num_gpus, "resources": learner.resources}, 0
    if teacher:
        own = teacher_bundle(config)
        needs = {"num_cpus": 0, "num_gpus": (own or {}).get("GPU", 0), "resources": learner.resources if own else {}}
        bundle = 1 if own else 0
    return LearnerActor.options(
        **needs, scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=bundle),
    ).remote(str(resolve_model(config.algo.teacher_model if teacher else config.model.name)), storage=str(storage),
             storage_uri=config.storage_uri, dtype=config.model.dtype, micro_batch_tokens=learner.micro_batch_tokens,
             threads=actor_threads(config, overlapping)["learner"])


def start_pool(config: TrainConfig, placement, overlapping: bool, *, first_bundle: int = 1, max_loras: int = 4,
               max_lora_rank: int | None = None, kv_cache_gib: float | None = None) -> SamplerPool:
    """The sampler replicas in bundles `first_bundle`.. of the run's placement group."""
    sampler, model = config.sampler, config.model
    return SamplerPool(str(resolve_model(model.name)), replicas=sampler.replicas, num_cpus=sampler.num_cpus,
                       num_gpus=sampler.num_gpus, resources=sampler.resources, placement_group=placement,
                       first_bundle=first_bundle, max_model_len=model.max_model_len,
                       max_lora_rank=max_lora_rank or model.lora_rank, max_loras=max_loras, dtype=model.dtype,
                       seed=config.seed, publish_mode=sampler.publish_mode, kv_cache_gib=kv_cache_gib,
                       threads=actor_threads(config, overlapping)["sampler"])


class Run:
    """The learner with this run's adapter, its log and checkpoints, and a sampler pool when it samples: its own,
    or with `shared`, a sweep's, which the run leaves running when it ends."""

    def __init__(self, config: TrainConfig, shared: Shared | None = None):
        self.config = config
        self.folder = Path(config.output_dir)
        model = config.model
        self.base_model = str(resolve_model(model.name))
        self.tokenizer = tokenizer_of(model)
        state = read_state(self.folder) if config.resume else None
        if config.resume and state is None:
            raise ValueError(f"resume=true: {self.folder} holds no {STATE}, so there is no checkpoint to resume "
                             "from (checkpoints are written every checkpoint_every steps)")
        # The adapters to start from and to hold as the reference, found before any actor starts (a resumed run has
        # its own weights, and needs the starting adapter only where it is its reference).
        self._adapter = adapter_folder(model.adapter) if model.adapter is not None and state is None else None
        reference = reference_adapter(config)
        self._reference = reference and (*reference, adapter_folder(reference[1], key=reference[0]))
        judge = config.judge.adapter
        self._judge = adapter_folder(judge, key="judge.adapter") if judge not in (None, "base") else None
        if config.algo.teacher_model is not None:
            check_teacher_tokenizer(config, self.tokenizer)
        self.shared = shared is not None  # False: the run starts actors of its own, and stops them when it ends
        self.actors = shared or Shared.start([config], wait=False)
        self.learner, self.pool = self.actors.learner, self.actors.pool
        self.model_id: str | None = None
        self.reference: tuple[ray.actor.ActorHandle, str | None] | None = None
        """(learner, run) computing the reference's logprobs: a run never trained holding the adapter of
        `reference_adapter` (the teacher, or the starting adapter), on the teacher model where there is one
        (algo.teacher_model), or no run: that model alone; None: the base model of this run is the reference."""
        self.judge: tuple[ray.actor.ActorHandle, str] | None = None
        """(learner, run) holding the judge's adapter, never trained; None: the judge is the base model, or none."""
        try:
            self._start(config, state)
        except BaseException as error:
            # A run that cannot start gives its reservation back (or a sweep's next run starves); from a sweep's
            # learner, the adapters it had added leave.
            if not self.shared:
                self.actors.close()
            elif not isinstance(error, ray.exceptions.RayActorError):
                self._delete_adapters()
            raise

    def _delete_adapters(self) -> None:
        """Drops this run's adapters from the learners it shares with other runs (its own, its reference's and
        its judge's)."""
        ray.get([learner.delete.remote(model_id) for learner, model_id in
                 ((self.learner, self.model_id), *(frozen for frozen in (self.reference, self.judge) if frozen))
                 if model_id is not None])

    def _start(self, config: TrainConfig, state: dict | None) -> None:
        model = config.model
        self.lora = LoraConfig(rank=model.lora_rank, seed=config.seed, train_unembed=model.train_unembed,
                               train_attn=model.train_attn, train_mlp=model.train_mlp)
        self.model_id = ray.get(self.learner.create.remote(self.base_model, self.lora,
                                                           model_id=state and state["model_id"],
                                                           storage=str(self.folder / CHECKPOINTS)))
        self.start_step, self.totals = 0, {}
        self._published: AdapterVersion | None = None
        """This run's latest published version (the one before is retired, and deleted, once the next serves)."""
        self._deletions: list[ray.ObjectRef] = []
        """Checkpoint deletions sent to the learner and not yet known to have finished."""
        self.best: dict | None = state and state.get("best")
        """The published version with the best held-out accuracy (without answers: win rate) so far, kept when it
        is retired: {"step", "eval/accuracy" or "eval/win_rate", "checkpoint": its tinker path}."""
        baseline = self.folder / EVAL_BASELINE
        self.eval_baseline: list[Reply] | None = [Reply(tuple(prompt), tuple(tokens), reference) for prompt, tokens,
                                                  reference in json.loads(baseline.read_text())] if (
            state is not None and baseline.exists()) else None
        """The first evaluation's answers, which a pairwise judge's eval/win_rate compares each later one's with."""
        if state is not None and self.eval_baseline is None and config.judge.pairwise and config.eval_every:
            print(f"{self.folder} holds no {EVAL_BASELINE}: eval/win_rate compares with the answers of this run's "
                  "first evaluation since it resumed", flush=True)
        if state is not None:
            ray.get(self.learner.load_weights.remote(state["checkpoint"], optimizer=True, model_id=self.model_id))
            self.start_step, self.totals = state["step"], state["totals"]
            print(f"resuming {self.folder} at step {self.start_step} from {state['checkpoint']}", flush=True)
        elif self._adapter is not None:
            self._load_adapter("model.adapter", model.adapter, self._adapter, self.model_id)
            print(f"starting from the adapter in {self._adapter}", flush=True)
        scorer = self.actors.teacher or self.learner
        if self._reference is not None:
            self.reference = scorer, self._load_adapter(*self._reference, learner=scorer)
        elif self.actors.teacher is not None:
            self.reference = scorer, None
        self.judge = self._judge and (self.learner, self._load_adapter("judge.adapter", config.judge.adapter,
                                                                       self._judge))
        # A sweep's runs print side by side: each line and progress bar names its run's folder.
        sweep_label = f"{config.recipe} {self.folder.name}" if self.shared else None
        self.label = sweep_label or config.recipe
        self.log = RunLog(config, start_step=self.start_step, wandb_id=state and state["wandb_id"], label=sweep_label)

    def _load_adapter(self, key: str, given: str, folder: Path, model_id: str | None = None, *,
                      learner: ray.actor.ActorHandle | None = None) -> str:
        """The adapter in `folder` (setting `key` gave it as `given`) into the learner's run `model_id`, or into a
        new run of the adapter's own shape in `learner` (the run's, by default); returns the run's model id."""
        # The files travel as bytes: the learner may run on another node than this folder.
        files = {name: (folder / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        try:
            if model_id is None:
                return ray.get((learner or self.learner).create_from_adapter.remote(files))
            ray.get(self.learner.load_adapter.remote(model_id, files))
            return model_id
        except ValueError as error:  # the learner's reason, without Ray's traceback
            cause = getattr(error, "cause", None) or error
            raise ValueError(f"{key}={given}: {cause}") from None

    async def reference_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Each sequence's logprobs of its tokens after the first under the run's reference (`reference_adapter`):
        the teacher, its starting adapter, or the base model (the run's adapter off)."""
        return await self._logprobs_under(self.reference, sequences)

    async def own_logprobs(self, sequences: list[list[int]], last: int | None = None) -> list[list[float]]:
        """The same under the run's own adapter as it is now; `last`: of each sequence's last `last` tokens only."""
        return await self._logprobs_under((self.learner, self.model_id), sequences, last)

    async def judge_logprobs(self, sequences: list[list[int]], last: int | None = None) -> list[list[float]]:
        """The same under the judge (rl/judge.py): its adapter, or the base model."""
        return await self._logprobs_under(self.judge, sequences, last)

    async def _logprobs_under(self, model: tuple[ray.actor.ActorHandle, str | None] | None,
                              sequences: list[list[int]], last: int | None = None) -> list[list[float]]:
        """Logprobs under a (learner, run) (no run: that learner's model alone), or None: the base model of this
        run's learner, its adapter off."""
        if model is not None:
            learner, model_id = model
            return await learner.logprobs.remote(model_id, sequences, last=last)
        return await self.learner.logprobs.remote(self.model_id, sequences, adapter=False, last=last)

    async def with_reference(self, batch: ForwardBackwardInput, keys: list[int] | None = None,
                             known: dict[int, array] | None = None, record: dict | None = None
                             ) -> ForwardBackwardInput:
        """`batch` with each datum's reference logprobs (its loss's `reference_input`: DPO's and IPO's ref_logprobs)
        where the run's reference is an adapter held frozen (`reference_logprobs`); as it is where its loss reads
        none, or where the reference is the base model, which the learner computes in the same call. `known`: the
        logprobs computed before, by each datum's key (`keys`): the reference is frozen, so a datum seen again in a
        later epoch has them already (kept as float32, as a datum holds them). `record` gains the seconds it computed
        them in as time/reference_s."""
        name = LOSSES[batch.loss_fn].reference_input
        if self.reference is None or name is None:
            return batch
        keys = list(range(len(batch.data))) if keys is None else keys
        known = {} if known is None else known
        missing = {key: datum for key, datum in zip(keys, batch.data, strict=True) if key not in known}
        # A datum's sequence: its input, then its last target (the targets are the input shifted by one).
        sequences = [datum.model_input.to_ints() + datum.loss_fn_inputs["target_tokens"].data[-1:]
                     for datum in missing.values()]
        if sequences:
            with timed({} if record is None else record, "reference"):
                computed = await self.reference_logprobs(sequences)
            for key, reference in zip(missing, computed, strict=True):
                known[key] = array("f", reference)
        data = [Datum(model_input=datum.model_input, loss_fn_inputs={**datum.loss_fn_inputs,
                                                                     name: known[key].tolist()})
                for key, datum in zip(keys, batch.data, strict=True)]
        return batch.model_copy(update={"data": data})

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.log.close()
        if error is None:
            ray.get(self._deletions)
        if error is None and self.best is not None:
            try:
                where = checkpoint_folder(self.folder, self.best["checkpoint"])
            except ValueError:  # the learner's node holds it (no storage_uri)
                where = self.best["checkpoint"]
            name = next(key for key in self.best if key.startswith("eval/"))
            tqdm.write(f"{self.log.prefix}best held-out {name[5:].replace('_', ' ')} {self.best[name]:.3g} at step "
                       f"{self.best['step']}: its adapter is {where} (`rl-export {self.folder} OUT --best` merges it "
                       "into a model folder)")
        if not self.shared:
            self.actors.close()
        elif not isinstance(error, ray.exceptions.RayActorError):  # the others go on: only this run's adapters leave
            self._delete_adapters()
        learners = {"learner": self.learner, "teacher's learner": self.actors.teacher}
        lost = [name for name, actor in learners.items() if isinstance(error, ray.exceptions.RayActorError)
                and actor is not None and error.actor_id == actor._actor_id.hex()]
        if lost:
            reason = str(error).splitlines()[0].rstrip(".")
            raise LearnerLost(f"the {lost[0]} of {self.folder} died ({reason})") from error

    async def publish(self, step: int, *, after: tuple[asyncio.Future | None, ...] = (),
                      record: dict | None = None) -> AdapterVersion:
        """save_weights_for_sampler as `step-{step:06d}` (the loop steps these weights have trained: an evaluation
        at step 20 names step-000020, whatever number of optimizer steps the learner took), then every replica
        loads and verifies it, once the futures `after` (a rollout or an evaluation still sampling from the
        current weights) have finished. `record` gains the publishing's seconds as time/publish_s and the wait
        for `after` as time/sampling_s (the step waits for the sampler there, not for the publish)."""
        record = {} if record is None else record
        with timed(record, "publish"):
            weights = await self.learner.save_weights_for_sampler.remote(self.model_id, f"step-{step:06d}",
                                                                         overwrite=True)
        if not self.shared and any(future is not None for future in after):
            # The replicas merge the weights while the rollout they wait for samples (the learner, done, leaves
            # its core to them). A sweep's runs share the replicas, which keep one such merge: they would
            # replace each other's.
            self.pool.prepare(weights)
        await wait_for_sampler(after, record)
        with timed(record, "publish"):
            version = await self.pool.publish(weights)
            previous, self._published = self._published, version
            if previous is not None and previous.tinker_path != version.tinker_path:
                self.pool.retire(previous.tinker_path)  # nothing samples it after this: its files can go
                if not self.best or previous.tinker_path != self.best["checkpoint"]:
                    # Nor reads its folder: the run keeps its latest sampler weights (22 MB a step for SmolLM2) and
                    # its best; its training checkpoints are what it resumes from.
                    await self._delete(previous.tinker_path)
        return version

    async def _delete(self, tinker_path: str) -> None:
        """Deletes a checkpoint of the run's once the deletions before it have finished (they never pile up); not
        awaited itself (a shared learner may be busy)."""
        pending, self._deletions = self._deletions, []
        await asyncio.gather(*pending)
        self._deletions.append(self.learner.delete_checkpoint.remote(tinker_path))

    async def begin_step(self, step: int, evaluate: Callable[[int], Awaitable[dict]] | None = None) -> dict:
        """The record of step `step`, which begins with `evaluate(step)` when it is given and an evaluation is due
        (`evaluates`)."""
        self._step_started = time.perf_counter()
        record: dict = {"step": step}
        if evaluate is not None and evaluates(self.config, step):
            record.update(await timed_evaluation(evaluate(step)))
        return record

    async def end_step(self, record: dict) -> None:
        """Logs the step's record with each process's memory, then saves a checkpoint when one is due
        (`checkpoint_due`)."""
        self.record({**record, **await self.memory()}, started=self._step_started)
        if checkpoint_due(self.config, record["step"] + 1):
            await self.save_checkpoint(record["step"] + 1)

    async def train_step(self, batch: ForwardBackwardInput, adam: AdamParams, record: dict) -> ForwardBackwardOutput:
        """forward_backward then optim_step on `batch`, each timed into `record`, which gains the optimizer's
        metrics (and `learner/runs_in_pass` where a shared learner batches its runs' calls)."""
        with timed(record, "forward_backward"):
            if self.actors.calls is not None:
                output, record["learner/runs_in_pass"] = await self.actors.calls.forward_backward(self.model_id, batch)
            else:
                output = await self.learner.forward_backward.remote(self.model_id, batch)
        with timed(record, "optim_step"):
            record.update((await self.learner.optim_step.remote(self.model_id, adam)).metrics)
        return output

    async def held_out(self, batch: ForwardBackwardInput, name: str, groups: list[EnvGroupBuilder],
                       step: int) -> tuple[dict, dict]:
        """The learner's metrics on a held-out batch (no update), and where there are held-out `groups` (a task's
        problems; none with a data file) the answers' metrics (`answer_held_out`) of the weights it holds now,
        published for that."""
        output = await self.learner.forward.remote(self.model_id, batch)
        if not groups:
            return output.metrics, {}
        version = await self.publish(step)
        return output.metrics, await self.answer_held_out(name, groups, version.tinker_path, step)

    async def answer_held_out(self, name: str, groups: list[EnvGroupBuilder], model_path: str, step: int) -> dict:
        """eval/accuracy (and eval/pass@k) on the held-out `groups` of the weights published as `model_path`, the
        weights of step `step`, answering greedily or at eval_temperature; with a judge, eval/judge_reward, its mean
        P(verdict) for those answers, or for a pairwise judge eval/win_rate against the run's first evaluation's
        answers (`rl.judge.win_rate`), the measure of problems without answers. The episodes go to samples.jsonl."""
        config = self.config
        episodes_P = await held_out_episodes(self.pool, name, groups, model_path,
                                             episode_limits(config, self.tokenizer),
                                             SamplingParams(temperature=config.eval_temperature))
        self.log_episodes(step, "eval", episodes_P)
        # Your prompts without answers (RL from a pairwise judge alone: rl.train.source_of) have nothing to check.
        answered = not config.data.given or any(episode.reference is not None for group in episodes_P
                                                for episode in group)
        metrics = held_out_metrics(episodes_P, answered=answered)
        if config.judge.pairwise:
            replies = [Reply.of(episode) for group in episodes_P for episode in group]
            if self.eval_baseline is None:
                self.eval_baseline = replies
                write_json(self.folder / EVAL_BASELINE, [[reply.prompt, reply.tokens, reply.reference]
                                                         for reply in replies])
            metrics["eval/win_rate"] = await win_rate(replies, self.eval_baseline, config.judge, self.tokenizer,
                                                      self.judge_logprobs)
        elif config.judge.adapter is not None:
            judged = [p for p_G in await verdict_probabilities(episodes_P, config.judge, self.tokenizer,
                                                               self.judge_logprobs) for p in p_G]
            metrics["eval/judge_reward"] = sum(judged) / len(judged)
        best_by = "eval/accuracy" if answered else "eval/win_rate"
        await self._keep_if_best(model_path, step, best_by, metrics[best_by])
        return metrics

    async def _keep_if_best(self, model_path: str, step: int, name: str, value: float) -> None:
        """Makes the version published as `model_path` the run's best if its held-out metric `name` is above the
        best so far (the earliest of equals stays), deleting the one it replaces unless that one still serves. It is
        known before the version is retired: a step publishes the next once its evaluation has finished."""
        if self.best is not None and value <= self.best.get(name, -math.inf):
            return
        replaced, self.best = self.best, {"step": step, name: value, "checkpoint": model_path}
        if replaced is not None and replaced["checkpoint"] not in (model_path, self._published.tinker_path):
            await self._delete(replaced["checkpoint"])

    def log_episodes(self, step: int, split: str, episodes_P: list[list[Episode]],
                     advantages_P: list[list[list[float]]] | None = None) -> None:
        """Writes the episodes of each group in `episodes_P` to samples.jsonl as text, with each turn's advantage
        where `advantages_P` gives them (per group, per episode, per turn)."""
        lines = []
        for group, episodes_G in enumerate(episodes_P):
            for index, episode in enumerate(episodes_G):
                line = {"step": step, "split": split, "group": group, "episode": index,
                        **transcript(episode, self.tokenizer.decode)}
                if advantages_P is not None:
                    line["advantages"] = advantages_P[group][index]
                lines.append(line)
        self.log.samples(lines)

    async def final_evaluation(self, evaluate: Callable[[int], Awaitable[dict]]) -> None:
        """The evaluation after the last step (when evaluation is on), logged as a record of its own."""
        if evaluates(self.config, self.config.steps):
            record = {"step": self.config.steps, **await timed_evaluation(evaluate(self.config.steps))}
            self.record(record, started=time.perf_counter() - record["time/eval_s"])
            state = read_state(self.folder)
            if state is not None and state.get("best") != self.best:  # the last checkpoint came before it
                write_state(self.folder, {**state, "best": self.best})

    async def memory(self) -> dict[str, float]:
        """Each process's resident memory in GiB: now (`memory/NAME_gib`), and the learners' and samplers' peak
        since the last call (`memory/NAME_peak_gib`): called once a step, it gives each step's peak."""
        processes = {"learner": await self.learner.memory.remote(reset_peak=True)}
        if self.actors.teacher is not None:
            processes["teacher"] = await self.actors.teacher.memory.remote(reset_peak=True)
        if self.pool is not None:
            replicas = await self.pool.memory(reset_peak=True)
            processes.update((f"sampler{index}", replica) for index, replica in enumerate(replicas))
        record = {"memory/driver_gib": resident_memory()["rss_gib"]}
        for name, figures in processes.items():
            record.update({f"memory/{name}_gib": figures["rss_gib"], f"memory/{name}_peak_gib": figures["peak_gib"]})
        return record

    def record(self, record: dict, *, started: float) -> None:
        """Logs one step's record, begun at perf_counter() `started`, with its `step_time_s`, running totals of its
        `tokens/*` counts as `tokens_total/*` and of its step time as `time_total/minutes` (minutes of steps since
        the run began, start-up excluded)."""
        record = {**record, "step_time_s": time.perf_counter() - started}
        for key, value in record.items():
            if key.startswith("tokens/"):
                total = "tokens_total/" + key.removeprefix("tokens/")
                self.totals[total] = self.totals.get(total, 0) + value
        self.totals["time_total/minutes"] = self.totals.get("time_total/minutes", 0.0) + record["step_time_s"] / 60
        self.log.log({**record, **self.totals})

    async def save_checkpoint(self, next_step: int) -> None:
        """Saves the adapter with its optimizer state, then state.json naming it: the run resumes at `next_step`.
        Then deletes all but the last checkpoint_keep of them (the run's own, resumed ones included)."""
        saved = await self.learner.save_weights.remote(self.model_id, f"step-{next_step}", overwrite=True)
        write_state(self.folder, {"step": next_step, "checkpoint": saved.path, "model_id": self.model_id,
                                  "totals": self.totals, "wandb_id": self.log.wandb_id, "best": self.best})
        if self.config.checkpoint_keep:
            listed = (await self.learner.list_checkpoints.remote(self.model_id)).checkpoints
            older = sorted((checkpoint for checkpoint in listed if checkpoint.checkpoint_type == "training"
                            and checkpoint.tinker_path != saved.path), key=lambda checkpoint: checkpoint.time)
            for checkpoint in older[:max(len(older) - self.config.checkpoint_keep + 1, 0)]:
                await self._delete(checkpoint.tinker_path)


def reference_adapter(config: TrainConfig) -> tuple[str, str] | None:
    """(setting, path) of the adapter held frozen, as a run of its own, as the run's reference: in RL with a teacher
    algo.teacher's (None for a teacher model alone), else the starting adapter (model.adapter) with
    algo.reference=start, where the run has a reference (a loss that reads one, DPO's and IPO's, or RL's kl_coef);
    None: a model is the reference
    (the run's base model, or algo.teacher_model), or there is none."""
    algo = config.algo
    if algo.loop == "rl" and algo.distills:
        return ("algo.teacher", algo.teacher) if algo.teacher is not None else None
    if (config.model.adapter is not None and algo.reference == "start"
            and (LOSSES[algo.loss_fn].reference_input is not None or algo.loop == "rl" and algo.kl_coef > 0)):
        return "model.adapter", config.model.adapter
    return None


def check_teacher_tokenizer(config: TrainConfig, tokenizer) -> None:
    """Refuses a teacher model whose tokenizer is not the run's: it scores the student's own tokens."""
    try:
        teacher = AutoTokenizer.from_pretrained(str(resolve_model(config.algo.teacher_model)))
    except ValueError as error:
        raise ValueError(f"algo.teacher_model={config.algo.teacher_model}: {error}") from None
    if teacher.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"algo.teacher_model={config.algo.teacher_model}: its tokenizer is not {config.model.name}'s "
                         f"({len(teacher)} tokens against {len(tokenizer)}, or the same tokens numbered otherwise): "
                         "the teacher scores the student's own tokens, so both must share one tokenizer")


def tokenizer_of(model: ModelConfig):
    """The model's tokenizer, rendering chats with model.chat_template (rl.chat.with_chat_template)."""
    return _tokenizer(model.name, model.chat_template)


@functools.cache
def _tokenizer(name: str, chat_template: str | None):
    """Read once per process (the held-out groups and the run both need it)."""
    return with_chat_template(AutoTokenizer.from_pretrained(str(resolve_model(name))), chat_template, model=name)


def held_out_groups(config: TrainConfig, environment: Environment) -> list[EnvGroupBuilder]:
    """The held-out problems as groups of eval_samples episodes (one: greedy): made before any actor starts, so that
    an environment that gives none fails at once; none with eval_every=0."""
    if not config.eval_every:
        return []
    return environment.groups(config.eval_prompts, seed=config.seed, split="eval", group_size=config.eval_samples,
                              tokenizer=tokenizer_of(config.model))


def supervised_examples(config: TrainConfig, task: Task, *, from_task: Callable,
                        read: Callable) -> tuple[list, list, list[EnvGroupBuilder]]:
    """The SFT or DPO loop's training and held-out examples, and the held-out problems its evaluation answers
    greedily: data.train's and data.eval's examples (`rl.datasets`; no problems: a file has no verifier), else the
    task's (`from_task(task, count, seed=, split=)`: sft_conversations or preference_pairs). Made before any actor
    starts, so that bad data fails at once."""
    data = config.data
    if data.given:
        return (*train_and_held_out(read, data.train, data.eval, config.held_out_examples,
                                    data.fields), [])
    return (from_task(task, config.algo.train_examples, seed=config.seed),
            from_task(task, config.eval_prompts, seed=config.seed, split="eval"),
            held_out_groups(config, TaskEnvironment(task)))


def check_prompts(config: TrainConfig, problems: list[Problem]) -> None:
    """Refuses the first of your problems whose prompt leaves no room for an answer in model.max_model_len, quoting
    how it begins, before any actor starts (the rollout would refuse it only when the problem is drawn, mid-run)."""
    tokenizer, context = tokenizer_of(config.model), config.model.max_model_len
    for problem in problems:
        tokens = chat_tokens(tokenizer, problem.messages)
        if len(tokens) >= context:
            raise ValueError(f"a problem's prompt has {len(tokens)} tokens, no room for an answer in "
                             f"model.max_model_len={context}: raise it, or leave such problems out; it begins "
                             f"{tokenizer.decode(tokens[:32])!r}")


def check_context(config: TrainConfig, examples: list, datums: Callable) -> None:
    """Refuses the first example whose datums (`datums(tokenizer, example)`) are longer than the base model's
    context, quoting how it begins, before any actor starts (the learner refuses such a datum too, mid-run). Each
    example is tokenized again when its step comes: the datums of a large file would crowd memory."""
    tokenizer, context = tokenizer_of(config.model), context_length(config.model.name)
    for example in examples:
        for datum in datums(tokenizer, example):
            if datum.model_input.length > context:  # the last token is a target only
                begins = tokenizer.decode(datum.model_input.to_ints()[:32])
                raise ValueError(f"an example of {datum.model_input.length + 1} tokens is longer than "
                                 f"{config.model.name}'s context of {context} tokens (+1: the last token is only a "
                                 f"target); it begins {begins!r}")


async def timed_evaluation(evaluation: Awaitable[dict]) -> dict:
    """The evaluation's record, with its whole length as time/eval_s (in the RL loop it overlaps other phases)."""
    record: dict = {}
    with timed(record, "eval"):
        record.update(await evaluation)
    return record


async def wait_for_sampler(futures: tuple[asyncio.Future | None, ...], record: dict) -> None:
    """Waits for `futures` (a rollout or an evaluation still sampling; None for none), the wait added to the step's
    time/sampling_s: off-policy a step ends once what samples beside it has finished."""
    pending = [future for future in futures if future is not None]
    if pending:
        with timed(record, "sampling"):
            await asyncio.wait(pending)


def evaluates(config: TrainConfig, step: int) -> bool:
    """Whether `step` begins with an evaluation: every eval_every steps and after the last (0: never)."""
    every = config.eval_every
    return every > 0 and (step % every == 0 or step == config.steps)


def checkpoint_due(config: TrainConfig, next_step: int) -> bool:
    """Whether the steps before `next_step` end with a checkpoint: every checkpoint_every, and after the last."""
    every = config.checkpoint_every
    return next_step == config.steps or bool(every and next_step % every == 0)


def steps(run: Run) -> tqdm:
    """The steps still to run, with a progress bar."""
    return tqdm(range(run.start_step, run.config.steps), desc=run.label, unit="step", disable=None)


def teacher_bundle(config: TrainConfig) -> dict[str, float] | None:
    """The placement-group bundle of algo.teacher_model's learner (bundle 1): a learner's GPUs and custom resources
    but no CPU, since it computes only while the run's learner waits for it; None without a teacher model or where
    that leaves nothing to reserve (on CPUs): the teacher then runs in the learner's bundle."""
    learner = config.learner
    wanted = {"GPU": learner.num_gpus, **learner.resources}
    wanted = {key: value for key, value in wanted.items() if value}
    return wanted if config.algo.teacher_model and wanted else None


def connect(cluster: ClusterConfig) -> None:
    """Starts Ray in this process, or joins a cluster; a sweep's later runs reuse the same Ray. Called as the
    actors start: a run refused for its data or model before then has started nothing."""
    if ray.is_initialized():
        return
    if threading.current_thread() is not threading.main_thread():
        # Ray's own processes (GCS, raylet) are started with PR_SET_PDEATHSIG, which Linux fires when the thread
        # that started them ends: Ray started from a sweep group's thread dies with the first group to finish.
        raise RuntimeError("Ray must be started from the main thread (a sweep connects before its groups start)")
    # address None means this process's own Ray: "local" keeps Ray from joining a cluster that happens to run on
    # this machine (its default), which would put the run's actors on someone else's nodes.
    ray.init(address=cluster.address or "local", num_cpus=cluster.num_cpus, include_dashboard=False,
             log_to_driver=False)


def reserve(config: TrainConfig, *, wait: bool = False):
    """A placement group holding the whole run (bundle 0: the learner; 1: the teacher model's learner, if any; then
    one per sampler replica), so a run starts only when the cluster has room for all of it, and a sweep's runs never
    starve each other. `wait`: for as long as the cluster's other work holds the room (a sweep's queue), if the
    cluster could ever hold it."""
    learner, sampler, cluster = config.learner, config.sampler, config.cluster

    def bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
        return {key: value for key, value in {"CPU": cpus, "GPU": gpus, **resources}.items() if value}

    teacher = teacher_bundle(config)
    layout = "learner, then the teacher's, then each sampler replica" if teacher else ("learner, then each "
                                                                                       "sampler replica")
    bundles = [bundle(learner.num_cpus, learner.num_gpus, learner.resources), *([teacher] if teacher else []),
               *[bundle(sampler.num_cpus, sampler.num_gpus, sampler.resources)] * sampler.replicas]
    if wait:
        total, needed = ray.cluster_resources(), {}
        for one in bundles:
            for key, value in one.items():
                needed[key] = needed.get(key, 0) + value
        if any(value > total.get(key, 0) for key, value in needed.items()):
            raise RuntimeError(f"the Ray cluster can never hold this run: it needs {needed} in all ({layout}), "
                               f"and the cluster has {total}")
    group = placement_group(bundles, strategy=cluster.placement_strategy)
    try:
        ray.get(group.ready(), timeout=None if wait else cluster.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"the Ray cluster has no room for this run after {cluster.placement_timeout_s:.0f} s: it "
                           f"needs {bundles} ({layout}; strategy "
                           f"{cluster.placement_strategy}); free now: {ray.available_resources()}") from None
    return group
