"""Cluster facts in the state store (controlplane/facts.py): changed only by compare-and-set,
each change audited; and learned from a primary probe's look only when no action could have
raced the look (a look begun before a change, or while a run on the cluster was running,
writes nothing). In process, on a real SQLite state store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from controlplane import facts, store
from controlplane.models import ActionRun, ActionState, AuditEntry
from remediation import facts as cluster
from remediation.facts import FactsConflict

CLUSTER = "db-cluster"
T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    store.migrate(engine)
    return store.session_factory(engine)


def keeper(factory: sessionmaker[Session], at: datetime = T0) -> facts.StoreFacts:
    return facts.StoreFacts(factory, CLUSTER, by="run 1 (failover)", clock=lambda: at)


def look(factory: sessionmaker[Session], looked_from: datetime, synchronous: bool) -> object:
    return facts.observe(
        factory,
        CLUSTER,
        looked_from=looked_from,
        leader="pg0",
        synchronous=synchronous,
        by="probe primary",
        now=looked_from + timedelta(seconds=0.3),
    )


def run_on(factory: sessionmaker[Session], started: datetime, finished: datetime | None) -> None:
    with store.transaction(factory) as s:
        s.add(
            ActionRun(
                action="rejoin",
                target=CLUSTER,
                mode="auto",
                state=ActionState.RUNNING if finished is None else ActionState.SUCCEEDED,
                requested_by="policy",
                reason="test",
                created_at=started,
                started_at=started,
                finished_at=finished,
            )
        )


def test_unknown_facts_read_as_version_zero_and_not_synchronous(
    factory: sessionmaker[Session],
) -> None:
    found = keeper(factory).read()
    assert found.version == 0 and found.synchronous is None and found.leader is None


def test_a_change_from_stale_facts_is_a_conflict_and_writes_nothing(
    factory: sessionmaker[Session],
) -> None:
    k = keeper(factory)
    first = k.change(k.read(), synchronous=True, leader="pg0")
    assert (first.version, first.synchronous) == (1, True)
    stale = first
    k.change(first, synchronous=False)  # someone else's change, in between
    with pytest.raises(FactsConflict):
        k.change(stale, synchronous=True)
    assert k.read().synchronous is False and k.read().version == 2
    # Two first writers: one wins, the other conflicts (no row to compare with yet).
    with pytest.raises(FactsConflict):
        k.change(cluster.Facts(CLUSTER), leader="pg1")


def test_every_change_is_audited_with_its_run_and_what_it_changed(
    factory: sessionmaker[Session],
) -> None:
    k = facts.StoreFacts(factory, CLUSTER, by="run 7 (failover)", run_id=None, clock=lambda: T0)
    seen = k.change(k.read(), synchronous=True, leader="pg0")
    cluster.promoted(k, seen, "pg1", ["pg0"], 2, "failover")
    with store.read(factory) as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.verb == "facts")).all()
    assert [e.actor for e in entries] == ["run 7 (failover)"] * 2
    assert "synchronous = False" in entries[1].message and "leader = pg1" in entries[1].message
    after = k.read()
    assert after.roles == {"pg1": "primary", "pg0": "standby"}
    assert [h["timeline"] for h in after.history] == [2]


def test_not_synchronous_is_retried_on_a_conflict_as_it_is_always_safe_to_say(
    factory: sessionmaker[Session],
) -> None:
    k = keeper(factory)
    k.change(k.read(), synchronous=True)
    assert cluster.not_synchronous(k).synchronous is False


def test_a_look_learns_commits_synchronous_when_nothing_raced_it(
    factory: sessionmaker[Session],
) -> None:
    assert look(factory, T0, synchronous=True) is not None
    found = keeper(factory).read()
    assert (found.synchronous, found.leader, found.last_good_primary) == (True, "pg0", "pg0")
    assert look(factory, T0 + timedelta(seconds=1), synchronous=True) is None  # nothing new


def test_a_look_begun_before_the_facts_last_changed_writes_nothing(
    factory: sessionmaker[Session],
) -> None:
    k = keeper(factory, at=T0 + timedelta(seconds=5))
    k.change(k.read(), synchronous=False, leader="pg0")  # an action degraded commits at T0+5
    assert look(factory, T0 + timedelta(seconds=4), synchronous=True) is None
    assert keeper(factory).read().synchronous is False
    written = look(factory, T0 + timedelta(seconds=6), synchronous=True)
    assert isinstance(written, cluster.Facts)  # what was written, not the row as it was read
    assert (written.synchronous, written.version) == (True, 2)


def test_a_look_while_a_run_on_the_cluster_was_running_writes_nothing(
    factory: sessionmaker[Session],
) -> None:
    run_on(factory, T0, None)  # running now
    assert look(factory, T0 + timedelta(seconds=1), synchronous=True) is None
    with store.transaction(factory) as s:
        s.execute(ActionRun.__table__.delete())
    # One that finished after the look began might have changed what it saw.
    run_on(factory, T0, T0 + timedelta(seconds=2))
    assert look(factory, T0 + timedelta(seconds=1), synchronous=True) is None
    assert look(factory, T0 + timedelta(seconds=3), synchronous=True) is not None
