"""What the web layer may call: read state, and write intents (alerts, action requests,
approvals, silences) for the loop to act on. Nothing here runs a remediation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from prometheus_client import generate_latest
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from controlplane import accounts as accounts  # re-exported for web: users and API tokens
from controlplane import store
from controlplane import timeseries as timeseries  # re-exported for web: the charts' data
from controlplane import views as views  # re-exported for web: what the dashboard reads
from controlplane.accounts import Principal as Principal
from controlplane.backups import catalog_rows
from controlplane.errors import Conflict, InvalidRequest, NotFound
from controlplane.logsafe import printable
from controlplane.models import ActionRun, ActionState, Incident, IncidentState
from controlplane.models import Role as Role  # re-exported for web
from controlplane.runtime import ControlPlane as ControlPlane  # re-exported for web
from probes.base import Health
from remediation.base import operator_params
from remediation.registry import ACTIONS, UnknownAction, action_class

# What comes from outside is bounded. Strings are text that can be stored and logged: valid
# Unicode (no lone surrogates), no NUL.
MAX_ID = 2**63 - 1  # the state store's integer ids


def is_storable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text


Storable = AfterValidator(is_storable)
Name = Annotated[str, StringConstraints(min_length=1, max_length=100), Storable]
Line = Annotated[str, StringConstraints(max_length=1000), Storable]
Paragraph = Annotated[str, StringConstraints(max_length=10_000), Storable]
LabelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")]


def in_utc(at: datetime) -> datetime:
    """An aware time, in UTC (the store keeps UTC); one that cannot be is refused."""
    try:
        return at.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range") from None


# -- Alertmanager webhook (version 4) ------------------------------------------------------------
class AlertIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: str = Field(pattern="^(firing|resolved)$")
    labels: dict[LabelName, Line] = Field(max_length=64)
    annotations: dict[LabelName, Paragraph] = Field(default_factory=dict, max_length=32)
    startsAt: AwareDatetime  # a time without a zone is refused: whose time would it be?
    endsAt: AwareDatetime | None = None
    fingerprint: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")

    @field_validator("startsAt", "endsAt")
    @classmethod
    def _utc(cls, at: datetime | None) -> datetime | None:
        return None if at is None else in_utc(at)


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: str = Field(pattern="^4$")
    status: str = Field(pattern="^(firing|resolved)$")
    receiver: Line
    alerts: list[AlertIn] = Field(min_length=1, max_length=1000)


def receive_alerts(cp: ControlPlane, payload: WebhookIn) -> dict[str, int]:
    """Record each alert's latest status by fingerprint (a repeat only counts), wake the loop.
    One statement for the whole delivery: a flood holds the write lock briefly per post."""
    now = cp.clock()
    rows = [
        {
            "fingerprint": alert.fingerprint,
            "alertname": alert.labels.get("alertname", "unnamed"),
            "status": alert.status,
            "labels": alert.labels,
            "annotations": alert.annotations,
            "starts_at": alert.startsAt,
            "ends_at": alert.endsAt if alert.endsAt and alert.endsAt.year > 1 else None,
        }
        for alert in payload.alerts
    ]
    store.with_retries(lambda: _upsert_alerts(cp, rows, now), what=f"record {len(rows)} alerts")
    for alert in payload.alerts:
        cp.metrics.alerts_received.labels(alert.status).inc()
    cp.wake()
    return {"accepted": len(payload.alerts)}


def _upsert_alerts(cp: ControlPlane, rows: list[dict[str, Any]], now: datetime) -> None:
    with store.transaction(cp.factory) as s:
        store.upsert_alerts(s, rows, now)


# -- reading ------------------------------------------------------------------------------------
def incident_json(i: Incident) -> dict[str, Any]:
    def iso(at: datetime | None) -> str | None:
        return at.isoformat() if at else None

    return {
        "id": i.id,
        "fingerprint": i.fingerprint,
        "kind": i.kind,
        "source": i.source,
        "target": i.target,
        "severity": i.severity,
        "state": i.state,
        "summary": i.summary,
        "labels": i.labels,
        "flapping": i.flapping,
        "detected_at": iso(i.detected_at),
        "opened_at": iso(i.opened_at),
        "action_started_at": iso(i.action_started_at),
        "recovered_at": iso(i.recovered_at),
        "resolved_at": iso(i.resolved_at),
        "escalated_at": iso(i.escalated_at),
    }


def run_json(r: ActionRun) -> dict[str, Any]:
    return {
        "id": r.id,
        "incident_id": r.incident_id,
        "action": r.action,
        "target": r.target,
        "mode": r.mode,
        "state": r.state,
        "requested_by": r.requested_by,
        "reason": r.reason,
        "attempts": r.attempts,
        "try_number": r.try_number,
        "retry": r.retry,
        "output": r.output,
        "created_at": r.created_at.isoformat(),
        "started_at": r.started_at.isoformat() if r.started_at else None,
        "finished_at": r.finished_at.isoformat() if r.finished_at else None,
    }


def list_incidents(cp: ControlPlane, state: str | None, limit: int) -> list[dict[str, Any]]:
    with store.read(cp.factory) as s:
        return [incident_json(i) for i in store.list_incidents(s, state=state, limit=limit)]


def get_incident(cp: ControlPlane, incident_id: int) -> dict[str, Any]:
    with store.read(cp.factory) as s:
        incident = s.get(Incident, incident_id)
        if incident is None:
            raise NotFound(f"incident {incident_id} does not exist")
        body = incident_json(incident)
        body["timeline"] = [
            {"at": e.at.isoformat(), "kind": e.kind, "message": e.message, "data": e.data}
            for e in store.incident_timeline(s, incident_id)
        ]
        body["actions"] = [
            run_json(r) for r in store.list_runs(s, incident_id=incident_id, limit=50)
        ]
    return body


def list_actions(cp: ControlPlane, action: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest action runs first, optionally of one action kind."""
    if action is not None and not action.isprintable():
        # A NUL or a control character names no action (and PostgreSQL refuses a NUL).
        raise InvalidRequest("action must be an action's name (printable text)")
    with store.read(cp.factory) as s:
        return [
            run_json(r) for r in store.list_runs(s, incident_id=None, limit=limit, action=action)
        ]


