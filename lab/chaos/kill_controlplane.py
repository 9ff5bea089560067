"""kill-controlplane: a shop dies, and the control plane is SIGKILLed (its whole process group)
while it restarts it (the run `running`). Nothing here starts it again: its supervisor does
(lab/supervisor.py, systemd's `Restart=always` on a host), and Prometheus tells a human it was
down. The run it left is to be marked abandoned and escalated, never re-run; the shop must come
back all the same, by the control plane."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import requests

from lab.chaos.base import BaseFault, FaultRecord, kill_component, record
from lab.observe import StackView

CATCH_RUN_WITHIN_S = 20.0


class KillControlplane(BaseFault):
    kind: ClassVar[str] = "kill-controlplane"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restart", "in_doubt"})

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        shop = view.shops()[-1]
        started, _ = kill_component(view, shop)
        caught = self._running_restart(view, started.mono + CATCH_RUN_WITHIN_S)
        killed_at, pids = kill_component(view, "controlplane")
        return record(
            self.kind,
            "controlplane",
            started,
            killed_at,
            shop_killed=shop,
            run_caught_running=caught,
            controlplane_killed_after_s=round(killed_at.mono - started.mono, 3),
            controlplane_pids=pids,
        )

    def targets(self, record: FaultRecord) -> frozenset[str]:
        """The shop: the control plane's to start again once its supervisor started it."""
        return frozenset({str(record.details["shop_killed"])})

    def is_recovered(self, view: StackView) -> bool:
        """The control plane serves again (its supervisor started it)."""
        url = view.components()["controlplane"]["url"]
        try:
            return requests.get(f"{url}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    @staticmethod
    def _running_restart(view: StackView, deadline: float) -> dict[str, Any] | None:
        """The restart run in flight, polled as tightly as the API allows; None if none was
        seen running before `deadline` (the control plane is killed then anyway)."""
        while time.monotonic() < deadline:
            try:
                runs = view.api_get("/actions?action=restart&limit=5")["actions"]
            except requests.RequestException:
                runs = []
            for run in runs:
                if run["state"] == "running":
                    return {"id": run["id"], "target": run["target"]}
            time.sleep(0.02)
        return None
