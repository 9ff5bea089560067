"""kill-redis: SIGKILL the catalog cache. The shop serves from the database meanwhile; the
control plane's Redis probe sees it gone and its restart policy starts it again."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import BaseFault, FaultRecord, is_running, kill_component, record
from lab.observe import StackView


class KillRedis(BaseFault):
    kind: ClassVar[str] = "kill-redis"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restart"})

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        stamp, pids = kill_component(view, "redis")
        return record(self.kind, "redis", stamp, stamp, pids=pids)

    def is_recovered(self, view: StackView) -> bool:
        return is_running(view, "redis")