def list_backups(cp: ControlPlane) -> list[dict[str, Any]]:
    """The backup catalog, newest first, with each backup's last drill."""
    return catalog_rows(cp.factory)


def get_action(cp: ControlPlane, run_id: int) -> dict[str, Any]:
    with store.read(cp.factory) as s:
        run = s.get(ActionRun, run_id)
        if run is None:
            raise NotFound(f"action run {run_id} does not exist")
        body = run_json(run)
        body["audit"] = [
            {
                "at": a.at.isoformat(),
                "actor": a.actor,
                "verb": a.verb,
                "message": a.message,
                "data": a.data,
                "duration_ms": a.duration_ms,
            }
            for a in store.audit_of_run(s, run_id)
        ]
    return body


def health_summary(cp: ControlPlane) -> dict[str, Any]:
    """Per service: the worst latest probe result and its open incidents; overall: the worst."""
    # UNKNOWN (a probe that could not look) ranks below UP: it never hides a known state.
    order = [Health.UNKNOWN, Health.UP, Health.DEGRADED, Health.DOWN]
    with store.read(cp.factory) as s:
        services: dict[str, dict[str, Any]] = {
            svc.name: {"status": "unknown", "probes": {}, "open_incidents": []}
            for svc in cp.settings.services
        }
        for spec in cp.settings.probes:
            runs = store.recent_probe_runs(s, spec.name, 1)
            if not runs:
                continue
            entry = services[spec.service]
            entry["probes"][spec.name] = {
                "health": runs[0].health,
                "summary": runs[0].summary,
                "latency_ms": runs[0].latency_ms,
                "at": runs[0].at.isoformat(),
            }
            current = entry["status"]
            health = Health(runs[0].health)
            if current == "unknown" or order.index(health) > order.index(Health(current)):
                entry["status"] = health.value
        for incident in store.open_incidents(s):
            if incident.target in services:
                services[incident.target]["open_incidents"].append(incident.id)
    # Healing that did not work, said in one line each: on its service, and all together.
    escalated = views.escalations(cp)
    for entry in services.values():
        entry["attention"] = None
    for found in escalated:
        service = services.get(found["target"])
        if service is not None and service["attention"] is None:
            service["attention"] = found["line"]
    statuses = [v["status"] for v in services.values() if v["status"] != "unknown"]
    overall = max(statuses, key=lambda h: order.index(Health(h))) if statuses else "unknown"
    return {
        "status": overall,
        "attention": [found["line"] for found in escalated],
        "services": services,
    }


