"""Failover: the primary is gone; fence it, promote the standby, keep writes flowing.

Never two writable primaries: every node that is not a standby is fenced before anything is
promoted (in the lab: SIGKILL of every process of the instance, backends included, even
stopped ones, verified gone), and a fenced node that still answers as writable stops it.
Never a lost acknowledged order: promotion needs the `synchronous` fact (the standby confirmed every
commit up to the failure), unless the policy says `require_synchronous = false`.

Then, as a switchover does, it hands over at once to what a rejoin would do next (`rejoin`,
default on): the fenced nodes back as standbys of the new leader (pg_rewind), commits
synchronous again. Writes flow meanwhile; that part failing fails nothing (the rejoin policy,
on the standby probe's incident, tries again)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from pgcluster.nodes import NodeState, NodeView, leader_of
from remediation import facts, pg_ops
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params
from remediation.executors.base import ExecutorError, Unreachable
from remediation.facts import FactsConflict

logger = logging.getLogger(__name__)


class FailoverParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=2)  # executor component -> superuser DSN
    # How long a node may take to say what it is: a hung one costs this, twice (precheck and
    # execute), on the path of every failover.
    observe_timeout_s: float = Field(default=1.0, gt=0)
    # The precheck looks again within this budget while no node leads and no standby
    # answers, each look waiting longer: on a busy machine a standby may take seconds to say
    # what it is, and one missed look must not decline the only way back.
    precheck_budget_s: float = Field(default=3.0, gt=0)
    require_synchronous: bool = True
    promote_timeout_s: float = Field(default=30, gt=0)
    # A standby that heard from its primary within this long witnesses that the primary lives
    # (it is cut off from the control plane only): no failover while one does. Asked only
    # when no node refused (a refusal is a dead server: no witness is waited for).
    primary_heard_within_s: float = Field(default=3.0, gt=0)
    # With commits synchronous, a node whose host cannot be reached (no SSH) and that does
    # not answer is promoted past unfenced: it can acknowledge no commit without the standby
    # being promoted. Without that guarantee, an unreached fence blocks the promotion.
    promote_past_unreachable: bool = True
    # Rejoin the fenced nodes and restore synchronous commits right after the promotion.
    rejoin: bool = True
    rejoin_timeout_s: float = Field(default=120, gt=0)


def params_of(ctx: ActionContext) -> FailoverParams:
    return parse_params(FailoverParams, ctx, "failover")


# The precheck's look is good enough for the execute that follows it at once: a hung node
# costs a look's whole timeout, and a node that woke in between is fenced all the same.
FRESH_S = 1.0


class Failover(Action):
    kind = "failover"
    needs = frozenset({"executor"})
    Params = FailoverParams

    def __init__(self) -> None:
        self._seen: tuple[float, list[NodeView]] | None = None

    def _views(self, p: FailoverParams, *, reuse: bool = False) -> list[NodeView]:
        if reuse and self._seen and time.monotonic() - self._seen[0] < FRESH_S:
            return self._seen[1]
        views = pg_ops.views(p.nodes, p.observe_timeout_s)
        self._seen = (time.monotonic(), views)
        return views

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = FailoverParams.model_validate(dict(params))
        nodes = ", ".join(sorted(p.nodes))
        steps = [
            f"look at {nodes} (each within {p.observe_timeout_s:g} s); a node that leads: "
            "nothing to do",
            "fence every node that is not a standby: every process of it killed, verified "
            "gone; one still writable after it stops the run",
        ]
        if p.require_synchronous:
            steps.append("promote only if the standby was synchronous up to the failure")
        steps += [
            f"promote the streaming standby (within {p.promote_timeout_s:g} s); commits are "
            "asynchronous until a standby is back",
        ]
        if p.rejoin:
            steps.append(
                f"rejoin the fenced node as a standby of the new leader (pg_rewind, within "
                f"{p.rejoin_timeout_s:g} s) and make commits synchronous again"
            )
        steps.append("write outage: about one promotion; no acknowledged commit is lost")
        return steps

    def precheck(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        views = pg_ops.views_until(
            p.nodes,
            lambda found: (
                leader_of(found) is not None or any(v.state is NodeState.STANDBY for v in found)
            ),
            timeout_s=p.observe_timeout_s,
            budget_s=p.precheck_budget_s,
        )
        self._seen = (time.monotonic(), views)
        leader = leader_of(views)
        if leader is not None:
            return Check.nothing_to_do(f"{leader.name} accepts writes: nothing to fail over")
        if sum(v.state is NodeState.PRIMARY for v in views) > 1:
            return Check.never("several writable nodes on one timeline: a human must choose")
        standbys = [v for v in views if v.state is NodeState.STANDBY]
        if not standbys:
            return Check.not_now("no standby answers: nothing to promote yet")
        witness = primary_witness(views, p.primary_heard_within_s)
        if witness is not None:
            return Check.not_now(witness)
        synchronous = ctx.facts.read().synchronous
        if p.require_synchronous and synchronous is not True:
            return Check.never(
                "commits were not known synchronous when the primary failed: promoting "
                "could lose acknowledged orders; an operator must decide",
            )
        down = ", ".join(f"{v.name} {v.state}" for v in views if v.state is not NodeState.STANDBY)
        return Check.go(f"no primary ({down}); {standbys[0].name} can be promoted")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = params_of(ctx)
        views = self._views(p, reuse=True)
        leader = leader_of(views)
        if leader is not None:  # a retry after the promotion went through
            return Outcome(f"{leader.name} leads already", {"leader": leader.name})
        witness = primary_witness(views, p.primary_heard_within_s)
        if witness is not None:  # looked at again since the precheck: it lives after all
            raise ActionError(f"not promoting: {witness}")
        laps = pg_ops.Laps()
        seen = ctx.facts.read()  # what the promotion is decided on: changed meanwhile, no go
        if p.require_synchronous and seen.synchronous is not True:
            raise ActionError(
                "commits are no longer known synchronous: not promoting", permanent=True
            )
        fenced = [v.name for v in views if v.state is not NodeState.STANDBY]
        unreached: dict[str, str] = {}  # promoted past, unfenced: name -> why
        for view in views:
            if view.state is not NodeState.STANDBY:
                try:
                    pg_ops.fence(ctx.executor, view)  # the executor verifies: no process left
                except ActionError as exc:
                    if not promotes_past(p, seen.synchronous, view, exc):
                        raise
                    unreached[view.name] = str(exc.__cause__)
        # Whatever the executor: a fenced node still taking writes is no fence. Promote nothing.
        still = [
            v.name
            for v in pg_ops.views({n: p.nodes[n] for n in fenced}, p.observe_timeout_s)
            if v.state is NodeState.PRIMARY
        ]
        if still:
            raise ActionError(
                f"{', '.join(still)} still accepts writes after its fence: not promoting",
                permanent=True,
            )
        standbys = sorted(
            (v for v in views if v.state is NodeState.STANDBY),
            key=lambda v: v.receiving != "streaming",
        )
        if not standbys:
            raise ActionError("no standby left to promote", permanent=True)
        new = standbys[0]
        for name, why in unreached.items():
            laps.lap(
                f"{name} not fenced, its host unreached ({why}): promoted past it, as commits "
                "were synchronous (it can acknowledge none without the new leader)"
            )
        laps.lap(f"fenced {', '.join(n for n in fenced if n not in unreached) or 'none'}")
        try:  # alone now: commits are local (compare-and-set on what was decided on)
            seen = ctx.facts.change(seen, synchronous=False)
        except FactsConflict as exc:
            raise ActionError(
                f"the cluster's facts changed meanwhile: not promoting ({exc})"
            ) from exc
        pg_ops.promote(new, p.nodes[new.name], p.promote_timeout_s, laps)
        timeline = pg_ops.views({new.name: p.nodes[new.name]}, p.observe_timeout_s)[0].timeline
        # The others are to be rejoined as standbys.
        facts.promoted(ctx.facts, seen, new.name, fenced, timeline, "failover")
        promoted = str(laps)
        if not p.rejoin:
            return Outcome(
                f"{promoted}; commits are asynchronous until a standby rejoins",
                {
                    "leader": new.name,
                    "fenced": fenced,
                    "unreached": unreached,
                    "synchronous": False,
                },
            )
        steps, synchronous = self._rejoin(ctx, p, new.name, fenced)
        return Outcome(
            "; ".join([promoted, *steps]),
            {
                "leader": new.name,
                "fenced": fenced,
                "unreached": unreached,
                "synchronous": synchronous,
                "steps": steps,
            },
        )

    @staticmethod
    def _rejoin(
        ctx: ActionContext, p: FailoverParams, leader_name: str, fenced: list[str]
    ) -> tuple[list[str], bool]:
        """The fenced nodes rejoined and commits synchronous again, or why not (the rejoin
        policy's to finish). Returns the steps and whether commits are synchronous."""
        steps: list[str] = []
        try:
            leader = pg_ops.views({leader_name: p.nodes[leader_name]}, p.observe_timeout_s)[0]
            if leader.state is not NodeState.PRIMARY:
                raise ActionError(f"{leader_name} does not answer as the primary: {leader.detail}")
            for name in fenced:
                how = pg_ops.rejoin(
                    ctx.executor, name, leader, p.nodes, timeout_s=p.rejoin_timeout_s
                )
                steps.append(f"{name} rejoined ({how})")
            pg_ops.restore_sync(ctx.facts, leader_name, p.nodes[leader_name], p.rejoin_timeout_s)
        except (ActionError, psycopg.Error) as exc:
            logger.warning("rejoin after the failover to %s failed: %s", leader_name, exc)
            try:  # a synchronous setting whose standby never came would hold every commit
                pg_ops.degrade_to_async(ctx.facts, p.nodes[leader_name])
            except (ActionError, psycopg.Error, ExecutorError, FactsConflict) as again:
                logger.warning("%s not made asynchronous again: %s", leader_name, again)
            steps.append(f"commits asynchronous, rejoin left to the rejoin policy: {exc}")
            return steps, False
        steps.append(f"{leader_name} synchronous again")
        return steps, True

    def verify(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes, p.observe_timeout_s))
        if leader is None:
            return Check(False, "no leader yet")
        try:
            pg_ops.commit_a_write(p.nodes[leader.name])
        except (ActionError, psycopg.Error) as exc:
            return Check(False, f"a write on {leader.name} failed: {exc}")
        return Check(True, f"{leader.name} leads and commits writes")


