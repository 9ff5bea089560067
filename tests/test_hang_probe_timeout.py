"""A probe that judges data through another service (the shop's invariants) and runs past its
timeout behind a hung node could not look: UNKNOWN, as when it cannot connect, never DOWN (a
DOWN invariant probe proposes a restore that discards data)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import pytest

from probes.base import Health, ProbeResult
from probes.registry import PROBES
from tests.test_probe_runner import StuckProbe, control_plane, probe, runs_of, wait_for


class StuckDataProbe(StuckProbe):
    """Stuck as the invariant probe is when its database hangs; judges data, so UNKNOWN."""

    kind = "stuck_data"
    unreachable: ClassVar[Health] = Health.UNKNOWN
    release = threading.Event()

    def check(self) -> ProbeResult:
        StuckDataProbe.release.wait(30)
        return ProbeResult(Health.UP, "released at last")


def test_a_data_probe_stuck_past_its_timeout_is_unknown_not_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PROBES, "stuck_data", f"{__name__}:StuckDataProbe")
    StuckDataProbe.release.clear()
    cp = control_plane(
        tmp_path, [probe("invariants", "stuck_data", {}, interval_s=0.5, timeout_s=0.3)]
    )
    cp.start()
    try:
        wait_for(lambda: bool(runs_of(cp, "invariants")), timeout_s=10, what="a run recorded")
        [run] = runs_of(cp, "invariants")
        assert run.health == Health.UNKNOWN
        assert "still running" in run.summary
    finally:
        StuckDataProbe.release.set()
        cp.stop()