def readiness(cp: ControlPlane) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {"scheduler": cp.scheduler.running, "leader": cp.loop.is_leader}
    try:
        with store.read(cp.factory) as s:
            store.lease_holder(s, "leader")
        checks["state_store"] = True
    except Exception as exc:  # readiness reports any store failure, it never raises
        checks["state_store"] = False
        checks["error"] = type(exc).__name__
    last = cp.loop.last_cycle_at
    fresh = last is not None and cp.clock() - last < timedelta(
        seconds=max(10, 5 * cp.settings.loop_interval_s)
    )
    checks["loop_recent"] = fresh
    return bool(checks["state_store"] and checks["scheduler"] and fresh), checks


def metrics_text(cp: ControlPlane) -> bytes:
    return generate_latest(cp.metrics.registry)


# -- intents ------------------------------------------------------------------------------------
class ActionRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Name
    target: Name
    reason: Line = Field(min_length=1)
    # Strict: a JSON `true` is no incident id (it read as incident 1).
    incident_id: int | None = Field(default=None, ge=1, le=MAX_ID, strict=True)
    # Only what the action declares an operator may supply (its OperatorParams): checked in
    # request_action against the policy the run will use.
    params: dict[Name, Any] = Field(default_factory=dict, max_length=20)


def next_try(s: Any, incident_id: int | None, action: str) -> int:
    """An operator's run for an incident is its next try (an escalated incident's policy
    tried and gave up: the operator takes over). A try in flight, or one that succeeded,
    is a conflict: never two at once, never one after a success."""
    if incident_id is None:
        return 1
    tried = [r for r in store.runs_of_incidents(s, [incident_id]) if r.action == action]
    busy = (ActionState.PENDING, ActionState.RUNNING, ActionState.AWAITING_APPROVAL)
    if any(r.state in (*busy, ActionState.SUCCEEDED) for r in tried):
        raise Conflict(f"{action} was already requested for incident {incident_id}")
    return max((r.try_number for r in tried), default=0) + 1


def request_action(cp: ControlPlane, body: ActionRequestIn, who: str) -> int:
    """An operator's request: a pending run for the loop to start (202 with its id). Its
    params are only those the action lets an operator supply; the rest is the policy's."""
    if body.action not in ACTIONS:
        raise InvalidRequest(f"unknown action {body.action!r} (known: {sorted(ACTIONS)})")
    if cp.settings.service(body.target) is None:
        raise InvalidRequest(f"unknown target {body.target!r}")
    policy = cp.settings.policy_for_request(body.action, body.target)
    if policy is None:
        raise InvalidRequest(
            f"no policy lets {body.action} act on {body.target}: an operator may ask only for "
            "what a policy of the targets file allows"
        )
    try:
        supplied = operator_params(action_class(body.action), body.params, policy.params)
    except UnknownAction as exc:
        raise InvalidRequest(str(exc)) from None
    except ValidationError as exc:
        raise InvalidRequest(
            f"params refused for {body.action}: " + validation_errors(exc.errors(), "params")
        ) from None
    now = cp.clock()
    with store.transaction(cp.factory) as s:
        if body.incident_id is not None:
            incident = s.get(Incident, body.incident_id)
            if incident is None:
                raise NotFound(f"incident {body.incident_id} does not exist")
            if incident.state != IncidentState.OPEN:
                # Never an action on what is over (as an approval): and the run would hold
                # that incident's slot for its action, and date a restore's point by it.
                raise Conflict(f"incident {incident.id} is {incident.state}: no action on it")
        try_number = next_try(s, body.incident_id, body.action)
        run = store.create_action_run(
            s,
            incident_id=body.incident_id,
            action=body.action,
            target=body.target,
            mode="auto",
            state=ActionState.PENDING,
            requested_by=who,
            reason=body.reason,
            params={"policy": policy.name, "params": supplied},
            created_at=now,
            try_number=try_number,
        )
        if run is None:
            raise Conflict(f"{body.action} was already requested for incident {body.incident_id}")
        store.audit(
            s,
            actor=who,
            verb="request",
            at=now,
            action_run_id=run.id,
            incident_id=body.incident_id,
            message=f"{body.action} on {body.target}: {body.reason}",
            data={"params": supplied, "target": body.target},
        )
        run_id = run.id
    cp.wake()
    return run_id


