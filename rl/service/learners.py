"""The service's learner for one base model: one actor shared by every user, served in turns, and kept alive.

Turns: the calls that work on a run (create, forward_backward, optim_step, saves, loads) reach the actor one at a
time, each user's in the order they came, the users with calls waiting sharing the learner fairly by tokens
(`Turns`): a user sending a stream of large batches gets as many tokens through as one sending small steps, not
a call for each of theirs. When the next call is a forward_backward, every other waiting user whose next call is
a forward_backward due about as soon goes along in the same learner pass (`Learner.forward_backward_many`: exact,
each row through its own run's adapter; a batch refused fails alone): one pass a round for the users training.

Supervision: an actor that dies (killed, out of memory, its node lost) is replaced, in a turn of its own, as soon
as a ping finds it dead (`watch`, every few seconds while the server runs; a ping waits behind work in flight,
which a death ends too), or at once by the call that finds it, and every run on it is restored: from the
checkpoint it was last saved to or loaded from, else its latest training checkpoint, else a new adapter. A run
that had changed since (steps, or gradients not yet applied) lost that work: the call in flight, or else that
run's next call, fails with a `RunRestored` that says what it resumed from; the calls after it work on the
restored state. The registry keeps each run's restore point and whether it changed since, so a server restarted
on the same storage restores each run the same way, on the run's next call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray

from rl.learner import LearnerActor
from rl.service.registry import Registry
from rl.types import LoraConfig

DEATH = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)
"""What a call on a dead actor raises (Ray's memory monitor's kill is an OutOfMemoryError); `_replace` tells
apart the one RayActorError that is not a death."""
CHANGES_STATE = ("forward_backward", "optim_step")
SAVES = ("save_weights", "save_weights_for_sampler", "save_weights_external")
BATCH_METHODS = ("forward", "forward_backward")
"""Calls whose second argument is a batch: their cost in turns is its tokens."""
WATCH_INTERVAL_S = 2.0
SUPERVISOR = "supervisor"
"""The turn in which `watch` replaces a dead actor (a name no user has: theirs are user-N or local)."""


def replaced(cause: Exception) -> str:
    return f"its learner died ({type(cause).__name__}) and was replaced"


class RunRestored(RuntimeError):
    """A run's learner died and the run was restored from a checkpoint; the message says which."""


@dataclass
class _Job:
    run: Callable[[], Awaitable[Any]]
    done: asyncio.Future
    joinable: Any
    """What `Turns.join` needs to run this job together with other users' (None: the job runs alone)."""
    start: float
    """Where the job stands in the learner's work (tokens): the work served when it came, or where its user's
    previous job ends if later."""
    end: float
    """start + the job's cost."""


class Turns:
    """Jobs run one at a time, each user's in the order they came, the users sharing the learner's work fairly by
    tokens (start-time fair queueing): the waiting job that stands earliest (`_Job.start`) runs next, ties going
    round the users in turn (a user served goes to the back). A user whose requests are four times larger then
    gets a turn a quarter as often, and a user back from idling starts from the present, with no credit saved
    up. Calls that move no tokens (optim_step, saves, creates) cost nothing and come in their user's turn.
    With `join`: when the next job is joinable, the next job of every other waiting user that is joinable too and
    stands no later than that job's end runs with it, in one `join(joinables) -> [result or exception, ...]`."""

    def __init__(self, join: Callable[[list[Any]], Awaitable[list[Any]]] | None = None):
        self.join = join
        self._waiting: dict[str, deque[_Job]] = {}
        self._ends: dict[str, float] = {}
        """Where each user's latest job ends."""
        self._clock = 0.0
        """Where the job served last stands."""
        self._server: asyncio.Task | None = None

    async def run(self, user: str, job: Callable[[], Awaitable[Any]], joinable: Any = None, cost: float = 0.0
                  ) -> Any:
        """`job`'s result, run in `user`'s turn; `cost`: its work, in tokens."""
        done = asyncio.get_running_loop().create_future()
        start = max(self._clock, self._ends.get(user, 0.0))
        self._ends[user] = start + cost
        self._waiting.setdefault(user, deque()).append(
            _Job(job, done, joinable if self.join else None, start, start + cost))
        if self._server is None or self._server.done():
            self._server = asyncio.ensure_future(self._serve())
        return await done

    async def _serve(self) -> None:
        while self._waiting:
            first = min(self._waiting, key=lambda user: self._waiting[user][0].start)  # ties: the rotation's order
            head = self._waiting[first][0]
            self._clock = head.start
            users = [first]
            if head.joinable is not None:
                users += [user for user, queue in self._waiting.items() if user != first
                          and queue[0].joinable is not None and queue[0].start <= head.end]
            jobs = [self._next(user) for user in users]
            try:
                outcomes = [await jobs[0].run()] if len(jobs) == 1 else await self.join([j.joinable for j in jobs])
            except Exception as error:  # the callers' to handle; the rotation goes on
                outcomes = [error] * len(jobs)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if job.done.cancelled():  # its caller has gone
                    continue
                if isinstance(outcome, BaseException):
                    job.done.set_exception(outcome)
                else:
                    job.done.set_result(outcome)

    def _next(self, user: str) -> _Job:
        """The user's next job, taken from its queue; a user with more waiting goes to the back of the rotation."""
        queue = self._waiting.pop(user)
        job = queue.popleft()
        if queue:
            self._waiting[user] = queue
        return job


