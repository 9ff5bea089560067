"""hang-redis: SIGSTOP Redis for a while (its socket open, nothing answered), then SIGCONT."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import (
    BaseFault,
    FaultRecord,
    continue_processes,
    record,
    stop_component,
    wait_s,
)
from lab.observe import StackView


class HangRedis(BaseFault):
    kind: ClassVar[str] = "hang-redis"
    default_duration_s: ClassVar[float] = 10.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        started, procs = stop_component(view, "redis")
        try:
            wait_s(duration_s)
        finally:
            ended = continue_processes(procs)
        return record(self.kind, "redis", started, ended)
