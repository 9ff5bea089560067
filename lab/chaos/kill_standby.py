"""kill-standby: SIGKILL every process of the synchronous standby."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import BaseFault, ChaosError, FaultRecord, kill_component, record
from lab.observe import StackView


class KillStandby(BaseFault):
    kind: ClassVar[str] = "kill-standby"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"rejoin"})
    target: ClassVar[str] = "shop-db-cluster"

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        standby = view.standby()
        if standby is None:
            raise ChaosError("no standby to kill (no single primary)")
        stamp, pids = kill_component(view, standby)
        return record(self.kind, standby, stamp, stamp, pids=pids)
