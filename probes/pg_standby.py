"""PgStandbyProbe: is the cluster redundant, i.e. does a standby stream synchronously from
the leader? A writable node beside the leader (an old primary come back on its own) is a
split brain and reports DOWN. Without a leader (but a node answering) it reports UP: that
is pg_primary's incident.

With `missing_for_s`, it watches redundancy over time instead: UP while the cluster has had
no synchronous standby for less than that (the quick rejoin's business), DOWN past it, so
"no redundancy for N minutes" is an incident of its own, with its own action."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from pgcluster.nodes import NodeState, follows, leader_of, observe_all
from probes.base import Health, Params, Probe, ProbeResult


class PgStandbyParams(Params):
    nodes: dict[str, str] = Field(min_length=2)  # node name -> libpq DSN
    missing_for_s: float | None = Field(default=None, gt=0)


class PgStandbyProbe(Probe):
    kind = "pg_standby"
    Params = PgStandbyParams

    def __init__(self, name: str, params: Mapping[str, Any], timeout_s: float) -> None:
        super().__init__(name, params, timeout_s)
        self._lock = threading.Lock()
        self._missing_since: float | None = None

    def check(self) -> ProbeResult:
        result = self._look()
        p: PgStandbyParams = self.params  # type: ignore[assignment]
        if p.missing_for_s is None:
            return result
        with self._lock:
            if result.health is Health.UP and result.details.get("sync"):
                self._missing_since = None
                return result
            now = time.monotonic()
            self._missing_since = self._missing_since or now
            missing_s = now - self._missing_since
        if missing_s < p.missing_for_s:
            return ProbeResult(
                Health.UP,
                f"redundancy missing for {missing_s:.0f}s (allowed {p.missing_for_s:g}s): "
                f"{result.summary}",
                details=result.details,
            )
        return ProbeResult(
            Health.DOWN,
            f"no redundancy for {missing_s:.0f}s: {result.summary}",
            details={**result.details, "missing_s": round(missing_s, 1)},
        )

    def _look(self) -> ProbeResult:
        p: PgStandbyParams = self.params  # type: ignore[assignment]
        views = observe_all(p.nodes, self.timeout_s)
        details = {
            v.name: {"state": v.state, "receiving": v.receiving, "timeline": v.timeline}
            for v in views
        }
        leader = leader_of(views)
        if all(v.state in (NodeState.REFUSED, NodeState.UNANSWERED) for v in views):
            return ProbeResult(Health.DOWN, "no node answers", details=details)
        if leader is None:
            return ProbeResult(Health.UP, "no leader: the primary probe's concern", details=details)
        rogue = [v.name for v in views if v.state is NodeState.PRIMARY and v != leader]
        if rogue:
            return ProbeResult(
                Health.DOWN,
                f"split brain: {', '.join(rogue)} writable beside the leader {leader.name}",
                details={"leader": leader.name, "rogue": rogue, "nodes": details},
            )
        others = [v for v in views if v != leader]
        following = {v.name for v in others if follows(v, leader)}
        sync = [n for n in leader.sync_standbys if n in following]
        info = {
            "leader": leader.name,
            "sync": sync,
            "sync_names": leader.sync_names,
            # Bytes of WAL each standby node has yet to replay, as the leader sees it (other
            # WAL senders, such as a base backup's, are not standbys).
            "lag_bytes": {n: lag for n, lag in leader.lag_bytes if n in {v.name for v in others}},
        }
        if sync:
            return ProbeResult(
                Health.UP,
                f"{leader.name} leads, {', '.join(sync)} synchronous",
                details={**info, "nodes": details},
            )
        lagging = [f"{v.name} {v.state}" for v in others]
        mode = "synchronous commits wait" if leader.sync_names else "commits are asynchronous"
        return ProbeResult(
            Health.DEGRADED,
            f"no synchronous standby ({', '.join(lagging)}); {mode}",
            details={**info, "nodes": details},
        )
