"""The cluster facts in the state store (remediation/facts.py says what they are).

`StoreFacts` is an action's keeper: reads, and compare-and-set changes, each audited with the
run that made it. `observe` is how the facts learn what no action told them (a control plane
just started, an operator's own change): from a look at the leader that no action could have
raced. Patroni's leader writes `/sync` only once it sees its synchronous standby; so here:
commits are recorded synchronous only from a look that began after the facts last changed
and while no run on the cluster was running (actions change the facts before they make
commits local, so any such change since the look makes its compare-and-set fail)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controlplane import store
from controlplane.logsafe import printable
from controlplane.models import ClusterFacts
from remediation.facts import Facts, FactsConflict


def as_facts(cluster: str, row: ClusterFacts | None) -> Facts:
    if row is None:
        return Facts(cluster)
    return Facts(
        cluster=cluster,
        version=row.version,
        synchronous=row.synchronous,
        leader=row.leader,
        roles=dict(row.roles or {}),
        history=tuple(row.history or ()),
        last_good_primary=row.last_good_primary,
    )


def read(factory: sessionmaker[Session], cluster: str) -> Facts:
    with store.read(factory) as s:
        return as_facts(cluster, store.cluster_facts(s, cluster))


def _json(changes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}


def write(
    session: Session,
    seen: Facts,
    changes: Mapping[str, Any],
    *,
    by: str,
    now: datetime,
    run_id: int | None = None,
) -> Facts | None:
    """Compare-and-set from `seen`, audited; None when they changed first."""
    values = _json(changes)
    version = store.change_facts(
        session, seen.cluster, version=seen.version, changes=values, by=by, now=now
    )
    if version is None:
        return None
    store.audit(
        session,
        actor=by,
        verb="facts",
        message=f"{seen.cluster}: "
        + ", ".join(f"{k} = {printable(str(v), limit=200)}" for k, v in sorted(values.items())),
        at=now,
        action_run_id=run_id,
        data={"cluster": seen.cluster, "version": version, "changes": values},
    )
    return as_facts(seen.cluster, store.cluster_facts(session, seen.cluster))


class StoreFacts:
    """An action's keeper of its target cluster's facts."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        cluster: str,
        *,
        by: str,
        run_id: int | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.factory, self.cluster, self.by, self.run_id = factory, cluster, by, run_id
        self.clock = clock or (lambda: datetime.now(UTC))

    def read(self) -> Facts:
        return read(self.factory, self.cluster)

    def change(self, seen: Facts, **changes: Any) -> Facts:
        if seen.cluster != self.cluster:
            raise FactsConflict(f"facts of {seen.cluster}, not of {self.cluster}")
        with store.transaction(self.factory) as s:
            done = write(s, seen, changes, by=self.by, now=self.clock(), run_id=self.run_id)
        if done is None:
            raise FactsConflict(f"{self.cluster}'s facts changed since version {seen.version}")
        return done


def observe(
    factory: sessionmaker[Session],
    cluster: str,
    *,
    looked_from: datetime,
    leader: str,
    synchronous: bool,
    by: str,
    now: datetime,
) -> Facts | None:
    """What a look begun at `looked_from` saw of the leader: whether its commits wait for a
    synchronous standby. Written only if it says something new, the facts have not changed
    since the look began, and no run on the cluster has been running since (`store.
    untouched_since`). Returns the facts written, or None."""
    known = read(factory, cluster)  # most looks say nothing new: no write lock for them
    if known.synchronous is synchronous and known.leader == leader:
        return None
    with store.transaction(factory, lock_wait_s=1) as s:
        seen = as_facts(cluster, row := store.cluster_facts(s, cluster))
        if row is not None and row.updated_at >= looked_from:
            return None
        if seen.synchronous is synchronous and seen.leader == leader:
            return None
        if not store.untouched_since(s, cluster, looked_from):
            return None
        changes: dict[str, Any] = {"synchronous": synchronous, "leader": leader}
        changes["roles"] = {**seen.roles, leader: "primary"}
        if synchronous:
            changes["last_good_primary"] = leader
        return write(s, seen, changes, by=by, now=now)
