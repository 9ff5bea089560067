"""stop-prometheus / stop-alertmanager: the monitoring dies, and a moment later a shop instance
dies too: healing must go on from the control plane's direct probes (no alert can come while
the monitoring is away). Nobody starts the monitoring again but the control plane, whose
probes see it gone and whose restart policy brings it back."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import (
    BaseFault,
    FaultRecord,
    kill_component,
    record,
    wait_s,
)
from lab.observe import StackView
from remediation.executors.lab import LabExecutor

SHOP_DIES_AFTER_S = 2.0


class StopMonitoring(BaseFault):
    component: ClassVar[str] = ""
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restart", "in_doubt"})
    default_duration_s: ClassVar[float] = 20.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        started, _ = kill_component(view, self.component)
        wait_s(min(SHOP_DIES_AFTER_S, duration_s))
        shop = view.shops()[-1]
        killed_at, _ = kill_component(view, shop)
        return record(
            self.kind,
            self.component,
            started,
            killed_at,
            shop_killed=shop,
            shop_killed_after_s=round(killed_at.mono - started.mono, 3),
        )

    def targets(self, record: FaultRecord) -> frozenset[str]:
        """The monitoring and the shop that died meanwhile: each the control plane's to start."""
        return frozenset({self.component, str(record.details["shop_killed"])})

    def is_recovered(self, view: StackView) -> bool:
        return LabExecutor(view.stack_file).is_running(self.component)


class StopPrometheus(StopMonitoring):
    kind: ClassVar[str] = "stop-prometheus"
    component: ClassVar[str] = "prometheus"


class StopAlertmanager(StopMonitoring):
    kind: ClassVar[str] = "stop-alertmanager"
    component: ClassVar[str] = "alertmanager"
