"""kill-controlplane: a shop dies, and the control plane is SIGKILLed while it restarts it
(the run `running`); a moment later the control plane starts again. The run it left is to be
marked abandoned and escalated, never re-run; the shop must come back all the same."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import requests

from lab.chaos.base import (
    BaseFault,
    FaultRecord,
    kill_component,
    record,
    start_component,
    wait_s,
)
from lab.observe import StackView
from lab.process import wait_until

CATCH_RUN_WITHIN_S = 20.0


class KillControlplane(BaseFault):
    kind: ClassVar[str] = "kill-controlplane"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restart", "in_doubt"})
    default_duration_s: ClassVar[float] = 3.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        shop = view.shops()[-1]
        started, _ = kill_component(view, shop)
        caught = self._running_restart(view, started.mono + CATCH_RUN_WITHIN_S)
        killed_at, _ = kill_component(view, "controlplane")
        wait_s(duration_s)
        start_component(view, "controlplane")
        url = view.components()["controlplane"]["url"]
        wait_until(lambda: requests.get(f"{url}/readyz", timeout=2).ok, timeout_s=60)
        return record(
            self.kind,
            "controlplane",
            started,
            killed_at,
            shop_killed=shop,
            run_caught_running=caught,
            controlplane_killed_after_s=round(killed_at.mono - started.mono, 3),
        )

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