def approve_action(cp: ControlPlane, run_id: int, who: str) -> None:
    now = cp.clock()
    with store.transaction(cp.factory) as s:
        run = s.get(ActionRun, run_id)
        if run is None:
            raise NotFound(f"action run {run_id} does not exist")
        incident = s.get(Incident, run.incident_id) if run.incident_id is not None else None
        if incident is not None and incident.state != IncidentState.OPEN:
            raise Conflict(f"incident {incident.id} is {incident.state}: nothing to approve")
        if not store.change_run_state(
            s, run_id, ActionState.AWAITING_APPROVAL, ActionState.PENDING
        ):
            raise Conflict(f"action run {run_id} is not awaiting approval")
        store.audit(s, actor=who, verb="approve", at=now, action_run_id=run_id, message="approved")
    cp.wake()


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: Line = ""


def reject_action(cp: ControlPlane, run_id: int, who: str, comment: str = "") -> None:
    """An operator's no to a run awaiting approval: it ends rejected, and never runs."""
    now = cp.clock()
    with store.transaction(cp.factory) as s:
        run = s.get(ActionRun, run_id)
        if run is None:
            raise NotFound(f"action run {run_id} does not exist")
        if not store.change_run_state(
            s,
            run_id,
            ActionState.AWAITING_APPROVAL,
            ActionState.REJECTED,
            finished_at=now,
            output={"rejected": comment or "rejected", "by": who},
        ):
            raise Conflict(f"action run {run_id} is not awaiting approval")
        store.audit(
            s, actor=who, verb="reject", at=now, action_run_id=run_id, message=comment or "rejected"
        )
        if run.incident_id is not None:
            store.add_timeline(
                s,
                run.incident_id,
                "action",
                f"{run.action} rejected by {who}",
                now,
                {"run": run_id},
            )
    cp.wake()


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A value each: an empty one would mean "label absent" in Alertmanager and "matches
    # nothing" here. Neither is what a silence should do unasked: refused (400).
    matchers: dict[LabelName, Annotated[Line, StringConstraints(min_length=1)]] = Field(
        min_length=1, max_length=32
    )
    # Strict: a JSON `true` is no 1 s silence, nor "60" a number.
    duration_s: float = Field(gt=0, le=7 * 24 * 3600, strict=True, allow_inf_nan=False)
    comment: Line = ""


def create_silence(cp: ControlPlane, body: SilenceIn, who: str) -> dict[str, Any]:
    now = cp.clock()
    with store.transaction(cp.factory) as s:
        silence = store.create_silence(
            s,
            matchers=body.matchers,
            starts_at=now,
            ends_at=now + timedelta(seconds=body.duration_s),
            created_by=who,
            comment=body.comment,
        )
        store.audit(
            s,
            actor=who,
            verb="silence",
            at=now,
            message=f"silence {silence.id}",
            data={"matchers": body.matchers, "duration_s": body.duration_s},
        )
        return {
            "id": silence.id,
            "matchers": silence.matchers,
            "ends_at": silence.ends_at.isoformat(),
        }


def expire_silence(cp: ControlPlane, silence_id: int, who: str) -> None:
    now = cp.clock()
    with store.transaction(cp.factory) as s:
        if not store.expire_silence(s, silence_id, now):
            raise NotFound(f"no active silence {silence_id}")
        store.audit(s, actor=who, verb="unsilence", at=now, message=f"silence {silence_id}")


def validation_errors(errors: Sequence[Mapping[str, Any]], prefix: str = "") -> str:
    """Each error with the field it is about (`params.nodes: Extra inputs are not permitted`);
    never the refused value itself, which may be huge or hostile."""

    def where(e: Mapping[str, Any]) -> str:
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        return printable(loc, limit=200) or "body"

    return "; ".join(f"{where(e)}: {e['msg']}" for e in errors[:10])
