"""kill-primary: SIGKILL every process of the leader at once, as a machine dying would."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import BaseFault, ChaosError, FaultRecord, kill_component, record
from lab.observe import StackView


class KillPrimary(BaseFault):
    kind: ClassVar[str] = "kill-primary"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"failover", "rejoin", "in_doubt"})
    target: ClassVar[str] = "shop-db-cluster"

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        leader = view.leader()
        if leader is None:
            raise ChaosError("no single primary to kill")
        stamp, pids = kill_component(view, leader)
        return record(self.kind, leader, stamp, stamp, pids=pids)
