"""What every probe is and returns: `Probe.run() -> ProbeResult`, never an exception."""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

import kinds


class Health(StrEnum):
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"
    # Could not look (e.g. the data cannot be read while the database fails over): neither a
    # failure nor a success; it opens no incident and resolves none.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    health: Health
    summary: str
    latency_ms: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)


class ProbeConfigError(ValueError):
    """A probe's params do not fit its kind; the message names the param."""


class Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Probe(ABC):
    """One check of one target. Subclasses catch their own client's errors and report DOWN."""

    kind: ClassVar[str]
    Params: ClassVar[type[Params]]
    # What a target that cannot be reached means: DOWN for most kinds; UNKNOWN for a kind that
    # judges data through another service (the service's own probes report it down).
    unreachable: ClassVar[Health] = Health.DOWN

    def __init__(self, name: str, params: Mapping[str, Any], timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        try:
            self.params = self.Params.model_validate(dict(params))
        except ValidationError as exc:
            problems = kinds.params_problems(exc)
            raise ProbeConfigError(f"probe {name!r} ({self.kind}): {problems}") from None

    @abstractmethod
    def check(self) -> ProbeResult:
        """Look once, within `timeout_s`; report `unreachable` for a dead target, do not raise."""

    def watch(self, on_event: Callable[[], None], stop: threading.Event) -> None:
        """Optional: watch the target between runs until `stop` is set, calling `on_event`
        when something happened that the next run may answer differently (a held connection
        dropped): the caller then runs the probe at once. An event only brings a run forward;
        what it reports is the run's to say. The default watches nothing."""
        return

    def overran(self, summary: str) -> ProbeResult:
        """What a run the runner gave up on (past `timeout_s`: a hung target, or a machine too
        busy to finish the look) reports. `unreachable` by default; a kind with a grace
        (pg_primary) counts the overrun as silence within it, never as more."""
        return ProbeResult(self.unreachable, summary)

    def run(self) -> ProbeResult:
        started = time.perf_counter()
        result = self.check()
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        return ProbeResult(result.health, result.summary, latency_ms, result.details)


def down(summary: str, **details: Any) -> ProbeResult:
    return ProbeResult(Health.DOWN, summary, details=details)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


T = TypeVar("T")


async def opened(connect: Awaitable[T], close: Callable[[T], None]) -> T:
    """`await connect` (a connection being opened), but if the caller is cancelled (its
    timeout, or the runner stopping) in the moment after the connection opened and before the
    caller got it, the connection is closed, not leaked: asyncio then delivers the cancellation
    instead of the result, and nobody else holds the transport."""
    task = asyncio.ensure_future(connect)
    try:
        return await task
    except BaseException:
        if task.done():
            _close_opened(close, task)
        else:
            task.add_done_callback(lambda done: _close_opened(close, done))
        raise


def _close_opened(close: Callable[[T], None], task: asyncio.Future[T]) -> None:
    if not task.cancelled() and task.exception() is None:
        close(task.result())
