"""A primary's death as an event, on a stack of its own (these tests move the primary): the
primary probe holds a session on the leader and runs at once when it drops; a hung leader
(its session open, nothing sent) still gets its grace; and after a failover the old primary
is back as the synchronous standby, handed over by the failover itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane import store
from controlplane.config import Settings
from controlplane.runtime import ControlPlane
from lab.chaos import inject
from lab.process import wait_until
from lab.stack import Stack
from probes.base import Health
from remediation.executors.none import NoExecutor
from tests.conftest import stack_of_its_own
from tests.test_controlplane import Api
from tests.test_failover import leader, node_state, order, runs_of, view, wait_redundant

GRACE_S = 5.0  # the lab's grace for a primary that does not answer (lab/targets.py)
RECORDED_LATE_S = 0.25  # a run is recorded when it finishes, a little after its answer
WATCHED = "watched-primary"


@pytest.fixture(scope="module")
def events() -> Iterator[Stack]:
    with stack_of_its_own("shop-events", products=50, stock=100_000) as lab:
        yield lab


@pytest.fixture(scope="module")
def events_api(events: Stack) -> Api:
    return Api(events)


@contextmanager
def watcher_plane(events: Stack, tmp_path: Path, grace_s: float) -> Iterator[ControlPlane]:
    """A control plane of the test's own, in process, beside the stack's: its one probe is a
    pg_primary probe that runs once (at start) and then only every two minutes, so a run
    within the test can only have been brought forward by its watcher. It acts on nothing."""
    settings = Settings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'state.db'}",
            "instance_id": "cp-events",
            "services": [{"name": "cluster"}],
            "probes": [
                {
                    "name": WATCHED,
                    "kind": "pg_primary",
                    "service": "cluster",
                    "interval_s": 120,
                    "timeout_s": 0.5,
                    "failures_to_open": 1,
                    "params": {
                        "nodes": {n: events.dsn(n) for n in ("pg0", "pg1")},
                        "grace_s": grace_s,
                    },
                }
            ],
        }
    )
    plane = ControlPlane(settings, executor=NoExecutor()).start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def watching(events: Stack, tmp_path: Path) -> Iterator[ControlPlane]:
    with watcher_plane(events, tmp_path, GRACE_S) as plane:
        yield plane


def probe_runs(plane: ControlPlane) -> list[tuple[datetime, Health]]:
    """Oldest first: when each run of the watched probe was recorded, and what it said."""
    with store.read(plane.factory) as s:
        rows = store.recent_probe_runs(s, WATCHED, 100)
        return [(r.at, Health(r.health)) for r in reversed(rows)]


def last_answer_before(stack: Stack, at: datetime) -> datetime:
    """When the stack's own primary probe last recorded the leader answering, before `at`."""
    engine = store.make_engine(f"sqlite:///{stack.layout.data_dir / 'controlplane' / 'state.db'}")
    try:
        with store.read(store.session_factory(engine)) as s:
            runs = store.recent_probe_runs(s, "shop-db-primary", 2000)
    finally:
        engine.dispose()
    leads = [r.at for r in runs if r.at < at and " leads " in r.summary]
    assert leads, "the stack's primary probe never saw the leader answer before the hang"
    return max(leads)


def watcher_sessions(stack: Stack, node: str, probe: str) -> list[int]:
    """Backend pids of the sessions a probe's watcher holds on `node`."""
    with stack.connect(node) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"shopguard-watch/{probe}",),
        ).fetchall()
    return [int(r[0]) for r in rows]


def succeeded_failovers_since(api: Api, before: set[int]) -> list[dict[str, Any]]:
    """The failover runs that succeeded, of those not in `before` (ids seen before a fault)."""
    return [
        r for r in runs_of(api, "failover") if r["id"] not in before and r["state"] == "succeeded"
    ]


def watched_by_both(stack: Stack, plane: ControlPlane) -> str:
    """The leader, once the first run of the test's probe is in and both control planes'
    watchers hold a session on it."""
    lead = wait_redundant(stack)
    wait_until(lambda: len(probe_runs(plane)) >= 1, timeout_s=10, what="the first probe run")
    wait_until(
        lambda: all(
            len(watcher_sessions(stack, lead, probe)) == 1 for probe in (WATCHED, "shop-db-primary")
        ),
        timeout_s=10,
        what=f"both watchers on {lead}",
    )
    return lead


def test_a_dropped_leader_connection_runs_the_probe_at_once(
    events: Stack, watching: ControlPlane
) -> None:
    lead = watched_by_both(events, watching)
    before = len(probe_runs(watching))
    [pid] = watcher_sessions(events, lead, WATCHED)
    with events.connect(lead) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # The probe's next tick is two minutes away: a run now was brought forward by the drop.
    wait_until(
        lambda: len(probe_runs(watching)) > before, timeout_s=20, what="a run after the drop"
    )
    # The drop of a session is not the death of the leader: the run says what it finds.
    assert probe_runs(watching)[-1][1] is Health.UP
    assert leader(events) == lead
    # And the watcher holds a new session on the leader.
    wait_until(
        lambda: watcher_sessions(events, lead, WATCHED) not in ([], [pid]),
        timeout_s=10,
        what="the watcher's new session",
    )


