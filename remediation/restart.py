"""Restart: start a dead (or unresponsive) service instance again through the executor.

With a `liveness_url` param (formatted with the service's labels, e.g.
`http://{instance}/healthz`), an instance whose process runs and answers it is left alone:
it is not ready because of a dependency (its database failing over), and a restart would
only add an outage of its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict, Field

from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params
from remediation.executors.base import ExecutorError


class RestartParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    liveness_url: str | None = Field(default=None, pattern=r"^https?://")
    liveness_timeout_s: float = Field(default=2, gt=0, le=30)


def is_alive(ctx: ActionContext) -> str | None:
    p = parse_params(RestartParams, ctx, "restart")
    if not p.liveness_url or ctx.component is None or not ctx.executor.is_running(ctx.component):
        return None
    try:
        url = p.liveness_url.format(**ctx.labels)
    except (KeyError, IndexError, ValueError) as exc:
        raise ActionError(f"liveness_url needs the label {exc}", permanent=True) from None
    try:
        response = requests.get(url, timeout=p.liveness_timeout_s)
    except requests.RequestException:
        return None
    return url if response.status_code == 200 else None


class Restart(Action):
    kind = "restart"
    needs = frozenset({"executor", "component"})
    may_start_over = True
    Params = RestartParams

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = RestartParams.model_validate(dict(params))
        steps = [f"check that {target} is still unhealthy (else: skipped, nothing done)"]
        if p.liveness_url:
            steps.append(
                f"leave it alone if its process runs and {p.liveness_url} answers within "
                f"{p.liveness_timeout_s:g} s (not ready because of a dependency)"
            )
        steps += [
            f"stop {target}: a clean stop, then SIGKILL of its whole process tree if it does "
            "not exit in time (a hung process is stopped too)",
            f"start {target} again and wait until its probes pass",
        ]
        return steps

    def precheck(self, ctx: ActionContext) -> Check:
        if ctx.component is None:
            return Check.never(f"{ctx.target} has no process the executor knows")
        health = ctx.is_healthy()
        if health.ok:
            return Check.nothing_to_do(f"{ctx.target} is healthy again: nothing to do")
        alive = is_alive(ctx)
        if alive:
            return Check.not_now(
                f"{ctx.target} is alive ({alive} answers) but not ready ({health.reason}): "
                "a dependency's fault, a restart would not help",
            )
        return Check.go(f"{ctx.target} still unhealthy ({health.reason})")

    def execute(self, ctx: ActionContext) -> Outcome:
        assert ctx.component is not None
        try:
            pid = ctx.executor.restart(ctx.component)
        except ExecutorError as exc:
            raise ActionError(str(exc)) from exc
        return Outcome(f"{ctx.component} started again (pid {pid})", {"pid": pid})
