"""hang-redis: SIGSTOP Redis for a while (its socket open, nothing answered), then SIGCONT."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import BaseFault, FaultRecord, hang
from lab.observe import StackView


class HangRedis(BaseFault):
    kind: ClassVar[str] = "hang-redis"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restart"})
    default_duration_s: ClassVar[float] = 10.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        return hang(self.kind, view, "redis", duration_s)
