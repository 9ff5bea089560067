"""The cluster facts an action reads and changes: whether every acknowledged commit is on a
standby, who leads, the nodes' roles, the timeline history, the last primary known good.

They live in the control plane's state store (controlplane/facts.py keeps them, as Patroni
keeps `/sync`, `/leader` and `/history` in its DCS) and change only by compare-and-set: an
action changes what it read (`FactsKeeper.change(seen, ...)`), and a change made meanwhile by
anyone else is a `FactsConflict`, never overwritten. No executor holds them: losing a host's
files can never make a failover look safe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

CHANGE_TRIES = 5  # a change to the safe side (not synchronous) is read again and retried


@dataclass(frozen=True, slots=True)
class Facts:
    cluster: str
    version: int = 0  # 0: nothing recorded yet
    synchronous: bool | None = None  # None: unknown, as unsafe to promote on as False
    leader: str | None = None
    roles: Mapping[str, str] = field(default_factory=dict)
    history: tuple[Mapping[str, Any], ...] = ()
    last_good_primary: str | None = None


class FactsConflict(Exception):
    """The facts changed since they were read: whatever was decided on them must be again."""


class FactsKeeper(Protocol):
    def read(self) -> Facts:
        """The cluster's facts now (version 0 and all unknown if none were ever recorded)."""
        ...

    def change(self, seen: Facts, **changes: Any) -> Facts:
        """Apply `changes` (fields of `Facts`) if the facts are still at `seen.version`, and
        return them as written; else raise FactsConflict. Every change is audited."""
        ...


class NoFacts:
    """For a control plane that keeps no facts (tests of actions that read none): every read is
    unknown, and a change is refused."""

    def __init__(self, cluster: str = "") -> None:
        self.cluster = cluster

    def read(self) -> Facts:
        return Facts(self.cluster)

    def change(self, seen: Facts, **changes: Any) -> Facts:
        raise FactsConflict("this control plane keeps no cluster facts")


def not_synchronous(keeper: FactsKeeper) -> Facts:
    """Commits may be local from now on: written before anything makes them so. Always safe to
    say, so a conflict is read again and retried rather than given up on."""
    for _ in range(CHANGE_TRIES):
        seen = keeper.read()
        if seen.synchronous is False:
            return seen
        try:
            return keeper.change(seen, synchronous=False)
        except FactsConflict:
            continue
    raise FactsConflict(f"could not record {keeper.read().cluster} as not synchronous")


def synchronous_again(keeper: FactsKeeper, leader: str) -> Facts:
    """A commit on `leader` waited for its synchronous standby (proven by the caller): every
    acknowledged commit is on a standby again, and `leader` is the last primary known good."""
    seen = keeper.read()
    return keeper.change(
        seen,
        synchronous=True,
        leader=leader,
        roles={**seen.roles, leader: "primary"},
        last_good_primary=leader,
    )


def promoted(
    keeper: FactsKeeper, seen: Facts, leader: str, others: list[str], timeline: int | None, why: str
) -> Facts:
    """`leader` now leads alone (commits local until a standby rejoins); the others are to be
    standbys; the new timeline goes into the history. Compare-and-set from `seen`, the facts
    the promotion was decided on."""
    entry = {
        "timeline": timeline,
        "leader": leader,
        "at": datetime.now(UTC).isoformat(),
        "why": why,
    }
    return keeper.change(
        seen,
        synchronous=False,
        leader=leader,
        roles={**seen.roles, leader: "primary", **{n: "standby" for n in others}},
        history=(*seen.history, entry),
    )


def role_is(keeper: FactsKeeper, node: str, role: str) -> Facts:
    seen = keeper.read()
    if seen.roles.get(node) == role:
        return seen
    return keeper.change(seen, roles={**seen.roles, node: role})
