"""The pure decision function, table-driven: no servers, no clock, no database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from controlplane.config import DeferWhile, PolicySpec, Settings
from controlplane.errors import ConfigError
from controlplane.incidents import (
    AlertState,
    Escalate,
    Hold,
    IncidentView,
    Open,
    ProbeState,
    RequestAction,
    Resolve,
    RunView,
    SetFlapping,
    SilenceView,
    Snapshot,
    change_share,
    decide,
    describe,
    escalation_line,
    retry_delay_s,
)
from probes.base import Health

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
U, D, G = Health.UP, Health.DOWN, Health.DEGRADED
RESTART = PolicySpec(name="restart-shop", source="probe", match={"kind": "shop-0-ready"},
                     action="restart", cooldown_s=60, max_runs=2, window_s=600)  # fmt: skip
RESTART_HOLD = RESTART.model_copy(update={"over_limit": "hold"})
RESTART_NOTIFY = RESTART.model_copy(update={"over_limit": "notify"})
FLUSH = PolicySpec(name="flush", source="alert", match={"alertname": "CacheStale"},
                   action="cache_flush", target="cache")  # fmt: skip


def probe(*recent: Health, opens: int = 3, resolves: int = 2) -> ProbeState:
    return ProbeState("shop-0-ready", "shop-0", tuple(recent), opens, resolves, "HTTP 503")


def incident(flapping: bool = False, fp: str = "probe:shop-0-ready", id: int = 7) -> IncidentView:
    kind = "shop-0-ready" if fp.startswith("probe:") else "CacheStale"
    labels = (
        {"alertname": "CacheStale"}
        if fp.startswith("alert:")
        else {"probe": "shop-0-ready", "service": "shop-0"}
    )
    return IncidentView(id, fp, kind, fp.split(":")[0], "shop-0", labels, flapping)


def alert(status: str) -> AlertState:
    return AlertState("a1", "CacheStale", status, {"alertname": "CacheStale"}, "stale", NOW,
                      "cache")  # fmt: skip


def kinds(decisions: list[object]) -> list[str]:
    return [type(d).__name__ for d in decisions]


TABLE = [
    # (description, snapshot, expected decision kinds)
    ("two failures do not open an incident",
     Snapshot(probes=[probe(U, D, D)], policies=[RESTART]), []),
    ("three failures open it and request the policy's action at once",
     Snapshot(probes=[probe(U, D, D, D)], policies=[RESTART]), ["Open", "RequestAction"]),
    ("degraded counts as failing",
     Snapshot(probes=[probe(G, G, G)]), ["Open"]),
    ("a failure streak broken by a success does not open",
     Snapshot(probes=[probe(D, D, U, D, D)]), []),
    ("an open incident resolves after two successes",
     Snapshot(probes=[probe(D, D, D, U, U)], incidents=[incident()]), ["Resolve"]),
    ("one success is not enough to resolve",
     Snapshot(probes=[probe(D, D, D, D, U)], incidents=[incident()]), []),
    ("an alternating probe is marked flapping and not resolved; actions are held",
     Snapshot(probes=[probe(D, U, D, U, D, U, U)], incidents=[incident()], policies=[RESTART]),
     ["SetFlapping", "Hold"]),
    ("a flapping incident stays flapping until the changes fall below the low mark",
     Snapshot(probes=[probe(D, U, D, U, U, U, U)], incidents=[incident(flapping=True)]), []),
    ("a flapping incident that settled is stable again and resolves",
     Snapshot(probes=[probe(D, U, U, U, U, U, U, U, U, U)], incidents=[incident(flapping=True)]),
     ["SetFlapping", "Resolve"]),
    ("an action that ended for this incident with no retry is never requested again",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              runs=[RunView(7, "restart", "shop-0", NOW - timedelta(hours=2))]), []),
    ("a run declined 'not now' is tried again once its backoff has passed",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              runs=[RunView(7, "restart", "shop-0", NOW - timedelta(seconds=5), acted=False,
                            retry=True, finished_at=NOW - timedelta(seconds=2))]),
     ["RequestAction"]),
    ("a run declined 'not now' within its backoff waits",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              runs=[RunView(7, "restart", "shop-0", NOW - timedelta(seconds=5), acted=False,
                            retry=True, finished_at=NOW - timedelta(seconds=0.5))]), ["Hold"]),
    ("no try follows a run that is still running",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              runs=[RunView(7, "restart", "shop-0", NOW - timedelta(seconds=5), acted=False,
                            retry=True, finished_at=NOW - timedelta(seconds=4)),
                    RunView(7, "restart", "shop-0", NOW - timedelta(seconds=2), active=True,
                            try_number=2)]), []),
    ("never a try after one succeeded for the incident, whatever came after",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              runs=[RunView(7, "restart", "shop-0", NOW - timedelta(minutes=5), succeeded=True),
                    RunView(7, "restart", "shop-0", NOW - timedelta(minutes=1), retry=True,
                            try_number=2, finished_at=NOW - timedelta(minutes=1))]), []),
    ("within its cooldown a policy whose limit notifies runs all the same",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART_NOTIFY],
              runs=[RunView(6, "restart", "shop-0", NOW - timedelta(seconds=30))]),
     ["RequestAction"]),
    ("within its cooldown a policy whose limit holds is held, and a human told at once",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART_HOLD],
              runs=[RunView(6, "restart", "shop-0", NOW - timedelta(seconds=30))]),
     ["Hold", "Escalate"]),
    ("the incident's own earlier tries count toward no limit",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART_HOLD],
              runs=[RunView(7, "restart", "shop-0", NOW - timedelta(seconds=30), retry=True,
                            finished_at=NOW - timedelta(seconds=20))]), ["RequestAction"]),
    ("a run that did nothing (declined by its precheck) does not start a cooldown",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              runs=[RunView(6, "restart", "shop-0", NOW - timedelta(seconds=30), acted=False)]),
     ["RequestAction"]),
    ("past the cooldown but at max runs in the window, a holding limit waits for a human",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART_HOLD],
              runs=[RunView(5, "restart", "shop-0", NOW - timedelta(seconds=300)),
                    RunView(6, "restart", "shop-0", NOW - timedelta(seconds=120))]),
     ["Hold", "Escalate"]),
    ("at max runs in the window, a limit that notifies acts all the same",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART_NOTIFY],
              runs=[RunView(5, "restart", "shop-0", NOW - timedelta(seconds=300)),
                    RunView(6, "restart", "shop-0", NOW - timedelta(seconds=120))]),
     ["RequestAction"]),
    ("a silence matching the incident holds the action",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              silences=[SilenceView(1, {"service": "shop-0"}, NOW - timedelta(minutes=1),
                                    NOW + timedelta(minutes=9))]), ["Hold"]),
    ("an expired silence holds nothing",
     Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
              silences=[SilenceView(1, {"target": "shop-0"}, NOW - timedelta(minutes=10),
                                    NOW - timedelta(minutes=1))]), ["RequestAction"]),
    ("a firing alert opens an incident and requests its action",
     Snapshot(alerts=[alert("firing")], policies=[FLUSH]), ["Open", "RequestAction"]),
    ("a resolved alert resolves its incident and never requests an action",
     Snapshot(alerts=[alert("resolved")], incidents=[incident(fp="alert:a1")], policies=[FLUSH]),
     ["Resolve"]),
    ("a resolved alert with no incident does nothing at all",
     Snapshot(alerts=[alert("resolved")], policies=[FLUSH]), []),
    ("a probe and an alert about one target in one cycle request one action between them",
     Snapshot(probes=[probe(D, D, D)], alerts=[AlertState("a2", "ShopDown", "firing",
              {"kind": "shop-0-ready"}, "down", NOW, "shop-0")],
              policies=[PolicySpec(name="r", source="probe", match={"target": "shop-0"},
                                   action="restart"),
                        PolicySpec(name="ra", source="alert", match={"alertname": "ShopDown"},
                                   action="restart", target="shop-0")]),
     ["Open", "Open", "RequestAction", "Hold"]),
    ("no policy matches: an incident but no action",
     Snapshot(probes=[probe(D, D, D)], policies=[FLUSH]), ["Open"]),
]  # fmt: skip


@pytest.mark.parametrize(("snapshot", "expected"), [(s, e) for _, s, e in TABLE],
                         ids=[d for d, _, _ in TABLE])  # fmt: skip
def test_decide(snapshot: Snapshot, expected: list[str]) -> None:
    assert kinds(decide(snapshot, NOW)) == expected


def test_an_opened_probe_incident_carries_its_service_labels_severity_and_detection_time() -> None:
    since = NOW - timedelta(seconds=3)
    state = ProbeState("shop-0-ready", "shop-0", (U, D, G, D), 3, 2, "HTTP 503",
                       {"component": "shop"}, since)  # fmt: skip
    [opened] = decide(Snapshot(probes=[state]), NOW)
    assert isinstance(opened, Open)
    assert (opened.severity, opened.detected_at, opened.target) == ("critical", since, "shop-0")
    assert opened.labels == {"component": "shop", "probe": "shop-0-ready", "service": "shop-0"}


def test_a_requested_action_names_the_incident_by_fingerprint_and_carries_the_mode() -> None:
    approval = RESTART.model_copy(update={"mode": "approval"})
    decisions = decide(Snapshot(probes=[probe(D, D, D)], policies=[approval]), NOW)
    request = decisions[-1]
    assert isinstance(request, RequestAction)
    assert (request.fingerprint, request.mode, request.action) == (
        "probe:shop-0-ready",
        "approval",
        "restart",
    )


def test_the_change_share_counts_flips_between_consecutive_results() -> None:
    assert change_share([U, U, U]) == 0
    assert change_share([U, D, U, D, U]) == 1
    assert change_share([D, U, U, U, U]) == 0.25
    assert change_share([G, D, U]) == 0.5  # degraded and down are both "failing"


def test_the_sentence_says_what_was_decided_and_why() -> None:
    sentence = describe(decide(Snapshot(probes=[probe(D, D, D)], policies=[RESTART]), NOW))
    assert sentence.startswith("open shop-0-ready on shop-0 (critical); request restart")
    assert describe([]) == "nothing to do"
    assert "flapping" in describe([SetFlapping(1, True, 0.8)])
    assert "Alertmanager" in describe([Resolve(1, "Alertmanager resolved the alert")])
    assert "silenced" in describe([Hold("x", "silenced by silence 1")])


def recovered_incident(recovered_at: datetime) -> IncidentView:
    base = incident()
    return IncidentView(base.id, base.fingerprint, base.kind, base.source, base.target,
                        base.labels, False, recovered_at)  # fmt: skip


def failing_probe(since: datetime) -> ProbeState:
    """Three failures in a row, the first at `since`, one a second."""
    at = tuple(since + timedelta(seconds=n) for n in range(3))
    return ProbeState("shop-0-ready", "shop-0", (U, U, D, D, D), 3, 2, "HTTP 503",
                      failing_since=since, failing_at=at)  # fmt: skip


def test_a_recovered_incident_that_fails_again_is_resolved_and_opened_anew_with_its_action() -> (
    None
):
    snapshot = Snapshot(
        probes=[failing_probe(NOW - timedelta(seconds=3))],
        incidents=[recovered_incident(NOW - timedelta(seconds=10))],
        policies=[RESTART],
        runs=[RunView(7, "restart", "shop-0", NOW - timedelta(seconds=120))],
    )
    decisions = decide(snapshot, NOW)
    assert kinds(decisions) == ["Resolve", "Open", "RequestAction"]
    resolve = decisions[0]
    assert isinstance(resolve, Resolve) and resolve.incident_id == 7
    assert "failed again" in resolve.reason


def test_a_second_fault_before_the_probe_saw_the_first_healed_is_a_new_failure() -> None:
    # The streak began before the recovery, but three failures came after it.
    at = tuple(NOW - timedelta(seconds=s) for s in (30, 9, 6, 3))
    probe = ProbeState("shop-0-ready", "shop-0", (U, D, D, D, D), 3, 2, "HTTP 503",
                       failing_since=at[0], failing_at=at)  # fmt: skip
    snapshot = Snapshot(
        probes=[probe],
        incidents=[recovered_incident(NOW - timedelta(seconds=10))],
        policies=[RESTART],
        runs=[RunView(7, "restart", "shop-0", NOW - timedelta(seconds=120))],
    )
    assert kinds(decide(snapshot, NOW))[0] == "Resolve"


def test_a_recovered_incident_still_showing_the_old_failure_is_not_reopened() -> None:
    snapshot = Snapshot(
        probes=[failing_probe(NOW - timedelta(seconds=30))],  # the streak began before recovery
        incidents=[recovered_incident(NOW - timedelta(seconds=10))],
        policies=[RESTART],
        runs=[RunView(7, "restart", "shop-0", NOW - timedelta(seconds=120))],
    )
    assert kinds(decide(snapshot, NOW)) == []


# -- UNKNOWN: a probe that could not look -------------------------------------------------------
X = Health.UNKNOWN

UNKNOWN_TABLE = [
    ("unknown results never open an incident",
     Snapshot(probes=[probe(U, X, X, X, X)], policies=[RESTART]), []),
    ("unknown results neither count toward opening nor break the failure streak",
     Snapshot(probes=[probe(D, X, D, X, X, D)], policies=[RESTART]), ["Open", "RequestAction"]),
    ("unknown results do not resolve an open incident",
     Snapshot(probes=[probe(D, D, D, X, X, X)], incidents=[incident()]), []),
    ("an open incident resolves on two successes with an unknown between them",
     Snapshot(probes=[probe(D, D, D, U, X, U)], incidents=[incident()]), ["Resolve"]),
    ("unknown results are no state changes: not flapping",
     Snapshot(probes=[probe(D, X, D, X, D, X, D)], incidents=[incident()]), []),
]  # fmt: skip


@pytest.mark.parametrize(("snapshot", "expected"), [(s, e) for _, s, e in UNKNOWN_TABLE],
                         ids=[d for d, _, _ in UNKNOWN_TABLE])  # fmt: skip
def test_decide_with_unknown_results(snapshot: Snapshot, expected: list[str]) -> None:
    assert kinds(decide(snapshot, NOW)) == expected


# -- defer_while: no restore in the middle of a failover ----------------------------------------
CLUSTER = "shop-db-cluster"
RESTORE = PolicySpec(
    name="restore-damaged-data", source="probe", match={"probe": "shop-invariants"},
    action="restore",
    mode="approval",
    defer_while=DeferWhile(actions_running=("failover", "rejoin", "switchover"),
                           probes_not_up=("shop-db-primary",)),
)  # fmt: skip
FAILOVER = PolicySpec(name="failover-primary", source="probe", match={"probe": "shop-db-primary"},
                      action="failover")  # fmt: skip
REJOIN = PolicySpec(name="rejoin-standby", source="probe", match={"probe": "shop-db-standby"},
                    action="rejoin")  # fmt: skip


def cluster_probe(name: str, *recent: Health, summary: str = "") -> ProbeState:
    return ProbeState(name, CLUSTER, tuple(recent), 2, 2, summary)


DAMAGED = cluster_probe("shop-invariants", U, D, D, D, summary="1 movements without order")
PRIMARY_UP = cluster_probe("shop-db-primary", U, U)


def running(action: str, *, active: bool = True, ago_s: float = 5) -> RunView:
    return RunView(None, action, CLUSTER, NOW - timedelta(seconds=ago_s), active=active)


DEFER_TABLE = [
    ("damaged data with a primary and nothing running: the restore is proposed",
     Snapshot(probes=[PRIMARY_UP, DAMAGED], policies=[RESTORE]), ["Open", "RequestAction"]),
    ("a failover running on the cluster defers the restore",
     Snapshot(probes=[PRIMARY_UP, DAMAGED], policies=[RESTORE], runs=[running("failover")]),
     ["Open", "Hold"]),
    ("a rejoin pending, even on another target and long ago, defers the restore",
     Snapshot(probes=[PRIMARY_UP, DAMAGED], policies=[RESTORE],
              runs=[RunView(3, "rejoin", "pg1", NOW - timedelta(hours=5), active=True)]),
     ["Open", "Hold"]),
    ("a failover that has finished defers nothing",
     Snapshot(probes=[PRIMARY_UP, DAMAGED], policies=[RESTORE],
              runs=[running("failover", active=False, ago_s=60)]), ["Open", "RequestAction"]),
    ("an action the policy does not name defers nothing",
     Snapshot(probes=[PRIMARY_UP, DAMAGED], policies=[RESTORE], runs=[running("cache_flush")]),
     ["Open", "RequestAction"]),
    ("no primary: the failover is requested and the restore deferred",
     Snapshot(probes=[cluster_probe("shop-db-primary", U, D, D), DAMAGED],
              policies=[RESTORE, FAILOVER]), ["Open", "Open", "RequestAction", "Hold"]),
    ("a primary probe that could not look defers the restore",
     Snapshot(probes=[cluster_probe("shop-db-primary", U, X), DAMAGED], policies=[RESTORE]),
     ["Open", "Hold"]),
    ("a primary probe with no result yet defers the restore",
     Snapshot(probes=[DAMAGED], policies=[RESTORE]), ["Open", "Hold"]),
    ("a rejoin requested in this same cycle defers the restore, whichever incident comes first",
     Snapshot(probes=[PRIMARY_UP, DAMAGED, cluster_probe("shop-db-standby", U, D, D)],
              policies=[RESTORE, REJOIN]), ["Open", "Open", "RequestAction", "Hold"]),
    ("an open damage incident gets its restore once the failover is over",
     Snapshot(probes=[PRIMARY_UP, DAMAGED], policies=[RESTORE],
              incidents=[IncidentView(9, "probe:shop-invariants", "shop-invariants", "probe",
                                      CLUSTER, {"probe": "shop-invariants"}, False)]),
     ["RequestAction"]),
    ("an unreadable invariants check during a failover opens nothing and proposes nothing",
     Snapshot(probes=[cluster_probe("shop-db-primary", U, U, D),
                      cluster_probe("shop-invariants", U, U, X, X, X)],
              policies=[RESTORE, FAILOVER], runs=[running("failover")]), []),
]  # fmt: skip


@pytest.mark.parametrize(("snapshot", "expected"), [(s, e) for _, s, e in DEFER_TABLE],
                         ids=[d for d, _, _ in DEFER_TABLE])  # fmt: skip
def test_decide_defers_a_policy_while(snapshot: Snapshot, expected: list[str]) -> None:
    assert kinds(decide(snapshot, NOW)) == expected


def test_a_deferred_restore_says_why_in_the_sentence() -> None:
    failing_over = Snapshot(probes=[PRIMARY_UP, DAMAGED], policies=[RESTORE],
                            runs=[running("failover")])  # fmt: skip
    sentence = describe(decide(failing_over, NOW))
    why = "restore on shop-db-cluster deferred while failover runs on shop-db-cluster"
    assert f"hold probe:shop-invariants: {why}" in sentence
    no_primary = Snapshot(probes=[cluster_probe("shop-db-primary", U, D, summary="no leader"),
                                  DAMAGED], policies=[RESTORE])  # fmt: skip
    assert "deferred while shop-db-primary is down: no leader" in describe(decide(no_primary, NOW))


def test_a_policy_deferring_to_an_unknown_probe_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"defer_while\.probes_not_up: unknown probe 'nope'"):
        Settings(
            services=[{"name": "svc"}],
            probes=[{"name": "p", "kind": "tcp", "service": "svc"}],
            policies=[{"name": "r", "source": "probe", "match": {"probe": "p"}, "action": "restore",
                       "defer_while": {"probes_not_up": ["nope"]}}],
        )  # fmt: skip


# -- who may make it act -------------------------------------------------------------------------
SWITCHOVER = PolicySpec(name="switchover", source="operator", match={"target": CLUSTER},
                        action="switchover")  # fmt: skip
ALERT_FAILOVER = PolicySpec(name="failover-alert", source="alert",
                            match={"alertname": "ShopDatabaseNoPrimary"}, action="failover",
                            target=CLUSTER)  # fmt: skip


def forged(alertname: str, service: str = CLUSTER, **labels: str) -> AlertState:
    return AlertState("f1", alertname, "firing", {"alertname": alertname, **labels}, "forged",
                      NOW, service)  # fmt: skip


TRUST_TABLE = [
    ("an alert asking for a switchover reaches no operator policy",
     Snapshot(alerts=[forged("X", request="switchover")], policies=[SWITCHOVER]), ["Open"]),
    ("an alert naming the primary's probe reaches no probe policy",
     Snapshot(alerts=[forged("X", probe="shop-db-primary")], policies=[FAILOVER, REJOIN]),
     ["Open"]),
    ("an alert cannot stand in for the control plane's kind or target either",
     Snapshot(alerts=[forged("X", kind="shop-0-ready", target="shop-0")], policies=[RESTART]),
     ["Open"]),
    ("a probe incident reaches no alert policy, even one matching the same label",
     Snapshot(probes=[cluster_probe("shop-db-primary", U, D, D)],
              policies=[PolicySpec(name="a", source="alert", match={"kind": "shop-db-primary"},
                                   action="failover", target=CLUSTER)]), ["Open"]),
    ("the alert it was meant for still acts",
     Snapshot(alerts=[forged("ShopDatabaseNoPrimary")], policies=[ALERT_FAILOVER]),
     ["Open", "RequestAction"]),
]  # fmt: skip


@pytest.mark.parametrize(("snapshot", "expected"), [(s, e) for _, s, e in TRUST_TABLE],
                         ids=[d for d, _, _ in TRUST_TABLE])  # fmt: skip
def test_decide_lets_only_a_policys_own_source_reach_it(
    snapshot: Snapshot, expected: list[str]
) -> None:
    assert kinds(decide(snapshot, NOW)) == expected


def test_an_alert_policy_acts_on_the_service_it_names_not_the_one_the_alert_names() -> None:
    decisions = decide(Snapshot(alerts=[forged("ShopDatabaseNoPrimary", service="pg0")],
                                policies=[ALERT_FAILOVER]), NOW)  # fmt: skip
    [request] = [d for d in decisions if isinstance(d, RequestAction)]
    assert request.target == CLUSTER


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        ({"source": "webhook", "match": {"probe": "p"}}, r"policies\[0\]\.source"),
        ({"source": "alert", "match": {"probe": "p"}, "target": "svc"}, r"match\.probe"),
        ({"source": "alert", "match": {"request": "switchover"}, "target": "svc"},
         r"match\.request"),
        ({"source": "probe", "match": {"alertname": "X"}}, r"match\.alertname"),
        ({"source": "operator", "match": {"request": "switchover"}}, r"match\.request"),
        ({"source": "operator", "match": {"job": "shop"}}, r"match\.job"),
        ({"source": "alert", "match": {"alertname": "X"}}, r"target"),
        ({"source": "alert", "match": {"alertname": "X"}, "target": "nope"}, r"target.*nope"),
        ({"source": "probe", "match": {}}, r"match"),
        ({"source": "probe", "match": {"probe": "p"}, "params": {"instances": ["x"]}},
         r"policies\[0\]\.params\.instances"),
        ({"source": "probe", "match": {"probe": "p"}, "action": "reboot"},
         r"policies\[0\]\.action"),
    ],
)  # fmt: skip
def test_a_policy_its_source_cannot_reach_or_with_bad_params_fails_at_start(
    policy: dict[str, object], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        Settings.load(
            environ={},
            services=[{"name": "svc"}],
            probes=[{"name": "p", "kind": "tcp", "service": "svc"}],
            policies=[{"name": "r", "action": "restart", **policy}],
        )


def not_now(at: datetime, try_number: int = 1, why: str = "no standby answers") -> RunView:
    return RunView(7, "restart", "shop-0", at - timedelta(seconds=1), acted=False, retry=True,
                   try_number=try_number, finished_at=at, why=why)  # fmt: skip


def test_a_retry_is_the_next_try_and_says_why_it_is_tried_again() -> None:
    snapshot = Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
                        runs=[not_now(NOW - timedelta(seconds=5))])  # fmt: skip
    [request] = decide(snapshot, NOW)
    assert isinstance(request, RequestAction)
    assert request.try_number == 2
    assert "try 2, after: no standby answers" in request.reason


def test_the_backoff_doubles_with_each_try_up_to_its_cap() -> None:
    policy = RESTART.model_copy(update={"retry_backoff_s": 1.0, "retry_backoff_max_s": 15.0})
    assert [retry_delay_s(policy, n) for n in range(1, 7)] == [1, 2, 4, 8, 15, 15]
    # Five tries so far: the sixth waits the cap, 15 s after the fifth ended.
    runs = [not_now(NOW - timedelta(seconds=60 - 10 * n), try_number=n) for n in range(1, 6)]
    last_end = NOW - timedelta(seconds=10)
    waiting = Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[policy],
                       runs=runs)  # fmt: skip
    assert kinds(decide(waiting, last_end + timedelta(seconds=14))) == ["Hold"]
    assert kinds(decide(waiting, last_end + timedelta(seconds=15))) == ["RequestAction"]


def test_tries_go_on_for_as_long_as_the_incident_is_open() -> None:
    runs = [not_now(NOW - timedelta(minutes=60 - n), try_number=n) for n in range(1, 60)]
    snapshot = Snapshot(probes=[probe(D, D, D, D)], incidents=[incident()], policies=[RESTART],
                        runs=runs)  # fmt: skip
    [request] = decide(snapshot, NOW)
    assert isinstance(request, RequestAction) and request.try_number == 60


def critical(detected_s_ago: float, **changes: object) -> IncidentView:
    base = incident()
    return IncidentView(base.id, base.fingerprint, base.kind, base.source, base.target,
                        base.labels, False, severity="critical", summary="no writable primary",
                        detected_at=NOW - timedelta(seconds=detected_s_ago),
                        **changes)  # type: ignore[arg-type]  # fmt: skip


ESCALATING = RESTART.model_copy(update={"escalate_after_s": 30.0})


def test_a_critical_incident_not_mended_within_escalate_after_s_is_escalated_once_in_one_line() -> (
    None
):
    runs = [not_now(NOW - timedelta(seconds=20 - 5 * n), try_number=n) for n in range(1, 4)]
    snapshot = Snapshot(probes=[probe(D, D, D, D)], incidents=[critical(47)],
                        policies=[ESCALATING], runs=runs)  # fmt: skip
    escalations = [d for d in decide(snapshot, NOW) if isinstance(d, Escalate)]
    assert len(escalations) == 1
    assert escalations[0].reason == (
        "no recovery after 30 s: no writable primary for 47 s; restart tried 3 times, "
        "last: no standby answers"
    )
    told = Snapshot(probes=[probe(D, D, D, D)], incidents=[critical(47, escalated_at=NOW)],
                    policies=[ESCALATING], runs=runs)  # fmt: skip
    assert not [d for d in decide(told, NOW) if isinstance(d, Escalate)]


@pytest.mark.parametrize(
    ("incident_", "runs"),
    [
        (critical(20), []),  # not yet
        (critical(47, recovered_at=NOW), []),  # mended
        (critical(47), [RunView(7, "restart", "shop-0", NOW, succeeded=True)]),
    ],
    ids=["within its time", "recovered", "its action succeeded"],
)
def test_no_escalation_for_an_incident_in_time_or_mended(
    incident_: IncidentView, runs: list[RunView]
) -> None:
    snapshot = Snapshot(probes=[probe(D, D, D, D)], incidents=[incident_],
                        policies=[ESCALATING], runs=runs)  # fmt: skip
    assert not [d for d in decide(snapshot, NOW) if isinstance(d, Escalate)]


def test_a_warning_its_policy_has_not_mended_in_time_is_escalated_too() -> None:
    # A lost standby is a warning (the probe says DEGRADED), and still the rejoin's to mend.
    snapshot = Snapshot(probes=[probe(D, D, D, D)], incidents=[replace(critical(47),
                        severity="warning")], policies=[ESCALATING])  # fmt: skip
    assert [d for d in decide(snapshot, NOW) if isinstance(d, Escalate)]


def test_a_limit_holds_by_default_except_for_the_way_back_to_a_writable_cluster() -> None:
    assert RESTART.over_limit == "hold"
    assert FLUSH.over_limit == "hold"
    failover = PolicySpec(name="f", source="probe", match={"probe": "p"}, action="failover")
    rejoin = PolicySpec(name="r", source="probe", match={"probe": "p"}, action="rejoin")
    assert failover.over_limit == rejoin.over_limit == "notify"
    held = PolicySpec(name="f", source="probe", match={"probe": "p"}, action="failover",
                      over_limit="hold")  # fmt: skip
    assert held.over_limit == "hold"  # said by the policy: kept


def test_an_escalation_line_is_one_safe_line_whatever_the_summary() -> None:
    line = escalation_line("a\nb\u202ec" + "x" * 1000, NOW, NOW, "failover", [])
    assert "\n" not in line and "\u202e" not in line and len(line) < 300
