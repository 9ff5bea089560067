"""PgStandbyProbe: is the cluster redundant, i.e. does a standby stream synchronously from
the leader? A writable node beside the leader (an old primary come back on its own) is a
split brain and reports DOWN. Without a leader (but a node answering) it reports UP: that
is pg_primary's incident."""

from __future__ import annotations

from pydantic import Field

from pgcluster.nodes import NodeState, follows, leader_of, observe_all
from probes.base import Health, Params, Probe, ProbeResult


class PgStandbyParams(Params):
    nodes: dict[str, str] = Field(min_length=2)  # node name -> libpq DSN


class PgStandbyProbe(Probe):
    kind = "pg_standby"
    Params = PgStandbyParams

    def check(self) -> ProbeResult:
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
        info = {"leader": leader.name, "sync": sync, "sync_names": leader.sync_names}
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
