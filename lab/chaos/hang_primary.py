"""hang-primary: SIGSTOP every process of the leader for a while, then SIGCONT (what is left
of it: the control plane fences a primary hung past its grace)."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import (
    BaseFault,
    ChaosError,
    FaultRecord,
    hang,
)
from lab.observe import StackView


class HangPrimary(BaseFault):
    kind: ClassVar[str] = "hang-primary"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"failover", "rejoin", "in_doubt"})
    target: ClassVar[str] = "shop-db-cluster"
    default_duration_s: ClassVar[float] = 15.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        leader = view.leader()
        if leader is None:
            raise ChaosError("no single primary to hang")
        return hang(self.kind, view, leader, duration_s)
