"""The loop under a flood of alerts (real SQLite state store, in process): a cycle's work is
bounded however many alerts came in, a probe's incident and its action come first, and the
safety rules hold for the few alerts a policy may act on among the many."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from controlplane import store
from controlplane.config import Settings
from controlplane.loop import ALERT_BATCH, Loop
from controlplane.models import UNMATCHED, ActionRun, ActionState, Incident
from controlplane.runtime import ControlPlane
from lab.layout import find_free_base_port
from remediation.executors.none import NoExecutor

FLOOD = 3 * ALERT_BATCH


def build(tmp_path: Path) -> ControlPlane:
    settings = Settings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'state.db'}",
            "instance_id": "cp-test",
            "services": [{"name": "svc", "component": "svc"}, {"name": "app", "component": "app"}],
            "probes": [
                {
                    "name": "svc-tcp",
                    "kind": "tcp",
                    "service": "svc",
                    "interval_s": 1,
                    "timeout_s": 0.5,
                    "failures_to_open": 1,
                    "params": {"port": find_free_base_port()},  # nothing listens: DOWN
                }
            ],
            "policies": [
                {
                    "name": "fix-svc",
                    "source": "probe",
                    "match": {"service": "svc"},
                    "action": "restart",
                    "verify_timeout_s": 0.5,
                    "max_attempts": 1,
                },
                {
                    "name": "act-on-app",
                    "source": "alert",
                    "match": {"alertname": "Act"},
                    "action": "restart",
                    "target": "app",
                    "mode": "dry_run",
                },
            ],
        }
    )
    return ControlPlane(settings, executor=NoExecutor(), action_backoff_s=0.01)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    built = build(tmp_path)
    yield built
    built.stop()


def post(cp: ControlPlane, status: str, fingerprints: list[str], name: str = "Flood") -> None:
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = [
        {
            "fingerprint": fp,
            "alertname": name,
            "status": status,
            "labels": {"alertname": name, "service": "flooded"},
            "annotations": {"summary": f"{name} {fp}"},
            "starts_at": now,
            "ends_at": None,
        }
        for fp in fingerprints
    ]
    for start in range(0, len(rows), 1000):
        with store.transaction(cp.factory) as s:
            store.upsert_alerts(s, rows[start : start + 1000], now)


def open_alert_incidents(cp: ControlPlane) -> int:
    with store.read(cp.factory) as s:
        return sum(1 for i in store.open_incidents(s) if i.source == "alert")


def runs(cp: ControlPlane) -> list[ActionRun]:
    with store.read(cp.factory) as s:
        return store.list_runs(s, incident_id=None, limit=100)


def cycles_until_nothing_left(loop: Loop, most: int) -> int:
    for n in range(1, most + 1):
        loop.run_cycle()
        if not loop.backlog:
            return n
    raise AssertionError(f"still a backlog after {most} cycles")


def test_a_cycle_opens_at_most_a_batch_of_a_flood_and_the_next_cycles_the_rest(
    cp: ControlPlane,
) -> None:
    post(cp, "firing", [f"flood-{i}" for i in range(FLOOD)])
    sentence = cp.loop.run_cycle()
    assert 0 < open_alert_incidents(cp) <= ALERT_BATCH
    assert cp.loop.backlog and "left for the next cycle" in sentence
    cycles_until_nothing_left(cp.loop, most=4 * FLOOD // ALERT_BATCH)
    assert open_alert_incidents(cp) == FLOOD
    assert cp.loop.run_cycle() == "nothing to do"
    post(cp, "resolved", [f"flood-{i}" for i in range(FLOOD)] + ["never-fired"])
    cycles_until_nothing_left(cp.loop, most=4 * FLOOD // ALERT_BATCH)
    assert open_alert_incidents(cp) == 0


def test_a_probe_s_incident_and_its_action_come_first_in_a_flood(cp: ControlPlane) -> None:
    post(cp, "firing", [f"flood-{i}" for i in range(FLOOD)])
    cp.run_probe(cp.settings.probes[0])  # DOWN: nothing listens
    sentence = cp.loop.run_cycle()
    assert "open svc-tcp on svc" in sentence and "started action run(s)" in sentence
    [run] = runs(cp)
    assert (run.action, run.target, run.requested_by) == ("restart", "svc", "policy:fix-svc")
    with store.read(cp.factory) as s:
        assert [a.verb for a in store.audit_of_run(s, run.id)][:2] == ["request", "start"]


def test_among_a_flood_the_alert_a_policy_acts_on_is_acted_on_once_and_a_resolved_one_never(
    cp: ControlPlane,
) -> None:
    post(cp, "firing", [f"flood-{i}" for i in range(FLOOD)])
    post(cp, "firing", ["act-1"], name="Act")
    post(cp, "resolved", ["act-2"], name="Act")  # never fired here: never an action
    for _ in range(3):
        cycles_until_nothing_left(cp.loop, most=4 * FLOOD // ALERT_BATCH)
    [run] = runs(cp)
    assert (run.target, run.state, run.requested_by) == (
        "app",
        ActionState.DRY_RUN,
        "policy:act-on-app",
    )
    with store.read(cp.factory) as s:
        [acted] = [i for i in store.open_incidents(s) if i.fingerprint == "alert:act-1"]
        assert acted.policy == "act-on-app" and run.incident_id == acted.id
        assert [a.verb for a in store.audit_of_run(s, run.id)] == ["dry-run"]
    post(cp, "resolved", ["act-1"], name="Act")
    cycles_until_nothing_left(cp.loop, most=4)
    assert len(runs(cp)) == 1


def test_an_alert_a_policy_acts_on_gets_its_action_in_the_cycle_that_opens_its_incident(
    cp: ControlPlane,
) -> None:
    cp.loop.run_cycle()
    post(cp, "firing", ["act-1"], name="Act")
    cp.loop.run_cycle()  # one cycle: not one to open it and the next to act
    [run] = runs(cp)
    assert (run.target, run.requested_by) == ("app", "policy:act-on-app")


def test_incidents_opened_before_policies_were_matched_are_matched_by_a_new_leader(
    cp: ControlPlane,
) -> None:
    post(cp, "firing", [f"flood-{i}" for i in range(ALERT_BATCH)])
    post(cp, "firing", ["act-1"], name="Act")
    post(cp, "resolved", ["flood-0"])
    with store.transaction(cp.factory) as s:  # as an incident opened before revision 0005
        incident = store.open_incident(
            s,
            fingerprint="alert:act-1",
            kind="Act",
            source="alert",
            target="app",
            severity="warning",
            summary="opened by an older control plane",
            labels={"alertname": "Act"},
            detected_at=datetime.now(UTC) - timedelta(minutes=1),
            opened_at=datetime.now(UTC) - timedelta(minutes=1),
        )
        assert incident is not None and incident.policy == UNMATCHED
    loop = Loop(cp.settings, cp.factory, cp.engine, cp.notifier, cp.metrics)
    cycles_until_nothing_left(loop, most=12)
    cycles_until_nothing_left(loop, most=12)  # the requested run is dry: nothing else
    [run] = runs(cp)
    assert (run.incident_id, run.requested_by) == (incident.id, "policy:act-on-app")
    with store.read(cp.factory) as s:
        policies = {i.fingerprint: i.policy for i in store.open_incidents(s)}
    assert policies.pop("alert:act-1") == "act-on-app"
    assert set(policies.values()) == {None} and "alert:flood-0" not in policies
    # A takeover matches every open incident again (the policies may have changed).
    with store.transaction(cp.factory) as s:
        s.execute(update(Incident).values(policy="gone"))
    Loop(cp.settings, cp.factory, cp.engine, cp.notifier, cp.metrics).run_cycle()
    with store.read(cp.factory) as s:
        assert {i.policy for i in store.open_incidents(s)} <= {None, "act-on-app", UNMATCHED}


def test_the_cycle_time_histogram_has_buckets_beyond_a_second(cp: ControlPlane) -> None:
    cp.loop.run_cycle()
    [family] = [m for m in cp.metrics.registry.collect() if m.name == "cp_cycle_duration_seconds"]
    bounds = {s.labels["le"] for s in family.samples if s.name.endswith("_bucket")}
    assert {"1.5", "2.5", "5.0", "10.0", "30.0"} <= bounds


def test_a_flood_batch_that_finds_the_write_lock_held_waits_for_a_later_cycle_not_this_one(
    cp: ControlPlane, tmp_path: Path
) -> None:
    cp.loop.run_cycle()  # the lease is ours, renewed only once half its time is gone
    post(cp, "firing", [f"flood-{i}" for i in range(FLOOD)])
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's writes hold the lock
    try:
        with ThreadPoolExecutor(1) as pool:  # it comes back (else: the 30 s busy timeout)
            sentence = pool.submit(cp.loop.run_cycle).result(timeout=10)
        assert "left for the next cycle" in sentence and cp.loop.backlog
        assert open_alert_incidents(cp) == 0  # nothing half-written
    finally:
        holder.rollback()
        holder.close()
    cycles_until_nothing_left(cp.loop, most=4 * FLOOD // ALERT_BATCH)
    assert open_alert_incidents(cp) == FLOOD


def test_a_cycle_on_a_machine_too_busy_for_its_budget_still_makes_progress(
    cp: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    import controlplane.loop as loop_module

    # The snapshot alone spends the budget (CI, a busy machine: a cycle opened none).
    monkeypatch.setattr(loop_module, "APPLY_BUDGET_S", 0.0)
    post(cp, "firing", [f"flood-{i}" for i in range(FLOOD)])
    cp.loop.run_cycle()
    assert 0 < open_alert_incidents(cp) <= ALERT_BATCH
    cycles_until_nothing_left(cp.loop, most=4 * FLOOD)
    assert open_alert_incidents(cp) == FLOOD
