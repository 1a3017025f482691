"""Your reward function (data.reward_fn) in worker processes: several completions scored at once, each within a
time limit.

A scorer that runs code, calls a judge or asks math-verify about a pathological answer can take seconds or never
return. In the driver it would score one completion at a time and hang the run with it; here `data.reward_workers`
processes (spawned, not forked: the driver holds Ray's threads and sockets) each score one completion at a time, and
a call that outlasts `data.reward_timeout` seconds has its process killed and replaced, and scores 0
(`TIMED_OUT`; the step logs the share of such completions as env/reward_timeout), as verl's process-pool reward
manager does. An exception in your function, or a worker that dies, ends the run naming data.reward_fn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import queue
import signal
import traceback
import weakref
from multiprocessing.connection import Connection

from rl.answers import CustomScore, custom_score_of, reward_arguments, reward_function

TIMED_OUT = CustomScore(0.0, 0.0, {})
"""What a completion whose scoring outlasted data.reward_timeout scores."""
STARTUP_TIMEOUT = 120.0
"""Seconds a worker may take to start and import your function's module."""


def _serve(spec: str, connection: Connection) -> None:
    """A worker: calls your function with each set of keywords it receives (rl.answers.reward_arguments) until the
    driver closes its end; sends back ("score", what the function returned) or ("error", the traceback)."""
    os.setpgrp()  # a timeout kills what your function started too (code it runs, say)
    function = reward_function(spec)
    connection.send(("ready", None))
    while True:
        try:
            arguments = connection.recv()
        except EOFError:
            return
        try:
            connection.send(("score", function(**arguments)))
        except Exception:  # your code: whatever it raises goes back to the driver, which names it
            connection.send(("error", traceback.format_exc()))


class _Worker:
    def __init__(self, spec: str):
        self.spec = spec
        self.process, self.connection = None, None

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, theirs = context.Pipe()
        # Daemonic: gone with the driver, whatever ends it.
        self.process = context.Process(target=_serve, args=(self.spec, theirs), daemon=True,
                                       name="rl-reward-worker")
        self.process.start()
        theirs.close()
        # Started and your module imported before the first call's time limit starts.
        try:
            started = self.connection.poll(STARTUP_TIMEOUT) and self.connection.recv() == ("ready", None)
        except EOFError:  # it died on the way (its error is on stderr)
            started = False
        if not started:
            self.stop()
            raise ValueError(f"data.reward_fn={self.spec}: its worker process did not start (within "
                             f"{STARTUP_TIMEOUT:g} s)")

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):  # no group yet: killed before it made its own
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.kill()
            self.process.join()
            self.connection.close()
            self.process, self.connection = None, None

    def call(self, job: dict, timeout: float) -> tuple[str, object]:
        if self.process is not None and not self.process.is_alive():  # killed from outside since its last call
            self.stop()
        if self.process is None:
            self.start()
        try:
            self.connection.send(job)
            if not self.connection.poll(timeout):
                self.stop()  # the next call starts a fresh process
                return "timeout", None
            return self.connection.recv()
        except (EOFError, OSError):  # it died during the call
            self.process.join(5)
            code = self.process.exitcode
            self.stop()
            return "error", f"its worker process died (exit code {code})"


class RewardWorkers:
    """`workers` processes that score completions with the function `spec` names (rl.answers.reward_function),
    started at their first call; each call waits for an idle one."""

    def __init__(self, spec: str, workers: int, timeout: float):
        self.spec, self.timeout = spec, timeout
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(workers):
            self._idle.put(_Worker(spec))
        # A thread per worker waits for it, so that the event loop never does.
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rl-reward")
        weakref.finalize(self, RewardWorkers._close, list(self._idle.queue), self._threads)

    async def score(self, completion: str, reference: str | None, example: dict | None) -> CustomScore:
        """What your function scores `completion` (as rl.answers.custom_score), or TIMED_OUT."""
        job = reward_arguments(completion, reference, example)
        outcome, value = await asyncio.get_running_loop().run_in_executor(self._threads, self._call, job)
        if outcome == "timeout":
            return TIMED_OUT
        if outcome == "error":
            raise ValueError(f"data.reward_fn={self.spec} failed on a completion: {value}")
        return custom_score_of(self.spec, value)

    def _call(self, job: dict) -> tuple[str, object]:
        worker = self._idle.get()
        try:
            return worker.call(job, self.timeout)
        finally:
            self._idle.put(worker)

    @staticmethod
    def _close(workers: list[_Worker], threads: concurrent.futures.ThreadPoolExecutor) -> None:
        threads.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.stop()
