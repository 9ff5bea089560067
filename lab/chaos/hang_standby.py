"""hang-standby: SIGSTOP every process of the synchronous standby for a while, then SIGCONT
(commits would wait for it: the control plane goes asynchronous and fences it)."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import (
    BaseFault,
    ChaosError,
    FaultRecord,
    hang,
)
from lab.observe import StackView


class HangStandby(BaseFault):
    kind: ClassVar[str] = "hang-standby"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"rejoin"})
    target: ClassVar[str] = "shop-db-cluster"
    default_duration_s: ClassVar[float] = 15.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        standby = view.standby()
        if standby is None:
            raise ChaosError("no standby to hang (no single primary)")
        return hang(self.kind, view, standby, duration_s)
