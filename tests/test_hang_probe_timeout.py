"""A probe run past its timeout says what its kind makes of it. One that judges data through
another service (the shop's invariants) behind a hung node could not look: UNKNOWN, as when it
cannot connect, never DOWN (a DOWN invariant probe proposes a restore that discards data). The
primary probe's overrun (a busy machine) is silence within the leader's grace, never DOWN
before it ends (CI once saw a hung primary failed over 2.5 s into a 5 s grace)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from controlplane.probe_runner import OUTER_GRACE_S
from lab.stack import Stack
from probes.base import Health, ProbeResult
from probes.pg_primary import PgPrimaryProbe
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


class StallingPrimary(PgPrimaryProbe):
    """The primary probe on a machine too busy to finish a look: after its first run (a real
    look at the lab's nodes), every run stalls past the runner's patience (its late answer is
    not recorded), then the next begins."""

    kind = "stalling_primary"
    release = threading.Event()

    def check(self) -> ProbeResult:
        if self._answered_at is None:
            return super().check()
        StallingPrimary.release.wait(self.timeout_s + OUTER_GRACE_S + 0.3)
        return ProbeResult(Health.UNKNOWN, "late, and not recorded")


def test_a_primary_probe_run_overrunning_its_timeout_is_silence_within_the_grace_not_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack: Stack
) -> None:
    monkeypatch.setitem(PROBES, "stalling_primary", f"{__name__}:StallingPrimary")
    StallingPrimary.release.clear()
    grace_s = 5.0
    nodes = {name: stack.dsn(name) for name in ("pg0", "pg1")}
    cp = control_plane(
        tmp_path,
        [
            probe(
                "primary",
                "stalling_primary",
                {"nodes": nodes, "grace_s": grace_s},
                interval_s=0.3,
                timeout_s=0.3,
            )
        ],
    )
    cp.start()
    try:
        wait_for(
            lambda: any(r.health == Health.DOWN for r in runs_of(cp, "primary")),
            timeout_s=grace_s + 15,
            what="a DOWN run once the grace ended",
        )
        runs = runs_of(cp, "primary")
        first, down_at = runs[0], next(r.at for r in runs if r.health == Health.DOWN)
        assert first.health == Health.UP and "leads" in first.summary, first.summary
        stalled = [r for r in runs if r.at < down_at and r is not first]
        assert stalled, "no overrun was recorded before the grace ended"
        assert all(r.health == Health.UP and "grace" in r.summary for r in stalled), [
            (r.health, r.summary) for r in stalled
        ]
        # The grace counts from the leader's last answer (the first run's end, at most).
        assert (down_at - first.at).total_seconds() >= grace_s - 0.5, (down_at, first.at)
    finally:
        StallingPrimary.release.set()
        time.sleep(0.1)
        cp.stop()
