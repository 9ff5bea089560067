"""Rejoin: restore redundancy. Writes first: with no synchronous standby, switch the leader to
asynchronous commits at once (a commit waiting for a standby that is gone waits forever).
Then bring every other node back as a standby of the leader (fencing a rogue writable one
first), and restore synchronous commits once one streams."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pgcluster.nodes import NodeState, NodeView, follows, leader_of
from remediation import facts, pg_ops
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params


class RejoinParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=2)
    # How long a node may take to say what it is: a hung one costs this, twice (precheck and
    # execute), on the path of every failover.
    observe_timeout_s: float = Field(default=1.0, gt=0)
    # The precheck looks again within this budget while no leader answers (a busy leader is
    # not a missing one).
    precheck_budget_s: float = Field(default=3.0, gt=0)
    settle_s: float = Field(default=5, ge=0)  # a standby that reconnects within this is left be
    rejoin_timeout_s: float = Field(default=120, gt=0)
    # Skip pg_rewind: a fresh base backup (the action for redundancy missing for too long).
    rebuild: bool = False


def params_of(ctx: ActionContext) -> RejoinParams:
    return parse_params(RejoinParams, ctx, "rejoin")


class Rejoin(Action):
    kind = "rejoin"
    needs = frozenset({"executor"})
    Params = RejoinParams
    # Its precheck re-reads every node, and each step is safe to take again (a rogue node is
    # fenced again, a rewind that failed falls back to a base backup): a run that died or
    # failed mid-way may be followed by a new one.
    may_start_over = True

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = RejoinParams.model_validate(dict(params))
        return [
            "find the leader (none: not now, tried again with backoff: a failover's job)",
            "without a synchronous standby, switch the leader to asynchronous commits at once",
            "fence a node that is writable beside the leader",
            f"leave a standby that streams again within {p.settle_s:g} s; bring every other "
            + ("node back rebuilt from a base backup" if p.rebuild else "node back (pg_rewind)")
            + f" as a standby of the leader, within {p.rejoin_timeout_s:g} s",
            "make commits synchronous again once a standby streams",
        ]

    def precheck(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        # Looks again only while a node is slow to answer (it may be the leader, on a busy
        # machine). A leader that is gone (refused) is a failover's job: the rejoin says "not
        # now" at once and frees the cluster for it (held 3 s, it held up a failover 3 s).
        views = pg_ops.views_until(
            p.nodes,
            lambda found: (
                leader_of(found) is not None
                or all(v.state is not NodeState.UNANSWERED for v in found)
            ),
            timeout_s=p.observe_timeout_s,
            budget_s=p.precheck_budget_s,
        )
        leader = leader_of(views)
        if leader is None:
            return Check.not_now("no leader to rejoin to yet (a failover's job)")
        missing = [v.name for v in views if v != leader and not follows(v, leader)]
        if not missing and leader.sync_standbys:
            return Check.nothing_to_do(f"{leader.name} has a synchronous standby: nothing to do")
        return Check.go(f"{leader.name} leads; to rejoin: {', '.join(missing) or 'none'}")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = params_of(ctx)
        views = pg_ops.views(p.nodes, p.observe_timeout_s)
        leader = leader_of(views)
        if leader is None:
            raise ActionError("no leader to rejoin to")
        steps: list[str] = []
        leader_dsn = p.nodes[leader.name]
        if not leader.sync_standbys and leader.sync_names:
            pg_ops.degrade_to_async(ctx.facts, leader_dsn)
            steps.append(f"{leader.name} degraded to asynchronous commits")
        for view in views:
            if view == leader or follows(view, leader):
                continue
            if view.state is NodeState.PRIMARY:
                pg_ops.fence(ctx.executor, view)
                steps.append(f"fenced {view.name} (writable beside the leader)")
            elif view.state is NodeState.STANDBY and self._settles(view, leader, p):
                continue
            how = pg_ops.rejoin(
                ctx.executor,
                view.name,
                leader,
                p.nodes,
                timeout_s=p.rejoin_timeout_s,
                rebuild=p.rebuild,
            )
            facts.role_is(ctx.facts, view.name, "standby")
            steps.append(f"{view.name} rejoined ({how})")
        pg_ops.restore_sync(ctx.facts, leader.name, leader_dsn, p.rejoin_timeout_s)
        steps.append(f"{leader.name} synchronous again")
        return Outcome("; ".join(steps), {"leader": leader.name, "steps": steps})

    @staticmethod
    def _settles(view: NodeView, leader: NodeView, p: RejoinParams) -> bool:
        try:
            pg_ops.wait_for(
                lambda: follows(
                    pg_ops.views({view.name: p.nodes[view.name]}, p.observe_timeout_s)[0], leader
                ),
                p.settle_s,
                f"{view.name} streaming",
            )
        except ActionError:
            return False
        return True

    def verify(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes, p.observe_timeout_s))
        if leader is None:
            return Check(False, "no leader")
        if not leader.sync_standbys:
            return Check(False, f"{leader.name} has no synchronous standby yet")
        if ctx.facts.read().synchronous is not True:
            return Check(False, "synchronous commits not confirmed yet")
        return Check(True, f"{', '.join(leader.sync_standbys)} streams synchronously")
