"""Faults injected into a running lab stack (and only a lab stack), each recording its start
and end: `inject("kill-primary", data_dir)`."""

from __future__ import annotations

from pathlib import Path

from lab.chaos.base import ChaosError, Fault, FaultRecord, Stamp
from lab.chaos.registry import FAULTS, fault
from lab.observe import StackView

__all__ = ["FAULTS", "ChaosError", "Fault", "FaultRecord", "Stamp", "fault", "inject"]


def inject(kind: str, data_dir: Path | str, *, duration_s: float | None = None) -> FaultRecord:
    """Run one fault against the lab stack in `data_dir`; blocks until it is over."""
    chosen = fault(kind)
    view = StackView.of(data_dir)
    return chosen.run(
        view, duration_s=chosen.default_duration_s if duration_s is None else duration_s
    )
