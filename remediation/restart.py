"""Restart: start a dead (or unresponsive) service instance again through the executor."""

from __future__ import annotations

from remediation.base import Action, ActionContext, ActionError, Check, Outcome
from remediation.executors.base import ExecutorError


class Restart(Action):
    kind = "restart"

    def precheck(self, ctx: ActionContext) -> Check:
        if ctx.component is None:
            return Check(False, f"{ctx.target} has no process the executor knows")
        health = ctx.is_healthy()
        if health.ok:
            return Check(False, f"{ctx.target} is healthy again: nothing to do")
        return Check(True, f"{ctx.target} still unhealthy ({health.reason})")

    def execute(self, ctx: ActionContext) -> Outcome:
        assert ctx.component is not None
        try:
            pid = ctx.executor.restart(ctx.component)
        except ExecutorError as exc:
            raise ActionError(str(exc)) from exc
        return Outcome(f"{ctx.component} started again (pid {pid})", {"pid": pid})