def primary_witness(views: list[NodeView], within_s: float) -> str | None:
    """Why not to fail over yet, if a standby still hears from its primary (which then lives,
    cut off from the control plane only); None when none does, or when every node that is
    not a standby refused (dead: no witness is waited for)."""
    others = [v for v in views if v.state is not NodeState.STANDBY]
    if others and all(v.state is NodeState.REFUSED for v in others):
        return None
    for v in views:
        if (
            v.state is NodeState.STANDBY
            and v.receiving == "streaming"
            and v.heard_s_ago is not None
            and v.heard_s_ago < within_s
        ):
            return (
                f"{v.name} heard from its primary {v.heard_s_ago:.1f} s ago: the primary lives, "
                "cut off from the control plane only"
            )
    return None


def promotes_past(
    p: FailoverParams, synchronous: bool | None, view: NodeView, exc: ActionError
) -> bool:
    """May the failover promote past `view`, whose fence could not reach its host? Only with
    commits synchronous up to the failure (so it can acknowledge none alone), and only for a
    node that does not answer either (one that answers is reached, and fenced)."""
    return (
        isinstance(exc.__cause__, Unreachable)
        and p.promote_past_unreachable
        and p.require_synchronous
        and synchronous is True
        and view.state is NodeState.UNANSWERED
    )
