"""Runs' `forward_backward` calls to one learner actor, coalesced into `Learner.forward_backward_many` passes.

A sweep's runs share a learner (rl.sweep); each run's loop awaits its own calls, in a thread and event loop of
its own. `CoalescedCalls` sends a call at once when the learner is idle; calls that arrive while a pass is under
way wait and go together in the next pass. Nothing waits on purpose for a batch to fill, so a run alone is never
slowed by waiting for others. Whether a pass over several runs is faster depends on the micro-batch size and
the device (docs/benchmarks.md, "Several runs in one learner pass"), so it is a setting: `learner.batch_runs`.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import ray

from rl.types import ForwardBackwardInput, ForwardBackwardOutput


class CoalescedCalls:
    def __init__(self, learner: ray.actor.ActorHandle):
        self.learner = learner
        self.passes = 0
        """Passes sent to the learner so far (fewer than calls when calls were coalesced)."""
        self._lock = threading.Lock()
        self._waiting: list[tuple[str, ForwardBackwardInput, Future]] = []
        self._sending = False

    async def forward_backward(self, model_id: str, batch: ForwardBackwardInput) -> tuple[ForwardBackwardOutput, int]:
        """The run's `forward_backward`, computed in a pass with whatever other runs' calls wait beside it, and how
        many runs that pass computed; its error, if it alone failed, or the pass's (a learner that died) is raised
        here."""
        result: Future = Future()
        with self._lock:
            self._waiting.append((model_id, batch, result))
            start, self._sending = not self._sending, True
        if start:
            threading.Thread(target=self._send, name="coalesced-forward-backward", daemon=True).start()
        return await asyncio.wrap_future(result)

    def _send(self) -> None:
        """Sends the waiting calls, a pass at a time, until none wait."""
        while True:
            with self._lock:
                calls, self._waiting = self._waiting, []
                if not calls:
                    self._sending = False
                    return
            self.passes += 1
            try:
                outputs = ray.get(self.learner.forward_backward_many.remote(
                    [(model_id, batch, None) for model_id, batch, _ in calls]))
            except BaseException as error:  # the learner died, or the pass could not be sent: every caller hears
                outputs = [error] * len(calls)
            for (_, _, result), output in zip(calls, outputs, strict=True):
                if isinstance(output, BaseException):
                    result.set_exception(output)
                else:
                    result.set_result((output, len(calls)))
