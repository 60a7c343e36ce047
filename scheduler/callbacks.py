"""Running services' callbacks with a time limit, and switching off a service whose callback keeps hanging.

A callback runs in the scheduler's process: one that never returns would hold its request
(and the plugin's spool head behind it) forever. Each call runs in a pool thread and is given
up after `DICOMFLOW_CALLBACK_TIMEOUT` seconds: that event's job is not scheduled and the
time-out is reported like a raising callback. A Python thread cannot be killed, so the stuck
call keeps its thread; after `DICOMFLOW_CALLBACK_STRIKES` time-outs in a row the service's
job is switched off (reported by `GET /api/v1/services` and in the log) so that it cannot use
up the pool. It comes back when its settings or callback are reloaded (`service.sh install`,
a change of its files), on `POST /api/v1/services/<jobName>/resume`, or when the scheduler
restarts.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from dicomflow import keys
from dicomflow.errors import DicomflowError
from scheduler.registry import LoadedJob

log = logging.getLogger(__name__)

#: Threads for callbacks. Stuck calls keep theirs; a service is switched off after a few.
POOL_THREADS = 32


class CallbackTimeout(DicomflowError):
    """A callback did not return within the time limit; its job is not scheduled."""


class _NoAnswer(Exception):
    """The pool's call did not finish in time (not TimeoutError: a callback may raise that)."""


class _Call:
    """One call handed to a pool thread, and its outcome."""

    __slots__ = ("func", "kwargs", "done", "result", "error")

    def __init__(self, func: Callable[..., Any], kwargs: dict[str, Any]):
        self.func, self.kwargs = func, kwargs
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class DaemonPool:
    """Threads that run calls, grown on demand up to `size`.

    Not concurrent.futures: its threads are joined when the interpreter exits, so one stuck
    callback would keep the scheduler from stopping. These are daemon threads.
    """

    def __init__(self, size: int):
        self.size = size
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def run(self, func: Callable[..., Any], kwargs: dict[str, Any], timeout: float) -> Any:
        """`func(**kwargs)` in a pool thread; raises _NoAnswer after `timeout` seconds."""
        call = _Call(func, kwargs)
        with self._lock:
            if self._idle == 0 and self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._serve, name=f"callback-{self._threads}", daemon=True).start()
        self._calls.put(call)
        if not call.done.wait(timeout):
            raise _NoAnswer
        if call.error is not None:
            raise call.error
        return call.result

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            call = self._calls.get()
            with self._lock:
                self._idle -= 1
            try:
                call.result = call.func(**call.kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who reports it
                call.error = exc
            call.done.set()


class CallbackRunner:
    """Calls callbacks with a time limit and keeps the list of switched-off jobs."""

    def __init__(self, connection: redis.Redis, timeout: float, strikes: int):
        self.connection = connection
        self.timeout = timeout
        self.strikes = strikes
        self._pool = DaemonPool(POOL_THREADS) if timeout > 0 else None
        self._lock = threading.Lock()
        self._in_a_row: dict[str, int] = {}
        #: jobName -> (the callback that was switched off, the report).
        self._off: dict[str, tuple[Any, dict[str, Any]]] = {}
        try:
            connection.delete(keys.SUSPENDED)  # what an earlier process switched off starts again
        except redis.RedisError as exc:
            log.warning("could not clear the switched-off callbacks of an earlier run: %s", exc)

    def call(self, job: LoadedJob, **kwargs: Any) -> Any:
        """`job.callback(**kwargs)` within the time limit.

        Raises:
            CallbackTimeout: no answer in time (counted towards switching the service off).
            Exception: whatever the callback raised.
        """
        if self._pool is None:
            return job.callback(**kwargs)
        try:
            result = self._pool.run(job.callback, kwargs, self.timeout)
        except _NoAnswer:
            self._strike(job)
            raise CallbackTimeout(f"the callback did not return within {self.timeout:g} s") from None
        if self._in_a_row:
            with self._lock:
                self._in_a_row.pop(job.spec.jobName, None)
        return result

    def switched_off(self, job: LoadedJob) -> dict[str, Any] | None:
        """The report of a switched-off job, None if it runs (a reloaded callback runs again)."""
        entry = self._off.get(job.spec.jobName)
        if entry is None:
            return None
        if entry[0] is not job.callback:
            self.resume(job.spec.jobName)
            return None
        return entry[1]

    def resume(self, job_name: str) -> bool:
        """Switch a job back on; False if it was not off."""
        with self._lock:
            entry = self._off.pop(job_name, None)
            self._in_a_row.pop(job_name, None)
        if entry is not None:
            self.connection.hdel(keys.SUSPENDED, job_name)
            log.warning("callback of %s switched on again", job_name)
        return entry is not None

    def report(self) -> dict[str, dict[str, Any]]:
        """jobName -> why it is switched off."""
        return {name: entry[1] for name, entry in self._off.items()}

    def _strike(self, job: LoadedJob) -> None:
        name = job.spec.jobName
        with self._lock:
            count = self._in_a_row.get(name, 0) + 1
            self._in_a_row[name] = count
            if count < self.strikes or name in self._off:
                return
            report = {"jobName": name, "service": job.service, "since": time.time(),
                      "reason": f"its callback timed out {count} times in a row (limit {self.timeout:g} s)"}
            self._off[name] = (job.callback, report)
        log.error("switched off %s: %s; resume with POST /api/v1/services/%s/resume", name, report["reason"], name)
        try:
            self.connection.hset(keys.SUSPENDED, name, json.dumps(report))
        except redis.RedisError as exc:
            log.warning("could not record that %s is switched off: %s", name, exc)
