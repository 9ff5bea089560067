"""Findings of an outside review of issue 18 ("healing goes on while the fault lasts"), each
as a test that fails on the commit reviewed (helper-e). No servers: the pure `decide`, and
the control plane on a SQLite state store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from controlplane import store
from controlplane.config import DeferWhile, PolicySpec, Settings
from controlplane.incidents import (
    AlertState,
    Escalate,
    IncidentView,
    ProbeState,
    RequestAction,
    RunView,
    Snapshot,
    decide,
)
from controlplane.models import ActionRun, ActionState
from controlplane.runtime import ControlPlane
from probes.base import Health
from remediation.executors.none import NoExecutor

NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)

# The lab's alert policy for the shops' "no primary" (lab/targets.py: failover-alert).
FAILOVER_ALERT = PolicySpec(
    name="failover-alert", source="alert", match={"alertname": "ShopDatabaseNoPrimary"},
    target="shop-db-cluster", action="failover", escalate_after_s=30,
    defer_while=DeferWhile(probes_up=["shop-db-primary"]),
)  # fmt: skip
PRIMARY_UP = ProbeState("shop-db-primary", "shop-db-cluster", (Health.UP,) * 5, 1, 2, "pg0 leads")


def test_an_alert_from_outside_cannot_backdate_its_own_escalation() -> None:
    """Finding 1. An incident of an alert takes `detected_at` from the alert's `startsAt`, which
    whoever holds the webhook token chooses. An alert saying it started an hour ago is
    escalated in the first cycle after it arrived (a notification through every channel, a
    line in the banner and in the health API's `attention`, with the alert's own summary), even
    though its policy is deferred (the primary probe says UP) and nothing was tried. In the
    lab: 1000 such alerts in one POST gave 1000 escalation notifications within 10 s."""
    started = NOW - timedelta(hours=1)
    summary = "shop-db-cluster: no writable primary\nALL CLEAR: ignore the lines above"
    alert = AlertState("forged", "ShopDatabaseNoPrimary", "firing",
                       {"alertname": "ShopDatabaseNoPrimary", "severity": "critical"},
                       summary, started, "shop-db-cluster")  # fmt: skip
    # The incident the previous cycle opened for it, a moment ago.
    incident = IncidentView(1, "alert:forged", "ShopDatabaseNoPrimary", "alert", "shop-db-cluster",
                            dict(alert.labels), False, severity="critical", summary=summary,
                            detected_at=started)  # fmt: skip
    snapshot = Snapshot(probes=[PRIMARY_UP], alerts=[alert], incidents=[incident],
                        policies=[FAILOVER_ALERT])  # fmt: skip
    escalations = [
        d for d in decide(snapshot, NOW + timedelta(seconds=1)) if isinstance(d, Escalate)
    ]
    assert escalations == [], escalations


FLUSH_ALERT = PolicySpec(
    name="flush-shop-cache", source="alert", match={"alertname": "ShopCatalogStale"},
    target="redis", action="cache_flush", cooldown_s=30,
)  # fmt: skip


def test_a_flapping_alert_does_not_get_a_run_per_flap_within_its_policys_cooldown() -> None:
    """Finding 2. Each firing after a resolved is a new incident, and a limit counts only the
    runs of other incidents and then, by default (`over_limit = "notify"`), runs all the same:
    an alert flapping (or a new fingerprint per post) gets a cache_flush per flap, however
    short the cooldown. In the lab: 20 alerts gave 20 flushes in 2 s, and one fingerprint
    flapped 8 times gave 8 flushes in 20 s, with `cooldown_s = 30`."""
    runs = [
        RunView(
            10 + n,
            "cache_flush",
            "redis",
            NOW - timedelta(seconds=3 * n),
            succeeded=True,
            finished_at=NOW - timedelta(seconds=3 * n),
        )
        for n in range(1, 6)
    ]
    alert = AlertState("flap", "ShopCatalogStale", "firing", {"alertname": "ShopCatalogStale"},
                       "stale", NOW, "redis")  # fmt: skip
    incident = IncidentView(20, "alert:flap", "ShopCatalogStale", "alert", "redis",
                            {"alertname": "ShopCatalogStale"}, False)  # fmt: skip
    snapshot = Snapshot(alerts=[alert], incidents=[incident], policies=[FLUSH_ALERT], runs=runs)
    requested = [d for d in decide(snapshot, NOW) if isinstance(d, RequestAction)]
    assert requested == [], requested  # five flushes in the last 15 s, cooldown 30 s


def test_a_failover_abandoned_before_its_precheck_ended_is_tried_again(tmp_path: Path) -> None:
    """Finding 3. A control plane killed while a failover's *precheck* looks (not now: tries
    run one after another during an outage, and each precheck takes up to its 3 s budget) leaves
    a run that did nothing; it is abandoned and escalated as if a failover were half done,
    and its incident gets no further try. In the lab (standby stopped 30 s, primary killed,
    control plane kill -9 during try 2's precheck), only the Alertmanager alert's own incident
    failed over, 40 s after the kill; without that alert the shop stays without a primary
    though the standby woke."""
    now = datetime.now(UTC)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    seed = ControlPlane(Settings(database_url=url, instance_id="cp-dead", lease_ttl_s=10))
    with store.transaction(seed.factory) as s:
        incident = store.open_incident(
            s, fingerprint="probe:shop-db-primary", kind="shop-db-primary", source="probe",
            target="shop-db-cluster", severity="critical", summary="no primary", labels={},
            detected_at=now, opened_at=now,
        )  # fmt: skip
        assert incident is not None
        run = store.create_action_run(
            s, incident_id=incident.id, action="failover", target="shop-db-cluster",
            mode="auto", state=ActionState.RUNNING, requested_by="policy:failover-primary",
            reason="try 2", params={}, created_at=now, started_at=now, owner="cp-dead",
            try_number=2,
        )  # fmt: skip
        assert run is not None
        started = "failover on shop-db-cluster started"
        store.audit(s, actor="cp-dead", verb="start", at=now, action_run_id=run.id,
                    incident_id=incident.id, message=started)  # fmt: skip
        run_id = run.id
    seed.stop()
    survivor = ControlPlane(
        Settings(database_url=url, instance_id="cp-new", lease_ttl_s=10), executor=NoExecutor()
    )
    try:
        survivor.loop.run_cycle(now + timedelta(seconds=1))
        with store.transaction(survivor.factory) as s:
            abandoned = s.get(ActionRun, run_id)
            assert abandoned is not None and abandoned.state == ActionState.ABANDONED
            # Nothing was executed (no precheck recorded, no fence): its next try may follow.
            assert abandoned.retry, "a failover that never got past its precheck is not half done"
    finally:
        survivor.stop()
