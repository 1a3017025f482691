"""Futures as Tinker's SDK sees them: a request returns a request id at once, its result is long-polled.

A job is any awaitable factory: a coroutine function, or a lambda returning a Ray ObjectRef (awaitable).

Each training run executes its requests in `seq_id` order, whatever order they arrive in (the SDK sends the
chunks of one step concurrently, the first last); a seq_id that never comes (its client failed before sending)
holds the run up for GAP_SECONDS only. A request seen again with the same (model_id, seq_id), as a retry is, gets
the same request id and is not run twice. Sampling requests run as they come. A failure is kept as
`{"error", "category"}`, the shape the SDK turns into a RequestFailedError. A result is dropped a minute after it
was first retrieved (an hour after it settled, if never), so a server's memory does not grow with its traffic.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

POLL_SECONDS = 20.0
"""How long retrieve_future holds a request before answering try_again: well under the SDK's 45 s timeout."""
GAP_SECONDS = 10.0
"""How long a run's later requests wait for a missing seq_id before going on without it."""
KEEP_SECONDS = (60.0, 3600.0)
"""How long a result is kept after it was first retrieved (for a resent retrieve), and at most after it settled."""
REFUSED_AHEAD = 32
"""A request refused before it was queued takes its turn, failing, if its seq_id is at most this far ahead of the
run's next (a client's own requests in flight are)."""
SEEN_KEPT = 1024
"""How many of a run's latest seq_ids keep their request id, so that a resent request is not run twice."""


@dataclass
class _RunQueue:
    """One training run's queue: jobs wait for their seq_id's turn."""

    next_seq_id: int = 1
    """The SDK numbers a run's requests 1, 2, 3, ..."""
    waiting: dict[int, tuple[str, Callable[[], Awaitable[Any]]]] = field(default_factory=dict)
    seen: dict[int, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class FutureStore:
    def __init__(self, poll_seconds: float = POLL_SECONDS):
        self.poll_seconds = poll_seconds
        self._results: dict[str, asyncio.Future] = {}
        self._owners: dict[str, str] = {}
        self._runs: dict[str, _RunQueue] = {}
        self._keys: dict[tuple, str] = {}
        self._key_of: dict[str, tuple] = {}

    def submit(self, owner: str, job: Callable[[], Awaitable[Any]], *, key: tuple | None = None) -> str:
        """Runs `job` now; its result (or failure) is kept under the returned request id. A `key` seen before
        (a resent request) returns the first request's id instead of running again."""
        if key is not None and key in self._keys:
            return self._keys[key]
        request_id = self._new(owner)
        if key is not None:
            self._keys[key], self._key_of[request_id] = request_id, key
        asyncio.ensure_future(self._settle(request_id, job))
        return request_id

    def submit_ordered(self, owner: str, model_id: str, seq_id: int | None, job: Callable[[], Awaitable[Any]]) -> str:
        """Runs `job` after every lower seq_id of `model_id`; a repeated (model_id, seq_id) is the same request."""
        if seq_id is None:
            raise ValueError(f"seq_id: required on a training request to {model_id!r} (a run's requests run in "
                             "seq_id order)")
        run = self._runs.setdefault(model_id, _RunQueue())
        if seq_id in run.seen:
            return run.seen[seq_id]
        request_id = run.seen[seq_id] = self._new(owner)
        if seq_id < run.next_seq_id:  # it came after the run went on without it: it runs now, out of turn
            asyncio.ensure_future(self._settle(request_id, job))
            return request_id
        run.waiting[seq_id] = (request_id, job)
        run.arrived.set()
        asyncio.ensure_future(self._drain(run))
        return request_id

    def refused(self, owner: str, model_id: str, seq_id: int | None, error: Exception) -> None:
        """A training request refused at the edge (over a limit) still takes its turn, failing, so that the run's
        later requests (the SDK sends a batch's chunks and the optim_step after them at once) do not wait
        GAP_SECONDS for a seq_id that will never come. Only a seq_id within REFUSED_AHEAD of the run's next: one
        made up far ahead would move the run's order past its real requests."""
        run = self._runs.setdefault(model_id, _RunQueue())
        if seq_id is None or seq_id in run.seen or not run.next_seq_id <= seq_id < run.next_seq_id + REFUSED_AHEAD:
            return

        async def fail() -> None:
            raise error

        self.submit_ordered(owner, model_id, seq_id, fail)

    async def _drain(self, run: _RunQueue) -> None:
        async with run.lock:
            while run.waiting:
                if run.next_seq_id not in run.waiting:
                    # A gap: an earlier request is on its way (chunks arrive out of order) or will never come
                    # (its client failed before sending). Wait for it a while, then go on without it.
                    run.arrived.clear()
                    try:
                        await asyncio.wait_for(run.arrived.wait(), GAP_SECONDS)
                        continue
                    except TimeoutError:
                        run.next_seq_id = min(run.waiting)
                request_id, job = run.waiting.pop(run.next_seq_id)
                await self._settle(request_id, job)
                run.next_seq_id += 1
                while len(run.seen) > SEEN_KEPT and (oldest := next(iter(run.seen))) < run.next_seq_id:
                    del run.seen[oldest]

    def _new(self, owner: str) -> str:
        request_id = f"req-{secrets.token_hex(8)}"
        self._results[request_id] = asyncio.get_running_loop().create_future()
        self._owners[request_id] = owner
        return request_id

    async def _settle(self, request_id: str, job: Callable[[], Awaitable[Any]]) -> None:
        future = self._results[request_id]
        try:
            future.set_result(await job())
        except Exception as error:
            cause = getattr(error, "cause", None) or error  # an actor's exception arrives wrapped by Ray
            if isinstance(cause, ValueError):  # bad input, in our components' convention: the caller's to fix
                future.set_result({"error": str(cause), "category": "user"})
            else:
                future.set_result({"error": f"{type(cause).__name__}: {cause}", "category": "server"})
        asyncio.get_running_loop().call_later(KEEP_SECONDS[1], self._forget, request_id)

    async def retrieve(self, owner: str, request_id: str, timeout: float | None = None) -> Any | None:
        """The result, or None if it is not ready within `timeout` seconds (default: the store's poll_seconds;
        the caller answers try_again)."""
        if self._owners.get(request_id) != owner:
            raise ValueError(f"unknown request_id {request_id!r}")
        future = self._results[request_id]
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self.poll_seconds if timeout is None else timeout)
        except TimeoutError:
            return None
        asyncio.get_running_loop().call_later(KEEP_SECONDS[0], self._forget, request_id)
        return result

    def _forget(self, request_id: str) -> None:
        """Drops a result (a long-running server would otherwise keep every result it ever gave); a training
        request's id stays known to its run's queue (its latest SEEN_KEPT), so a resent request is still not run
        twice; a sample request resent this late is sampled again."""
        self._results.pop(request_id, None)
        self._owners.pop(request_id, None)
        self._keys.pop(self._key_of.pop(request_id, None), None)
