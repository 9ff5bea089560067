"""PgPrimaryProbe: does the cluster have exactly one writable primary?

A refused connection (dead postmaster, nothing listening) is a definite signal and reports
DOWN at once. A primary that does not answer (hung, SIGSTOPped, partitioned) is given
`grace_s` first: a short stall must never cause a failover, so it stays UP, saying so."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from pgcluster.nodes import NodeState, leader_of, observe_all
from probes.base import Health, Params, Probe, ProbeResult


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

    def check(self) -> ProbeResult:
        p: PgPrimaryParams = self.params  # type: ignore[assignment]
        asked_at = time.monotonic()
        views = observe_all(p.nodes, self.timeout_s)
        details = {v.name: {"state": v.state, "timeline": v.timeline} for v in views}
        leader = leader_of(views)
        with self._lock:
            if leader is not None:
                self._last_leader, self._unanswered_since = leader.name, None
                self._answered_at = time.monotonic()
                others = [v.name for v in views if v.state is NodeState.PRIMARY and v != leader]
                extra = f"; {', '.join(others)} writable on an older timeline" if others else ""
                return ProbeResult(
                    Health.UP,
                    f"{leader.name} leads (timeline {leader.timeline}){extra}",
                    details={"leader": leader.name, "nodes": details},
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
