"""stop-prometheus / stop-alertmanager: the monitoring stops for a while, and meanwhile a
shop instance dies: healing must go on from the control plane's direct probes. Then the
monitoring starts again."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import (
    BaseFault,
    FaultRecord,
    Stamp,
    kill_component,
    record,
    start_component,
    wait_s,
)
from lab.observe import StackView
from lab.process import wait_until
from remediation.executors.lab import LabExecutor

SHOP_DIES_AFTER_S = 2.0


class StopMonitoring(BaseFault):
    component: ClassVar[str] = ""
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restart", "in_doubt"})
    default_duration_s: ClassVar[float] = 20.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        executor = LabExecutor(view.stack_file)
        started = Stamp.now()
        executor.stop(self.component, timeout_s=10)
        wait_s(min(SHOP_DIES_AFTER_S, duration_s))
        shop = view.shops()[-1]
        killed_at, _ = kill_component(view, shop)
        wait_s(max(0.0, duration_s - (killed_at.mono - started.mono)))
        start_component(view, self.component)
        ended = Stamp.now()
        wait_until(lambda: executor.is_running(self.component), timeout_s=30)
        return record(
            self.kind,
            self.component,
            started,
            ended,
            shop_killed=shop,
            shop_killed_after_s=round(killed_at.mono - started.mono, 3),
        )

    def is_recovered(self, view: StackView) -> bool:
        return LabExecutor(view.stack_file).is_running(self.component)


class StopPrometheus(StopMonitoring):
    kind: ClassVar[str] = "stop-prometheus"
    component: ClassVar[str] = "prometheus"


class StopAlertmanager(StopMonitoring):
    kind: ClassVar[str] = "stop-alertmanager"
    component: ClassVar[str] = "alertmanager"
