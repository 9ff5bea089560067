"""PgPrimaryProbe: does the cluster have exactly one writable primary?

A refused connection (dead postmaster, nothing listening) is a definite signal and reports
DOWN at once. A primary that does not answer (hung, SIGSTOPped, partitioned) is given
`grace_s` first: a short stall must never cause a failover, so it stays UP, saying so.

Between runs it holds a session on the node it last found leading (`watch`): when that
session drops (the server's processes died: the kernel closes their sockets) or a reconnect
is refused, it asks for a run at once instead of waiting for the next tick. A hung or
partitioned node closes nothing and sends nothing, and a reconnect that times out is no
event: those still wait for their grace, and the watcher asks for a run the moment it ends
(a scheduled run would come up to one interval and one look's timeout later)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from pydantic import Field

from pgcluster.nodes import (
    NodeState,
    is_writable,
    leader_of,
    observe_all,
    session,
    state_of,
    wait_dropped,
)
from probes.base import Health, Params, Probe, ProbeResult

logger = logging.getLogger(__name__)

# The watcher looks at `stop` and at which node leads this often while it holds a session.
WATCH_POLL_S = 0.2
# A run asked for while one is in flight is dropped by the scheduler: it asks again this often
# until a run that began after the event has finished, for at most ASK_FOR_S.
ASK_AGAIN_S = 0.1
ASK_FOR_S = 2.0
# The least time between two events: a node that flaps cannot make the probe run nonstop.
EVENT_GAP_S = 0.1


class PgPrimaryParams(Params):
    nodes: dict[str, str] = Field(min_length=1)  # node name -> libpq DSN
    grace_s: float = Field(default=5.0, ge=0)


class PgPrimaryProbe(Probe):
    kind = "pg_primary"
    Params = PgPrimaryParams

    def __init__(self, name: str, params: Mapping[str, Any], timeout_s: float) -> None:
        super().__init__(name, params, timeout_s)
        self._lock = threading.Lock()
        self._last_leader: str | None = None
        self._unanswered_since: float | None = None
        self._answered_at: float | None = None  # when the leader last answered
        self._watched: str | None = None  # the node the last run found leading (or in grace)
        self._checked_from = float("-inf")  # when the last finished run began

    def check(self) -> ProbeResult:
        asked_at = time.monotonic()
        result = self._check(asked_at)
        with self._lock:
            self._watched = result.details.get("leader") if result.health is Health.UP else None
            self._checked_from = max(self._checked_from, asked_at)
        return result

    def overran(self, summary: str) -> ProbeResult:
        """A run given up on (a busy machine, or the leader hung mid-look) is the leader's
        silence since its last answer, like a run that found it unanswered: UP within the
        grace, DOWN after it. Never a failover sooner because the look itself was slow."""
        p: PgPrimaryParams = self.params  # type: ignore[assignment]
        with self._lock:
            last = self._last_leader
            if last is None or self._answered_at is None:
                return ProbeResult(self.unreachable, summary)
            self._unanswered_since = self._unanswered_since or self._answered_at
            silent_s = time.monotonic() - self._unanswered_since
            if silent_s < p.grace_s:
                self._watched = last  # the watcher counts the grace down and asks for a run
                return ProbeResult(
                    Health.UP,
                    f"{last} unanswered for {silent_s:.1f}s (grace {p.grace_s:g}s; {summary})",
                    details={"leader": last},
                )
            self._watched = None
            return ProbeResult(
                Health.DOWN,
                f"no primary: {last} unanswered for {silent_s:.1f}s ({summary})",
                details={"former_leader": last},
            )

    def _check(self, asked_at: float) -> ProbeResult:
        p: PgPrimaryParams = self.params  # type: ignore[assignment]
        views = observe_all(p.nodes, self.timeout_s)
        details = {v.name: {"state": v.state, "timeline": v.timeline} for v in views}
        leader = leader_of(views)
        with self._lock:
            if leader is not None:
                self._last_leader, self._unanswered_since = leader.name, None
                self._answered_at = time.monotonic()
                others = [v.name for v in views if v.state is NodeState.PRIMARY and v != leader]
                extra = f"; {', '.join(others)} writable on an older timeline" if others else ""
                # Whether its commits wait for a standby streaming now (True), are local
                # (False), or wait for one that is not there (None: no commit is
                # acknowledged meanwhile, so nothing new). The cluster facts learn it here.
                synchronous = (
                    (True if leader.sync_standbys else None) if leader.sync_names else False
                )
                return ProbeResult(
                    Health.UP,
                    f"{leader.name} leads (timeline {leader.timeline}){extra}",
                    details={
                        "leader": leader.name,
                        "nodes": details,
                        "facts": {"leader": leader.name, "synchronous": synchronous},
                    },
                )
            writable = [v.name for v in views if v.state is NodeState.PRIMARY]
            if len(writable) > 1:
                return ProbeResult(
                    Health.DOWN,
                    f"{' and '.join(writable)} are both writable on one timeline",
                    details={"nodes": details},
                )
            last = next((v for v in views if v.name == self._last_leader), None)
            if last is not None and last.state is NodeState.UNANSWERED:
                # The silence began after the leader's last answer (Patroni's TTL counts from
                # the last heartbeat), not when this probe first noticed it.
                self._unanswered_since = self._unanswered_since or self._answered_at or asked_at
                silent_s = time.monotonic() - self._unanswered_since
                if silent_s < p.grace_s:
                    return ProbeResult(
                        Health.UP,
                        f"{last.name} unanswered for {silent_s:.1f}s (grace {p.grace_s:g}s)",
                        details={"leader": last.name, "nodes": details},
                    )
                return ProbeResult(
                    Health.DOWN,
                    f"no primary: {last.name} unanswered for {silent_s:.1f}s",
                    details={"former_leader": last.name, "nodes": details},
                )
            self._unanswered_since = None
            why = f"{last.name}: {last.detail}" if last is not None else "no node accepts writes"
            return ProbeResult(
                Health.DOWN,
                f"no primary ({why})",
                details={"former_leader": self._last_leader, "nodes": details},
            )

    # -- between runs --------------------------------------------------------------------------
    def watch(self, on_event: Callable[[], None], stop: threading.Event) -> None:
        p: PgPrimaryParams = self.params  # type: ignore[assignment]
        while not stop.is_set():
            name = self._watched_node()
            if name is None:  # no leader known: the runs are looking for one
                stop.wait(WATCH_POLL_S)
                continue
            ends = self._grace_ends_at()
            if ends is not None:
                # A run found it silent: the runs look, this counts the grace down. (Holding a
                # session meanwhile would block in a connect to the silent node, libpq's two
                # seconds at least, past the grace's end: the failover a second late.)
                left_s = ends - time.monotonic()
                if left_s > self.timeout_s + WATCH_POLL_S:
                    stop.wait(min(WATCH_POLL_S, left_s - self.timeout_s - WATCH_POLL_S))
                    continue
                # A run that begins one look before the grace's end ends at it: a node still
                # silent then has been silent for the whole grace (a run judges the silence
                # when its look ends, never sooner), and one that answered is UP.
                stop.wait(max(0.0, left_s - self.timeout_s))
                if not stop.is_set() and self._grace_ends_at() == ends:
                    logger.info("%s: %s's grace ends: running the probe now", self.name, name)
                    self._bring_forward(on_event, time.monotonic(), stop)
                    stop.wait(max(EVENT_GAP_S, ends - time.monotonic()))
                continue
            event = self._hold_until_event(name, p.nodes[name], stop)
            if event is not None:
                logger.info("%s: %s: running the probe now", self.name, event)
                self._bring_forward(on_event, time.monotonic(), stop)
                stop.wait(EVENT_GAP_S)

    def _watched_node(self) -> str | None:
        with self._lock:
            return self._watched

    def _still_watching(self, name: str, stop: threading.Event) -> bool:
        """Hold the session on `name` while it leads and no run found it silent (then the
        watcher counts down its grace instead)."""
        return not stop.is_set() and self._watched_node() == name and self._grace_ends_at() is None

    def _grace_ends_at(self) -> float | None:
        """When the watched leader's grace ends (monotonic), while a run found it silent."""
        p: PgPrimaryParams = self.params  # type: ignore[assignment]
        with self._lock:
            if self._watched is None or self._unanswered_since is None:
                return None
            return self._unanswered_since + p.grace_s

    def _hold_until_event(self, name: str, dsn: str, stop: threading.Event) -> str | None:
        """Hold a session on `name` while the runs find it leading. The event, if any: the
        session dropped, a reconnect was refused, or the node does not answer as a primary."""
        try:
            # An idle session, held to learn when it drops (`wait_dropped`).
            conn = session(dsn, self.timeout_s, f"shopguard-watch/{self.name}")
        except psycopg.Error as exc:
            if state_of(exc) is NodeState.REFUSED:
                return f"a reconnect to {name} was refused"
            stop.wait(WATCH_POLL_S)  # no answer: the runs count its grace
            return None
        try:
            if not is_writable(conn, self.timeout_s):
                return f"{name} no longer answers as the primary"
            dropped = wait_dropped(conn, lambda: self._still_watching(name, stop), WATCH_POLL_S)
            return f"the session on {name} dropped" if dropped else None
        except psycopg.Error:
            return None  # it stopped answering: the runs count its grace
        finally:
            conn.close()

    def _bring_forward(
        self, on_event: Callable[[], None], seen_at: float, stop: threading.Event
    ) -> None:
        """Ask for a run until one that began after `seen_at` has finished."""
        until = time.monotonic() + ASK_FOR_S
        while not stop.is_set() and time.monotonic() < until:
            with self._lock:
                if self._checked_from >= seen_at:
                    return
            on_event()
            stop.wait(ASK_AGAIN_S)
