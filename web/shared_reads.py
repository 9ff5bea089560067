"""Reads every viewer shares, computed once per web worker per half second: fifty open pages
polling the overview (or health checkers on the API) cost one computation, not fifty. Half a
second is far inside the dashboard's 2 s from a change to the page. The charts, heavier, are
shared for a few seconds and bounded in threads (`SharedComputation`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cachetools import TTLCache, cached

from controlplane import services

SHARED_FOR_S = 0.5


# Keyed by the control plane itself (held for the TTL), not by id(): a new one may reuse the
# id of one gone, and must not be answered with its figures.
@cached(TTLCache(maxsize=8, ttl=SHARED_FOR_S), key=lambda cp: cp, lock=threading.Lock())
def overview(cp: services.ControlPlane) -> dict[str, Any]:
    return services.views.overview(cp)


@cached(TTLCache(maxsize=8, ttl=SHARED_FOR_S), key=lambda cp: cp, lock=threading.Lock())
def health(cp: services.ControlPlane) -> dict[str, Any]:
    return services.health_summary(cp)


# -- heavy reads: the charts ----------------------------------------------------------------------
CHARTS_FOR_S = 5.0  # Prometheus steps are >= 5 s in every range: a fresher figure shows nothing new
HEAVY_AT_ONCE = 2  # threads of a worker (of 8) computing or awaiting a heavy read; the rest serve
WAIT_FOR_FIRST_S = 20.0  # a viewer with nothing to show yet waits this long for the one computing
KEEP_KEYS = 32  # answers kept per worker (4 ranges for each control plane a test makes)
T = TypeVar("T")


class Busy(Exception):
    """Every heavy slot of this worker is taken and there is no earlier answer to give."""

    retry_after_s = 2


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    at: float
    value: T


class SharedComputation(Generic[T]):
    """Each key's value computed by one thread at a time and kept `fresh_s`: N viewers cost one
    computation per `fresh_s`. While it is recomputed, others get the last answer; a viewer
    with none waits for the one computing. At most `at_once` threads per worker compute or wait
    (beyond, `Busy`), so health checks and light pages always find a thread, however many
    heavy pages are open. A computation whose viewer left still finishes and serves the next."""

    def __init__(
        self,
        fresh_s: float,
        at_once: int,
        wait_s: float = WAIT_FOR_FIRST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fresh_s, self.wait_s, self.clock = fresh_s, wait_s, clock
        self._slots = threading.BoundedSemaphore(at_once)
        self._lock = threading.Lock()
        self._answers: dict[Hashable, Answer[T]] = {}
        self._computing: dict[Hashable, threading.Event] = {}

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            last = self._answers.get(key)
            if last is not None and self.clock() - last.at < self.fresh_s:
                return last.value
            running = self._computing.get(key)
            if running is not None and last is not None:
                return last.value  # being recomputed: the last answer meanwhile
            if not self._slots.acquire(blocking=False):
                if last is not None:
                    return last.value
                raise Busy()
            if running is None:
                running = self._computing[key] = threading.Event()
                mine = True
            else:
                mine = False
        try:
            if mine:
                return self._compute(key, compute, running)
            running.wait(self.wait_s)
            with self._lock:
                answer = self._answers.get(key)
            if answer is None:  # it failed, or took longer than a viewer waits
                raise Busy()
            return answer.value
        finally:
            self._slots.release()

    def _compute(self, key: Hashable, compute: Callable[[], T], done: threading.Event) -> T:
        try:
            value = compute()
            with self._lock:
                self._answers[key] = Answer(self.clock(), value)
                if len(self._answers) > KEEP_KEYS:
                    oldest = min(self._answers, key=lambda k: self._answers[k].at)
                    del self._answers[oldest]
            return value
        finally:
            with self._lock:
                del self._computing[key]
            done.set()


charts = SharedComputation[bytes](CHARTS_FOR_S, HEAVY_AT_ONCE)