def test_a_hung_primarys_open_connection_does_not_trigger_a_failover_before_its_grace(
    events: Stack, events_api: Api, watching: ControlPlane
) -> None:
    lead = watched_by_both(events, watching)
    before = len(probe_runs(watching))
    failovers = len(runs_of(events_api, "failover"))
    # Every process of the leader stopped for less than the grace: the watchers' sessions
    # stay open, their kernel acknowledging, nothing sent. No event, no failover.
    record = inject("hang-primary", events.layout.data_dir, duration_s=GRACE_S - 2)
    assert record.target == lead
    assert len(probe_runs(watching)) == before, "the hang brought no run forward"
    events_api.wait_cycles(4)
    assert leader(events) == lead
    assert len(runs_of(events_api, "failover")) == failovers
    assert order(events).status_code == 201


def test_a_hung_primarys_grace_ends_in_a_run_at_once_not_at_the_next_tick(
    events: Stack, events_api: Api, tmp_path: Path
) -> None:
    # The test's probe has a grace of 1.5 s; the stack's own (5 s) outlasts the 3 s hang, so
    # its control plane fails nothing over and the node is silent, not refused, throughout.
    with watcher_plane(events, tmp_path, grace_s=1.5) as plane:
        lead = watched_by_both(events, plane)
        spec = next(p for p in plane.settings.probes if p.name == WATCHED)
        failovers = len(runs_of(events_api, "failover"))
        assert plane.run_probe(spec).health is Health.UP  # the leader's last answer: now
        hang = threading.Thread(
            target=inject,
            args=("hang-primary", events.layout.data_dir),
            kwargs={"duration_s": GRACE_S - 2},
        )
        hang.start()
        try:
            time.sleep(0.3)
            seen = plane.run_probe(spec)  # the leader silent, within its grace
            assert seen.health is Health.UP and "unanswered" in seen.summary, seen.summary
            # The next tick is two minutes away: a DOWN run before the hang ends came from the
            # watcher, at the grace's end.
            wait_until(
                lambda: probe_runs(plane)[-1][1] is Health.DOWN,
                timeout_s=GRACE_S - 2,
                what="a run when the grace ended",
            )
            assert hang.is_alive(), "the run came only after the hang"
            with store.read(plane.factory) as s:
                [last] = store.recent_probe_runs(s, WATCHED, 1)
            assert f"no primary: {lead} unanswered for" in last.summary, last.summary
        finally:
            hang.join()
    assert leader(events) == lead
    assert len(runs_of(events_api, "failover")) == failovers


def test_a_primary_hung_past_its_grace_is_failed_over_but_not_before_its_grace(
    events: Stack, events_api: Api, watching: ControlPlane
) -> None:
    lead = watched_by_both(events, watching)
    before = {r["id"] for r in runs_of(events_api, "failover")}
    record = inject("hang-primary", events.layout.data_dir, duration_s=GRACE_S + 5)
    assert record.target == lead
    new = wait_redundant(events)
    assert new != lead
    failover = succeeded_failovers_since(events_api, before)
    assert len(failover) == 1
    # The grace counts from the leader's last answer, as the stack's primary probe recorded it
    # (on a busy machine that may be more than one probe interval before the hang began).
    created = datetime.fromisoformat(failover[0]["created_at"])
    answered = last_answer_before(events, record.started.at)
    earliest = answered + timedelta(seconds=GRACE_S - RECORDED_LATE_S)
    assert created >= earliest, (created, answered, record.started.at)
    assert order(events).status_code == 201


def test_the_old_primary_is_streaming_as_synchronous_standby_again_after_a_failover(
    events: Stack, events_api: Api, watching: ControlPlane
) -> None:
    old = watched_by_both(events, watching)
    before = {r["id"] for r in runs_of(events_api, "failover")}
    record = inject("kill-primary", events.layout.data_dir)
    assert record.target == old
    # The test's probe runs every two minutes: its run saying DOWN came from the dropped
    # session, at once.
    wait_until(
        lambda: any(
            at >= record.started.at and health is Health.DOWN for at, health in probe_runs(watching)
        ),
        timeout_s=20,
        what="the watched probe's run after the kill",
    )
    new = wait_redundant(events)
    assert new != old
    role, timeline = node_state(events, int(old.removeprefix("pg")))
    assert (role, timeline) == ("standby", node_state(events, int(new.removeprefix("pg")))[1])
    assert view(events).is_redundant()
    # The failover handed over: it rejoined the old primary and restored synchronous commits.
    [failover] = succeeded_failovers_since(events_api, before)
    outputs = [
        e["message"]
        for e in events_api.get(f"/actions/{failover['id']}")["audit"]
        if e["verb"] == "output"
    ]
    assert any(f"{old} rejoined" in m and f"{new} synchronous again" in m for m in outputs)
    assert order(events).status_code == 201