class SupervisedLearner:
    """One base model's learner actor, as the service uses it: `call` for work on a run (in turns, supervised),
    `ask` for the rest."""

    def __init__(self, base_model: str, registry: Registry, *, join_users: bool = True, num_gpus: float = 0,
                 resources: dict[str, float] | None = None, **options):
        """`options` are the learner actor's (rl.learner.Learner's keyword arguments); `num_gpus` and `resources`
        (custom Ray resources, to place it on nodes that have them) its Ray actor's.
        `join_users`: waiting users' forward_backward calls go in one learner pass (see the module's docstring)."""
        self.base_model = base_model
        self.registry = registry
        self._actor_class = LearnerActor.options(num_gpus=num_gpus, resources=resources or {})
        self.options = options
        self.actor = self._actor_class.remote(base_model, **options)
        self.turns = Turns(join=self._forward_backward_together if join_users else None)
        self._absent = {model_id for model_id, run in registry.runs.items() if run["base_model"] == base_model}
        """Runs an earlier server on this storage made, restored on this actor when their next call comes."""
        self._lost: dict[str, str] = {}
        """Runs restored with work lost -> what their next call is told."""
        self._replacing = asyncio.Lock()

    # ---- calls -----------------------------------------------------------------------------------------------

    async def call(self, user: str, model_id: str, method: str, /, *args, **kwargs) -> Any:
        """`method` of the learner (given `args` and `kwargs`) for run `model_id`, in `user`'s turn."""
        async def job():
            await self._arrive(model_id)
            actor = self.actor
            try:
                return await getattr(actor, method).remote(*args, **kwargs)
            except DEATH as error:  # replaced in this turn, so no other call reaches a half-restored actor
                await self._replace(actor, error)
                raise self._restored(model_id, error) from None

        joinable = (model_id, args[1], kwargs.get("custom_loss")) if method == "forward_backward" else None
        tokens = args[1].tokens if method in BATCH_METHODS else 0
        result = await self.turns.run(user, job, joinable, tokens)
        self._track(model_id, method, args, kwargs, result)
        return result

    async def _forward_backward_together(self, calls: list[tuple]) -> list[Any]:
        """Several users' forward_backward calls, (model_id, batch, custom_loss) each, in one learner pass; each
        call's output or the error it alone raised."""
        outcomes: list[Any] = [None] * len(calls)
        ready = []
        for index, (model_id, _, _) in enumerate(calls):
            try:
                await self._arrive(model_id)
                ready.append(index)
            except Exception as error:
                outcomes[index] = error
        actor = self.actor
        try:
            outputs = await actor.forward_backward_many.remote([calls[index] for index in ready]) if ready else []
        except DEATH as error:
            await self._replace(actor, error)
            outputs = [self._restored(calls[index][0], error) for index in ready]
        for index, output in zip(ready, outputs, strict=True):
            outcomes[index] = output
        return outcomes

    async def _arrive(self, model_id: str) -> None:
        """Before a call's work, in its turn (a replacement may come in the turns before it): a run an earlier
        server made is restored; a run restored with work lost fails this call, saying so."""
        if model_id in self._absent:
            await self._restore_after_restart(model_id)
        if model_id in self._lost:
            raise RunRestored(self._lost.pop(model_id))

    def _restored(self, model_id: str, cause: Exception) -> RunRestored:
        """What a call in flight when its learner died is told, once the run is restored."""
        return RunRestored(self._lost.pop(model_id, None) or self._message(
            model_id, replaced(cause), self.registry.run_state(model_id)["restore_point"], lost=False))

    async def ask(self, method: str, /, *args, **kwargs) -> Any:
        """A call that changes no run (listings, checkpoint files), at once; retried once on a replaced actor.
        Never made from a turn's job: a dead actor is replaced in a turn of its own, as `watch` replaces it."""
        actor = self.actor
        try:
            return await getattr(actor, method).remote(*args, **kwargs)
        except DEATH as error:
            await self.turns.run(SUPERVISOR, lambda error=error: self._replace(actor, error))
            return await getattr(self.actor, method).remote(*args, **kwargs)

    def close(self) -> None:
        ray.kill(self.actor)

    async def watch(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Pings the actor every `interval_s` and replaces it as soon as it is found dead, so that a learner that
        dies between calls is back, with its runs restored, before anyone calls it. Runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            actor = self.actor
            try:
                await actor.describe.remote()
            except ray.exceptions.ActorUnavailableError:
                continue  # pinged again at the next interval (`_replace`)
            except DEATH as error:  # in a turn, so no call reaches the new actor before every run is restored
                await self.turns.run(SUPERVISOR, lambda actor=actor, error=error: self._replace(actor, error))

    # ---- supervision -----------------------------------------------------------------------------------------

    def _track(self, model_id: str, method: str, args: tuple, kwargs: dict, result: Any) -> None:
        """Keeps the registry's record of what the run's state equals (its restore point) and whether it changed
        since, across replacements and restarts of the server; and a checkpoint just saved is private, like every
        new one, whatever of its name was public before (deleted, expired or overwritten)."""
        if method in SAVES:
            self.registry.set_public(result.tinker_path if method == "save_weights_for_sampler" else result.path,
                                     False)
        state = self.registry.run_state(model_id)
        if method in CHANGES_STATE:
            self.registry.set_run_state(model_id, state["restore_point"], changed=True)
        elif method == "create":  # a new adapter, made again from the run's LoRA config and seed
            self.registry.set_run_state(model_id, None, changed=False)
        elif method == "save_weights":
            self.registry.set_run_state(model_id, (result.path, True), changed=False)
        elif method == "load_weights":  # load_weights(path, optimizer=..., model_id=...)
            self.registry.set_run_state(model_id, (args[0], kwargs["optimizer"]), changed=False)

    async def _replace(self, dead, cause: Exception) -> None:
        """A new actor in place of `dead` (unless a concurrent call replaced it already), every run restored.
        An actor that is only unreachable for now (Ray's ActorUnavailableError: a node's network blinked) is not
        replaced, which would lose every run's unsaved work: the call fails with that error instead."""
        if isinstance(cause, ray.exceptions.ActorUnavailableError):
            raise cause
        async with self._replacing:
            if self.actor is not dead:
                return
            ray.kill(dead, no_restart=True)
            self.actor = self._actor_class.remote(self.base_model, **self.options)
            for model_id, run in list(self.registry.runs.items()):
                if run["base_model"] != self.base_model or model_id in self._absent:
                    continue
                changed = self.registry.run_state(model_id)["changed"]
                try:
                    point, exact = await self._restore(model_id)
                except Exception as error:  # this run's checkpoint is unreadable: the others go on
                    self._lost[model_id] = (f"run {model_id}: its learner died ({type(cause).__name__}) and the "
                                            f"run could not be restored: {error}")
                    continue
                if changed or not exact:
                    self._lost[model_id] = self._message(model_id, replaced(cause), point, lost=True)

    async def _restore_after_restart(self, model_id: str) -> None:
        """Restores a run that an earlier server made; if its state had changed since its restore point, the
        call fails with a `RunRestored` that says so (the server cannot know what it lost)."""
        self._absent.discard(model_id)
        changed = self.registry.run_state(model_id)["changed"]
        try:
            point, exact = await self._restore(model_id)
        except Exception as error:
            raise RunRestored(f"run {model_id}: the server restarted and the run could not be restored: {error}"
                              ) from None
        if changed or not exact:
            raise RunRestored(self._message(model_id, "the server restarted", point, lost=True))

    async def _restore(self, model_id: str) -> tuple[tuple[str, bool] | None, bool]:
        """Puts the run on the actor as of its restore point; if it has none, or its checkpoint was deleted or
        expired since, as of its latest training checkpoint, else as a new adapter. Returns the checkpoint (path,
        with optimizer) it came from, None for a new adapter, and whether that is the restore point."""
        run = self.registry.runs[model_id]
        restore_point = self.registry.run_state(model_id)["restore_point"]
        point, exact = restore_point, True
        if restore_point is not None:
            try:
                await self.actor.load_weights.remote(restore_point[0], optimizer=restore_point[1], model_id=model_id)
            except ValueError:  # no such checkpoint any more (Ray raises the actor's ValueError as one)
                point, exact = None, False
        if point is None:
            point = await self._latest_checkpoint(model_id)
            if point is None:
                await self.actor.create.remote(self.base_model, LoraConfig.model_validate(run["lora"]),
                                               model_id=model_id)
            else:
                await self.actor.load_weights.remote(point[0], optimizer=point[1], model_id=model_id)
        self.registry.set_run_state(model_id, point, changed=False)
        return point, exact

    async def _latest_checkpoint(self, model_id: str) -> tuple[str, bool] | None:
        listed = (await self.actor.list_checkpoints.remote(model_id)).checkpoints
        training = [checkpoint for checkpoint in listed if checkpoint.checkpoint_type == "training"]
        return (max(training, key=lambda c: c.time).tinker_path, True) if training else None

    @staticmethod
    def _message(model_id: str, what: str, point: tuple[str, bool] | None, *, lost: bool) -> str:
        start = f"from {point[0]}" if point else "from a new adapter (the run had no training checkpoint)"
        after = "the steps and gradients after it are lost" if lost else "it had not changed since"
        return (f"run {model_id}: {what}; the run was restored {start}: {after}. This call did not run: "
                "send it again.")
