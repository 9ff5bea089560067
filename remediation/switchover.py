"""Switchover: an operator's planned change of primary, with no acknowledged commit lost and
a write outage of about one promotion. The leader is stopped cleanly (its shutdown
checkpoint reaches the synchronous standby), the standby is promoted once it has received
that checkpoint, and the old leader rejoins as the new standby at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pgcluster.nodes import NodeState, leader_of
from remediation import facts, pg_ops
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params


class SwitchoverParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=2)
    candidate: str | None = None  # default: the synchronous standby
    promote_timeout_s: float = Field(default=30, gt=0)
    rejoin_timeout_s: float = Field(default=120, gt=0)


class SwitchoverOperatorParams(BaseModel):
    """An operator may choose the node to switch to: one of the policy's nodes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: str | None = Field(default=None, max_length=100)

    @field_validator("candidate")
    @classmethod
    def _one_of_the_nodes(cls, candidate: str | None, info: ValidationInfo) -> str | None:
        nodes = ((info.context or {}).get("policy") or {}).get("nodes") or {}
        if candidate is not None and candidate not in nodes:
            raise ValueError(f"must be one of the nodes: {', '.join(sorted(nodes))}")
        return candidate


def params_of(ctx: ActionContext) -> SwitchoverParams:
    return parse_params(SwitchoverParams, ctx, "switchover")


class Switchover(Action):
    kind = "switchover"
    needs = frozenset({"executor"})
    Params = SwitchoverParams
    OperatorParams = SwitchoverOperatorParams

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = SwitchoverParams.model_validate(dict(params))
        to = p.candidate or "the synchronous standby"
        return [
            f"check that a leader and {to} are there (else: skipped)",
            "stop the leader cleanly: its shutdown checkpoint reaches the standby",
            f"promote {to} once it holds that checkpoint (within {p.promote_timeout_s:g} s); "
            "if it never does, the old leader is started again and nothing is promoted",
            f"rejoin the old leader as the new synchronous standby (within "
            f"{p.rejoin_timeout_s:g} s)",
            "write outage: about one promotion; no acknowledged commit is lost",
        ]

    def precheck(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes))
        if leader is None:
            return Check.not_now("no leader: that is a failover")
        if p.candidate is not None and p.candidate not in p.nodes:
            return Check.never(f"unknown candidate {p.candidate!r}")
        if p.candidate == leader.name:
            return Check.nothing_to_do(f"{leader.name} leads already")
        sync = [n for n in leader.sync_standbys if p.candidate in (None, n)]
        if not sync:
            return Check.not_now("no synchronous standby to switch to: it could lose commits")
        return Check.go(f"switch {leader.name} -> {sync[0]}")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = params_of(ctx)
        views = pg_ops.views(p.nodes)
        leader = leader_of(views)
        if leader is None:
            raise ActionError("no leader to switch from", permanent=True)
        candidates = [n for n in leader.sync_standbys if p.candidate in (None, n)]
        if not candidates:
            if p.candidate is not None and leader.name == p.candidate:
                return Outcome(f"{leader.name} leads already", {"leader": leader.name})
            raise ActionError("no synchronous standby to switch to", permanent=True)
        new = next(v for v in views if v.name == candidates[0])
        ctx.executor.stop(leader.name)  # clean: its shutdown checkpoint goes to the standby
        checkpoint = pg_ops.controldata(ctx.executor, leader.name, "Latest checkpoint location")

        def received() -> bool:
            with pg_ops.connect(p.nodes[new.name]) as conn:
                row = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), %s::pg_lsn) >= 0",
                    (checkpoint,),
                ).fetchone()
            return bool(row and row[0])

        try:
            pg_ops.wait_for(received, 10, f"{new.name} holding {leader.name}'s last WAL")
        except (ActionError, psycopg.Error) as exc:
            ctx.executor.restart(leader.name)  # back as it was: nothing was promoted
            raise ActionError(f"switchover abandoned, {leader.name} restarted: {exc}") from exc
        seen = facts.not_synchronous(ctx.facts)
        pg_ops.promote(new, p.nodes[new.name], p.promote_timeout_s)
        promoted = next(v for v in pg_ops.views(p.nodes) if v.name == new.name)
        if promoted.state is not NodeState.PRIMARY:
            raise ActionError(f"{new.name} did not become writable")
        facts.promoted(ctx.facts, seen, new.name, [leader.name], promoted.timeline, "switchover")
        how = pg_ops.rejoin(
            ctx.executor, leader.name, promoted, p.nodes, timeout_s=p.rejoin_timeout_s
        )
        pg_ops.restore_sync(ctx.facts, new.name, p.nodes[new.name], p.rejoin_timeout_s)
        return Outcome(
            f"{new.name} leads; {leader.name} rejoined as its synchronous standby ({how})",
            {"leader": new.name, "standby": leader.name},
        )

    def verify(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes))
        if leader is None or not leader.sync_standbys:
            return Check(False, "no leader with a synchronous standby yet")
        if p.candidate is not None and leader.name != p.candidate:
            return Check(False, f"{leader.name} leads, not {p.candidate}")
        return Check(True, f"{leader.name} leads, {', '.join(leader.sync_standbys)} synchronous")
