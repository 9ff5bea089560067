"""What a fault is (a kind that runs against a lab stack and records its exact start and end),
and the process operations the kinds share."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

from lab.errors import LabError
from lab.observe import StackView
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import (
    Proc,
    in_directory,
    instance_processes,
    kill_tree,
    signal_all,
)


class ChaosError(LabError):
    """A fault could not be injected (no primary to kill, a stack not made by the lab...)."""


@dataclass(frozen=True, slots=True)
class Stamp:
    """One instant, as the wall clock (UTC, comparable with the control plane's records) and
    as the monotonic clock (for durations in this process)."""

    at: datetime
    mono: float

    @classmethod
    def now(cls) -> Stamp:
        return cls(datetime.now(UTC), time.monotonic())


@dataclass(slots=True)
class FaultRecord:
    kind: str
    target: str
    started: Stamp
    ended: Stamp
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "started_at": self.started.at.isoformat(),
            "ended_at": self.ended.at.isoformat(),
            "duration_s": round(self.ended.mono - self.started.mono, 3),
            "details": self.details,
        }


class Fault(Protocol):
    """One fault kind. `run` blocks until the fault is over (a hang woken, a server started
    again) and returns when it began and ended; `is_recovered` says whether what the fault
    broke beyond the cluster's redundancy works again (a cache serving true prices)."""

    kind: ClassVar[str]
    # What the control plane is expected to run against it; any other run is a false action.
    expected_actions: ClassVar[frozenset[str]]
    # Damages data: a restore needing approval follows. Never in a game day unless named.
    destructive: ClassVar[bool]
    default_duration_s: ClassVar[float]
    # Product ids a game day's load never orders: the fault's own (an order invalidates its
    # product's cache entry, and would undo the fault before the control plane looks).
    reserved_products: ClassVar[frozenset[int]]

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord: ...

    def is_recovered(self, view: StackView) -> bool: ...

    def targets(self, record: FaultRecord) -> frozenset[str]:
        """The control plane's targets (services of its targets file) this fault hits: an
        incident on one of them detects it; a run on each, started after the fault and
        succeeded before the stack is whole again, heals it (lab/verdict.py `healer`)."""
        ...


class BaseFault:
    kind: ClassVar[str] = ""
    expected_actions: ClassVar[frozenset[str]] = frozenset()
    destructive: ClassVar[bool] = False
    default_duration_s: ClassVar[float] = 0.0
    reserved_products: ClassVar[frozenset[int]] = frozenset()
    # The control plane's target, when it is not the component the fault hits (a node's
    # fault is the cluster's: failover and rejoin act on `shop-db-cluster`).
    target: ClassVar[str] = ""

    def is_recovered(self, view: StackView) -> bool:
        return True

    def targets(self, record: FaultRecord) -> frozenset[str]:
        return frozenset({self.target or record.target})


def processes_of(view: StackView, component: str) -> set[Proc]:
    """Every process of a component: its recorded pid's tree, and for PostgreSQL whatever
    works in its data directory (each backend setsid()s; they outlive a dead postmaster)."""
    comp = view.components()[component]
    pid = comp.get("pid")
    return instance_processes(pid if isinstance(pid, int) else None, comp.get("data_dir"))


def kill_component(view: StackView, component: str) -> tuple[Stamp, list[int]]:
    """SIGKILL every process of it at once, as a machine dying would; then make sure."""
    procs = processes_of(view, component)
    if not procs:
        raise ChaosError(f"{component} is not running: nothing to kill")
    signal_all(procs, signal.SIGKILL)
    stamp = Stamp.now()
    data_dir = view.components()[component].get("data_dir")
    survivors = kill_tree(procs, find=in_directory(data_dir) if data_dir else None)
    if survivors:
        raise ChaosError(f"{component}: {len(survivors)} processes survived SIGKILL")
    return stamp, sorted(p.pid for p in procs)


def stop_component(view: StackView, component: str) -> tuple[Stamp, set[Proc]]:
    """SIGSTOP every process of it: it hangs, its sockets open, its kernel acknowledging."""
    procs = processes_of(view, component)
    if not procs:
        raise ChaosError(f"{component} is not running: nothing to hang")
    signal_all(procs, signal.SIGSTOP)
    return Stamp.now(), procs


def continue_processes(procs: set[Proc]) -> Stamp:
    signal_all(procs, signal.SIGCONT)  # those fenced meanwhile are gone: skipped
    return Stamp.now()


def start_component(view: StackView, component: str) -> int:
    """Start a component again from its recipe in stack.json (the control plane's way)."""
    return LabExecutor(view.stack_file).restart(component)


def is_running(view: StackView, component: str) -> bool:
    return LabExecutor(view.stack_file).is_running(component)


def wait_s(seconds: float) -> None:
    """A fault's duration: the one sleep that is the point, not a wait for state."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.2))


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def record(kind: str, target: str, started: Stamp, ended: Stamp, **details: Any) -> FaultRecord:
    return FaultRecord(kind, target, started, ended, details)


def hang(kind: str, view: StackView, component: str, duration_s: float) -> FaultRecord:
    """Every process of `component` stopped (SIGSTOP) for `duration_s`, then continued."""
    started, procs = stop_component(view, component)
    try:
        wait_s(duration_s)
    finally:
        ended = continue_processes(procs)
    return record(kind, component, started, ended, processes=len(procs))
