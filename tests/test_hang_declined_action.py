"""A run its precheck declined because the target looked healthy ("nothing to do": a standby
streaming again when the rejoin looked) leaves its incident recovered: when the probe fails
again before the incident resolves (the standby hangs a moment later), that is a new failure
with a new incident and a new run, not an incident whose one action is spent while
synchronous commits wait on the hung standby until the 2-minute redundancy rebuild."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from controlplane import store
from controlplane.config import Settings
from controlplane.models import ActionRun, ActionState, Incident, IncidentState
from controlplane.runtime import ControlPlane
from lab.layout import find_free_base_port
from lab.process import wait_until
from remediation.base import Action, ActionContext, Check, Outcome
from remediation.executors.none import NoExecutor
from remediation.registry import ACTIONS


class LooksFine(Action):
    """Declines every time: the target looks healthy when it looks."""

    kind: ClassVar[str] = "looks_fine"

    def precheck(self, ctx: ActionContext) -> Check:
        return Check.nothing_to_do(f"{ctx.target} looks fine: nothing to do")

    def execute(self, ctx: ActionContext) -> Outcome:
        raise AssertionError("never executed: its precheck declines")

    def verify(self, ctx: ActionContext) -> Check:
        return Check(True, "fine")


@pytest.fixture
def cp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:
    monkeypatch.setitem(ACTIONS, "looks_fine", f"{__name__}:LooksFine")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        instance_id="cp-test",
        services=[{"name": "svc", "component": "svc"}],
        probes=[
            {
                "name": "svc-tcp",
                "kind": "tcp",
                "service": "svc",
                "interval_s": 1,
                "timeout_s": 0.5,
                "failures_to_open": 2,
                "params": {"port": find_free_base_port()},  # nothing listens: always DOWN
            }
        ],
        policies=[
            {
                "name": "fix-svc",
                "source": "probe",
                "match": {"service": "svc"},
                "action": "looks_fine",
                "cooldown_s": 0,
            }
        ],
    )
    control_plane = ControlPlane(settings, executor=NoExecutor(), action_backoff_s=0.01)
    yield control_plane
    control_plane.stop()


def runs(cp: ControlPlane) -> list[ActionRun]:
    with store.transaction(cp.factory) as s:
        return list(reversed(store.list_runs(s, incident_id=None, limit=10)))


def incidents(cp: ControlPlane) -> list[Incident]:
    with store.transaction(cp.factory) as s:
        return list(reversed(store.list_incidents(s, state=None, limit=10)))


def fail_and_decide(cp: ControlPlane, times: int) -> None:
    for _ in range(times):
        cp.run_probe(cp.settings.probes[0])
    cp.loop.run_cycle()


def test_a_failure_after_a_run_declined_as_healthy_gets_a_new_incident_and_a_new_run(
    cp: ControlPlane,
) -> None:
    fail_and_decide(cp, 2)
    wait_until(
        lambda: [r.state for r in runs(cp)] == [ActionState.SKIPPED],
        timeout_s=10,
        what="the first run declined",
    )
    [first] = incidents(cp)
    assert first.recovered_at is not None  # declined as healthy: recovered then

    fail_and_decide(cp, 2)  # still (again) failing after that look
    wait_until(
        lambda: [r.state for r in runs(cp)] == [ActionState.SKIPPED] * 2,
        timeout_s=10,
        what="a second run, for a new incident",
    )
    old, new = incidents(cp)
    assert old.state == IncidentState.RESOLVED and new.state == IncidentState.OPEN
    assert [r.incident_id for r in runs(cp)] == [old.id, new.id]
