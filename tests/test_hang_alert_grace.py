"""A stall shorter than the primary's grace fails nothing over, not even when the shops' own
"no primary" alert (their database errors, through Prometheus and Alertmanager) arrives
meanwhile: the alert's failover waits while the primary probe, which owns the grace, says UP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import pytest

from controlplane.config import DeferWhile, PolicySpec, Settings
from controlplane.incidents import AlertState, Hold, ProbeState, Snapshot, decide
from lab.stack import Stack
from probes.base import Health
from tests.conftest import stack_of_its_own
from tests.test_controlplane import Api, webhook
from tests.test_failover import hung, leader, order, runs_of, wait_redundant

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CLUSTER = "shop-db-cluster"
U, D, X = Health.UP, Health.DOWN, Health.UNKNOWN
ALERT_FAILOVER = PolicySpec(name="failover-alert", source="alert",
                            match={"alertname": "ShopDatabaseNoPrimary"}, action="failover",
                            target=CLUSTER,
                            defer_while=DeferWhile(probes_up=("shop-db-primary",)))  # fmt: skip
NO_PRIMARY = AlertState("f1", "ShopDatabaseNoPrimary", "firing",
                        {"alertname": "ShopDatabaseNoPrimary"}, "shop db errors", NOW,
                        CLUSTER)  # fmt: skip


def primary_probe(*recent: Health, summary: str = "") -> ProbeState:
    return ProbeState("shop-db-primary", CLUSTER, tuple(recent), 2, 3, summary)


def kinds(decisions: Sequence[object]) -> list[str]:
    return [type(d).__name__ for d in decisions]


GRACE_TABLE = [
    ("a primary in its grace holds the alert's failover",
     [primary_probe(U, U, summary="pg0 unanswered for 2.1s (grace 5s)")], ["Open", "Hold"]),
    ("a primary probe past its grace lets the alert act too",
     [primary_probe(U, D)], ["Open", "RequestAction"]),
    ("a primary probe that could not look lets the alert act",
     [primary_probe(U, X)], ["Open", "RequestAction"]),
    ("no primary probe result yet: the alert acts",
     [], ["Open", "RequestAction"]),
]  # fmt: skip


@pytest.mark.parametrize(("probes", "expected"), [(p, e) for _, p, e in GRACE_TABLE],
                         ids=[d for d, _, _ in GRACE_TABLE])  # fmt: skip
def test_the_no_primary_alert_fails_over_only_when_the_primary_probe_does_not_say_up(
    probes: list[ProbeState], expected: list[str]
) -> None:
    decisions = decide(Snapshot(probes=probes, alerts=[NO_PRIMARY], policies=[ALERT_FAILOVER]), NOW)
    assert kinds(decisions) == expected
    if "Hold" in expected:
        [hold] = [d for d in decisions if isinstance(d, Hold)]
        assert "shop-db-primary is up: pg0 unanswered for 2.1s" in hold.reason


def test_a_policy_deferring_on_an_unknown_probe_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"defer_while\.probes_up: unknown probe 'nope'"):
        Settings.model_validate(
            {
                "services": [{"name": "svc"}],
                "probes": [{"name": "p", "kind": "tcp", "service": "svc"}],
                "policies": [{"name": "f", "source": "alert", "match": {"alertname": "A"},
                              "target": "svc", "action": "failover",
                              "defer_while": {"probes_up": ["nope"]}}],
            }
        )  # fmt: skip


@pytest.fixture(scope="module")
def lab() -> Iterator[Stack]:
    with stack_of_its_own("shop-hang-alert", products=50, stock=100_000) as stack:
        yield stack


def test_a_primary_stalled_within_its_grace_is_not_failed_over_on_the_shops_no_primary_alert(
    lab: Stack,
) -> None:
    api = Api(lab)
    before = wait_redundant(lab)
    fingerprint = f"noprimary-{uuid.uuid4().hex[:12]}"
    labels = {"severity": "critical", "service": CLUSTER, "component": "primary"}
    with hung(lab, before) as pids:
        assert len(pids) > 2
        # What Alertmanager sends once the shops' errors have lasted 2 s.
        assert api.alert(webhook("ShopDatabaseNoPrimary", "firing", fingerprint, **labels)).ok
        api.wait_cycles(4)  # ~2 s: the primary probe still gives the node its 5 s grace
        incident = api.incident(f"alert:{fingerprint}")
        assert incident is not None and incident["state"] == "open"
    assert api.alert(webhook("ShopDatabaseNoPrimary", "resolved", fingerprint, **labels)).ok
    api.wait_cycles(6)
    assert runs_of(api, "failover") == []
    assert leader(lab) == before
    assert order(lab).status_code == 201
