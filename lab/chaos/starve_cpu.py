"""starve-cpu: the synchronous standby and the control plane given the CPU in short bursts only
(every process of each SIGSTOPped 400 ms of every 500 ms) for a few seconds, as on a machine
that others starve. Nothing dies and nothing hangs for long: it heals by itself, and nothing
should fail over or be fenced (any action is a false one)."""

from __future__ import annotations

import contextlib
import signal
import time
from typing import ClassVar

from lab.chaos.base import (
    BaseFault,
    ChaosError,
    FaultRecord,
    Stamp,
    continue_processes,
    processes_of,
    record,
    wait_s,
)
from lab.errors import LabError
from lab.observe import StackView
from remediation.executors.processes import Proc, signal_all

PERIOD_S = 0.5
STOPPED_S = 0.4


class StarveCpu(BaseFault):
    kind: ClassVar[str] = "starve-cpu"
    expected_actions: ClassVar[frozenset[str]] = frozenset()
    default_duration_s: ClassVar[float] = 5.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        standby = view.standby()
        if standby is None:
            raise ChaosError("no standby to starve (no single primary)")
        components = (standby, "controlplane")
        for name in components:
            if not processes_of(view, name):
                raise ChaosError(f"{name} is not running: nothing to starve")
        stopped: set[Proc] = set()
        cycles = 0
        started = Stamp.now()
        deadline = started.mono + duration_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                # Looked up again each cycle: a backend forked meanwhile is starved too.
                procs = _processes(view, components)
                signal_all(procs, signal.SIGSTOP)
                stopped |= procs
                wait_s(min(STOPPED_S, left))
                signal_all(stopped, signal.SIGCONT)
                cycles += 1
                wait_s(min(PERIOD_S - STOPPED_S, max(0.0, deadline - time.monotonic())))
        finally:
            # Always, whatever stopped the loop: everything ever stopped, then whatever is of
            # them now (SIGCONT to a running process does nothing).
            ended = continue_processes(stopped)
            with contextlib.suppress(LabError, OSError, KeyError):
                continue_processes(_processes(view, components))
        return record(
            self.kind,
            f"{standby}+controlplane",
            started,
            ended,
            processes=len(stopped),
            cycles=cycles,
            stopped_ms_per_period=round(STOPPED_S * 1000),
            period_ms=round(PERIOD_S * 1000),
        )

    def targets(self, record: FaultRecord) -> frozenset[str]:
        """None: it heals by itself, and nothing of the control plane's is to act."""
        return frozenset()


def _processes(view: StackView, components: tuple[str, ...]) -> set[Proc]:
    return set().union(*(processes_of(view, name) for name in components))
