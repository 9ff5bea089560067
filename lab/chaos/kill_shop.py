"""kill-shop: SIGKILL a shop instance's whole tree (gunicorn master and workers)."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import BaseFault, ChaosError, FaultRecord, kill_component, record
from lab.observe import StackView


class KillShop(BaseFault):
    kind: ClassVar[str] = "kill-shop"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restart", "in_doubt"})
    instance: str = ""  # the last shop by default: the first often takes a demo's curl

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        shops = view.shops()
        name = self.instance or (shops[-1] if shops else "")
        if name not in shops:
            raise ChaosError(f"no shop instance {name!r}")
        stamp, pids = kill_component(view, name)
        return record(self.kind, name, stamp, stamp, pids=pids)
