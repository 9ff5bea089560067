"""Policy modes and limits through the real engine (SQLite state store, a dead TCP port as
the broken target, and NoExecutor, whose every restart fails): approval, dry run, escalation."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import services, store
from controlplane.config import Settings
from controlplane.errors import Conflict
from controlplane.models import ActionRun, ActionState, Incident, IncidentState
from controlplane.runtime import ControlPlane
from lab.layout import find_free_base_port
from lab.process import wait_until
from remediation.executors.none import NoExecutor


def build(tmp_path: Path, **policy: Any) -> ControlPlane:
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
                "failures_to_open": 1,
                "params": {"port": find_free_base_port()},
            }
        ],
        policies=[
            {
                "name": "fix-svc",
                "source": "probe",
                "match": {"service": "svc"},
                "action": "restart",
                "verify_timeout_s": 0.5,
                **policy,
            }
        ],
    )
    return ControlPlane(settings, executor=NoExecutor(), action_backoff_s=0.01)


@pytest.fixture
def cp_factory(tmp_path: Path) -> Iterator[Any]:
    built: list[ControlPlane] = []

    def make(**policy: Any) -> ControlPlane:
        cp = build(tmp_path, **policy)
        built.append(cp)
        return cp

    yield make
    for cp in built:
        cp.stop()


def fail_once_and_decide(cp: ControlPlane) -> None:
    cp.run_probe(cp.settings.probes[0])
    cp.loop.run_cycle()


def only_run(cp: ControlPlane) -> ActionRun:
    with store.transaction(cp.factory) as s:
        [run] = store.list_runs(s, incident_id=None, limit=10)
    return run


def test_an_approval_policy_waits_for_an_operator_then_runs(cp_factory: Any) -> None:
    cp = cp_factory(mode="approval", max_attempts=1)
    fail_once_and_decide(cp)
    cp.loop.run_cycle()
    assert only_run(cp).state == ActionState.AWAITING_APPROVAL
    services.approve_action(cp, only_run(cp).id, "alice")
    cp.loop.run_cycle()
    wait_until(
        lambda: only_run(cp).state == ActionState.FAILED,
        timeout_s=10,
        what="the approved run finished",
    )
    with store.transaction(cp.factory) as s:
        verbs = [(a.actor, a.verb) for a in store.audit_of_run(s, only_run(cp).id)]
    assert verbs[:3] == [
        ("policy:fix-svc", "await-approval"),
        ("alice", "approve"),
        ("cp-test", "start"),
    ]
    with pytest.raises(Conflict):
        services.approve_action(cp, only_run(cp).id, "bob")  # approved once, not twice


def test_a_dry_run_policy_records_what_it_would_do_and_does_nothing(cp_factory: Any) -> None:
    cp = cp_factory(mode="dry_run")
    fail_once_and_decide(cp)
    cp.loop.run_cycle()
    run = only_run(cp)
    assert run.state == ActionState.DRY_RUN and run.attempts == 0
    with store.transaction(cp.factory) as s:
        assert [a.verb for a in store.audit_of_run(s, run.id)] == ["dry-run"]


def runs_of(cp: ControlPlane) -> list[ActionRun]:
    with store.transaction(cp.factory) as s:
        return sorted(store.list_runs(s, incident_id=None, limit=50), key=lambda r: r.id)


def test_a_restart_that_keeps_failing_is_tried_again_with_backoff_each_try_audited(
    cp_factory: Any,
) -> None:
    cp = cp_factory(mode="auto", max_attempts=3, retry_backoff_s=0.2, retry_backoff_max_s=0.4)
    fail_once_and_decide(cp)
    wait_until(
        lambda: only_run(cp).state == ActionState.FAILED, timeout_s=20, what="the first try failed"
    )
    first = only_run(cp)
    assert first.attempts == 3 and first.retry  # a restart may start over: not the end
    with store.transaction(cp.factory) as s:
        verbs = [a.verb for a in store.audit_of_run(s, first.id)]
        timeline = [e.kind for e in store.incident_timeline(s, first.incident_id or 0)]
        incident = s.get(Incident, first.incident_id)
        assert incident is not None and incident.escalated_at is None
    assert [v for v in verbs if v.startswith("execute")] == [
        "execute #1",
        "execute #2",
        "execute #3",
    ]
    assert verbs[-1] == "finish" and "escalated" not in timeline

    def tries() -> int:
        cp.loop.run_cycle()
        return len(runs_of(cp))

    wait_until(lambda: tries() >= 3, timeout_s=30, what="a second and a third try")
    runs = runs_of(cp)
    assert [r.try_number for r in runs][:3] == [1, 2, 3]
    assert {r.incident_id for r in runs} == {first.incident_id}  # one incident, its tries
    with store.transaction(cp.factory) as s:
        [request] = [a for a in store.audit_of_run(s, runs[1].id) if a.verb == "request"]
    assert "try 2, after: " in request.message  # why it is tried again


def test_a_run_stops_trying_at_its_own_deadline_whatever_attempts_are_left(
    cp_factory: Any,
) -> None:
    cp = cp_factory(mode="auto", max_attempts=1000, run_timeout_s=0.5)
    fail_once_and_decide(cp)
    wait_until(
        lambda: only_run(cp).state == ActionState.FAILED, timeout_s=30, what="the run escalated"
    )
    run = only_run(cp)
    assert 1 <= run.attempts < 1000
    assert run.output["attempts"] == run.attempts


def test_a_run_awaiting_approval_is_dropped_when_its_incident_resolves(cp_factory: Any) -> None:
    cp = cp_factory(mode="approval", max_attempts=1)
    fail_once_and_decide(cp)
    cp.loop.run_cycle()
    assert only_run(cp).state == ActionState.AWAITING_APPROVAL
    with socket.create_server(("127.0.0.1", cp.settings.probes[0].params["port"])):
        # One failure then passes: flapping at first, so it takes a run of passes to resolve.
        for _ in range(cp.settings.flap_window * 2):
            cp.run_probe(cp.settings.probes[0])
            cp.loop.run_cycle()
            if only_run(cp).state != ActionState.AWAITING_APPROVAL:
                break
    run = only_run(cp)
    assert run.state == ActionState.SKIPPED
    assert run.output == {"skipped": "the incident resolved before approval"}
    with pytest.raises(Conflict):
        services.approve_action(cp, run.id, "alice")  # never an action on a resolved incident
    with store.transaction(cp.factory) as s:
        assert run.incident_id is not None
        incident = s.get(Incident, run.incident_id)
        assert incident is not None and incident.state == IncidentState.RESOLVED
