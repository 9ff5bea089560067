"""What the operators' dashboard reads, assembled from the state store: the overview, an
incident's timeline and measured times, and a request's preview (read-only: nothing acts)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import psycopg
from pydantic import ValidationError
from sqlalchemy import func, select

from controlplane import store
from controlplane.incidents import escalation_line, lasting_since
from controlplane.loop import run_view
from controlplane.models import ActionRun, ActionState, Alert, AuditEntry, Incident
from probes.base import Health
from remediation.base import operator_params
from remediation.registry import ACTIONS, UnknownAction, action_class

if TYPE_CHECKING:
    from controlplane.runtime import ControlPlane

HISTORY = 200  # probe runs looked back through for the time of the last change


def iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _probe_state(s: Any, probe: str) -> dict[str, Any] | None:
    runs = store.recent_probe_runs(s, probe, HISTORY)
    if not runs:
        return None
    latest = runs[0]
    changed = runs[-1].at if len(runs) == HISTORY else None
    for newer, older in pairwise(runs):
        if older.health != latest.health:
            changed = newer.at
            break
    else:
        changed = changed or runs[-1].at
    return {
        "health": latest.health,
        "summary": latest.summary,
        "latency_ms": round(latest.latency_ms, 1),
        "at": iso(latest.at),
        "since": iso(changed),
        "details": latest.details,
    }


def _database_rows(probes: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per PostgreSQL node, as `patronictl list` draws it, from the standby probe."""
    looked = next(
        (p for p in probes.values() if p.get("kind") == "pg_standby" and p["details"].get("nodes")),
        None,
    )
    if looked is None:
        return []
    details = looked["details"]
    leader, sync = details.get("leader"), set(details.get("sync", []))
    rows = []
    for name, node in sorted(details["nodes"].items()):
        if name == leader:
            role = "Leader"
        elif name in sync:
            role = "Sync Standby"
        elif node.get("state") in ("standby", "replica"):
            role = "Replica"
        else:
            role = "—"
        up = node.get("state") not in ("refused", "unanswered")
        rows.append(
            {
                "node": name,
                "role": role,
                "state": node.get("state"),
                "receiving": node.get("receiving"),
                "timeline": node.get("timeline"),
                "lag_bytes": (details.get("lag_bytes") or {}).get(name),
                "sync": name in sync,
                "health": ("up" if role in ("Leader", "Sync Standby") else "degraded")
                if up
                else "down",
            }
        )
    return rows


def overview(cp: ControlPlane) -> dict[str, Any]:
    """Every service with its health and when it last changed, the database cluster's roles,
    the monitoring's pulse, open incidents, running runs and runs awaiting approval."""
    now = cp.clock()
    probes: dict[str, dict[str, Any]] = {}
    with store.read(cp.factory) as s:
        for spec in cp.settings.probes:
            state = _probe_state(s, spec.name)
            if state is not None:
                probes[spec.name] = {**state, "kind": spec.kind, "service": spec.service}
        incidents = store.list_incidents(s, state="open", limit=100)
        open_incidents = [
            {"id": i.id, "kind": i.kind, "target": i.target, "severity": i.severity,
             "summary": i.summary, "detected_at": iso(i.detected_at), "flapping": i.flapping}
            for i in incidents
        ]  # fmt: skip
        active = list(
            s.scalars(
                select(ActionRun)
                .where(
                    ActionRun.state.in_(
                        [ActionState.PENDING, ActionState.RUNNING, ActionState.AWAITING_APPROVAL]
                    )
                )
                .order_by(ActionRun.id.desc())
                .limit(100)
            )
        )
        runs = [
            {"id": r.id, "action": r.action, "target": r.target, "state": r.state,
             "incident_id": r.incident_id, "requested_by": r.requested_by, "reason": r.reason,
             "created_at": iso(r.created_at), "started_at": iso(r.started_at)}
            for r in active
        ]  # fmt: skip
        last_alert = s.scalar(select(func.max(Alert.received_at)))
    order = [Health.UNKNOWN, Health.UP, Health.DEGRADED, Health.DOWN]
    services = []
    for svc in cp.settings.services:
        mine = {n: p for n, p in probes.items() if p["service"] == svc.name}
        healths = [Health(p["health"]) for p in mine.values()]
        known = [h for h in healths if h is not Health.UNKNOWN]
        health = max(known, key=order.index).value if known else "unknown"
        since = max((p["since"] for p in mine.values() if p["since"]), default=None)
        services.append(
            {
                "name": svc.name,
                "health": health,
                "since": since,
                "probes": [
                    {
                        "name": n,
                        "health": p["health"],
                        "summary": p["summary"],
                        "latency_ms": p["latency_ms"],
                        "at": p["at"],
                        "since": p["since"],
                    }
                    for n, p in sorted(mine.items())
                ],
                "incidents": [i["id"] for i in open_incidents if i["target"] == svc.name],
            }
        )
    prom = [p for p in probes.values() if p["kind"] == "prometheus"]
    prom_health = (
        "unknown" if not prom else ("down" if all(p["health"] == "unknown" for p in prom) else "up")
    )
    # What the control plane knows of Prometheus and Alertmanager beyond their own probes: its
    # queries answering, and the last webhook delivery. A row of their own, or beside their
    # service's probes when the targets name one (never the same service twice).
    prom_since = max((p["since"] for p in prom if p["since"]), default=None)
    _beside(services, "prometheus", prom_health, prom_since,
            [{"name": "queries", "health": prom_health,
              "summary": "; ".join(p["summary"] for p in prom)[:300], "latency_ms": None,
              "at": max(p["at"] for p in prom), "since": None}] if prom else [])  # fmt: skip
    _beside(
        services,
        "alertmanager",
        "unknown",  # the control plane does not probe it: it hears from it
        iso(last_alert),
        [
            {
                "name": "webhook",
                "health": "unknown",
                "summary": "last webhook delivery" if last_alert else "no webhook yet",
                "latency_ms": None,
                "at": iso(last_alert),
                "since": None,
            }
        ],
    )
    last_cycle = cp.loop.last_cycle_at
    loop_ok = last_cycle is not None and now - last_cycle < timedelta(
        seconds=max(10, 5 * cp.settings.loop_interval_s)
    )
    overall_known = [Health(str(x["health"])) for x in services if x["health"] != "unknown"]
    return {
        "now": iso(now),
        "status": max(overall_known, key=order.index).value if overall_known else "unknown",
        "loop": {"ok": loop_ok, "last_cycle_at": iso(last_cycle), "leader": cp.loop.is_leader},
        "services": services,
        "database": _database_rows(probes),
        "incidents": open_incidents,
        "runs": [r for r in runs if r["state"] != ActionState.AWAITING_APPROVAL],
        "awaiting": [r for r in runs if r["state"] == ActionState.AWAITING_APPROVAL],
    }


def _beside(
    services: list[dict[str, Any]],
    name: str,
    health: str,
    since: str | None,
    rows: list[dict[str, Any]],
) -> None:
    """Add what the control plane hears of `name` to its service's row, or as a row of its
    own when no service is called that. An unknown health never hides a known one."""
    row = next((x for x in services if x["name"] == name), None)
    if row is None:
        services.append(
            {"name": name, "health": health, "since": since, "probes": rows, "incidents": []}
        )
        return
    row["probes"] = [*row["probes"], *rows]
    if row["health"] == "unknown":
        row["health"], row["since"] = health, since


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 1) if a and b and b >= a else None


def incident_story(cp: ControlPlane, incident_id: int, base: dict[str, Any]) -> dict[str, Any]:
    """`base` (services.get_incident) with a merged timeline (its events and every step of
    its runs, in time order) and its measured times to detect, act and recover."""
    with store.read(cp.factory) as s:
        incident = s.get(Incident, incident_id)
        assert incident is not None
        run_ids = [r["id"] for r in base["actions"]]
        audits = (
            list(
                s.scalars(
                    select(AuditEntry)
                    .where(AuditEntry.action_run_id.in_(run_ids))
                    .order_by(AuditEntry.id)
                )
            )
            if run_ids
            else []
        )
        first_failure = incident.detected_at
        times = {
            "detect_s": _seconds(first_failure, incident.opened_at),
            "act_s": _seconds(incident.opened_at, incident.action_started_at),
            "recover_s": _seconds(first_failure, incident.recovered_at or incident.resolved_at),
        }
    entries = [
        {"at": e["at"], "kind": e["kind"], "who": "control plane", "message": e["message"],
         "data": e["data"]}
        for e in base["timeline"]
    ]  # fmt: skip
    entries += [
        {"at": a.at.isoformat(), "kind": f"run {a.action_run_id}: {a.verb}", "who": a.actor,
         "message": a.message, "data": a.data, "duration_ms": a.duration_ms}
        for a in audits
    ]  # fmt: skip
    entries.sort(key=lambda e: str(e["at"]))
    return {**base, "story": entries, "times": times}


def describe_action(kind: str) -> str:
    return action_class(kind).summary()


def preview_request(
    cp: ControlPlane, action: str, target: str, params: Mapping[str, Any]
) -> dict[str, Any]:
    """What a request would do, read-only: the verdict of each check the loop makes before it
    starts a run (it re-checks them, live, when it does), and the action's steps."""
    checks: list[dict[str, Any]] = []

    def check(ok: bool, what: str) -> None:
        checks.append({"ok": ok, "check": what})

    known = action in ACTIONS
    check(known, f"action {action!r} is known" if known else f"unknown action {action!r}")
    service = cp.settings.service(target)
    check(service is not None, f"target {target!r} is a known service")
    if not known or service is None:
        return {"ok": False, "checks": checks, "steps": [], "policy": None}
    policy = cp.settings.policy_for_request(action, target)
    if policy is None:  # the request itself is refused (services.request_action): say so first
        check(False, f"no policy lets {action} act on {target}")
        return {"ok": False, "checks": checks, "steps": [], "policy": None}
    check(True, f"runs with the params and limits of policy {policy.name}")
    steps: list[str] = []
    try:
        supplied = operator_params(action_class(action), params, policy.params)
        check(True, f"operator params accepted: {supplied or 'none'}")
        steps = action_class(action).plan(target, {**policy.params, **supplied})
    except (UnknownAction, ValidationError) as exc:
        check(False, f"params refused: {str(exc).splitlines()[0]}")
    with store.read(cp.factory) as s:
        busy = s.scalars(
            select(ActionRun).where(
                ActionRun.target == target,
                ActionRun.state.in_([ActionState.PENDING, ActionState.RUNNING]),
            )
        ).first()
        check(
            busy is None,
            f"no other run on {target}"
            if busy is None
            else f"run {busy.id} ({busy.action}) is {busy.state} on {target}: this one waits",
        )
        for spec in cp.settings.probes:
            if spec.service != target:
                continue
            runs = store.recent_probe_runs(s, spec.name, 1)
            health = runs[0].health if runs else "unknown"
            summary = runs[0].summary if runs else "no result yet"
            check(True, f"probe {spec.name}: {health} ({summary})")
    return {
        "ok": all(c["ok"] for c in checks),
        "checks": checks,
        "steps": steps,
        "policy": policy.name if policy else None,
    }


def restore_preview(cp: ControlPlane, to: datetime) -> dict[str, Any]:
    """For a full restore to `to`: the backup it would start from (the newest finished
    before it) and how many orders written after it would be discarded (read-only)."""
    b = cp.settings.backups
    if b is None:
        return {"backup": None, "orders_after": None, "problem": "no backups are configured"}
    with store.read(cp.factory) as s:
        rows = store.list_backups(s)
    usable = [r for r in rows if r.finished_at is not None and r.finished_at < to]
    backup = max(usable, key=lambda r: r.finished_at or to) if usable else None
    lost: int | None = None
    problem = None if backup else f"no base backup finished before {to.isoformat()}"
    for dsn in b.nodes.values():
        try:
            with psycopg.connect(dsn, dbname=b.orders_db, connect_timeout=2) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone() != (False,):
                    continue
                row = conn.execute(
                    "SELECT count(*) FROM orders WHERE created_at > %s", (to,)
                ).fetchone()
                lost = int(row[0]) if row else 0
                break
        except psycopg.Error as exc:  # a node that does not answer: try the next, else say so
            problem = problem or f"cannot count the orders: {type(exc).__name__}"
    return {
        "backup": {
            "label": backup.label,
            "finished_at": iso(backup.finished_at),
            "verified_at": iso(backup.verified_at),
        }
        if backup
        else None,
        "orders_after": lost,
        "problem": problem,
    }


def silences(cp: ControlPlane) -> list[dict[str, Any]]:
    """The active silences, soonest ending first."""
    with store.read(cp.factory) as s:
        found = sorted(store.active_silences(s, cp.clock()), key=lambda x: x.ends_at)
        return [
            {"id": x.id, "matchers": x.matchers, "starts_at": iso(x.starts_at),
             "ends_at": iso(x.ends_at), "created_by": x.created_by, "comment": x.comment}
            for x in found
        ]  # fmt: skip


def audit_log(cp: ControlPlane, limit: int = 200) -> list[dict[str, Any]]:
    """The newest audit entries first: who did what, to which run."""
    with store.read(cp.factory) as s:
        rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
        return [
            {"at": iso(a.at), "actor": a.actor, "verb": a.verb, "run": a.action_run_id,
             "incident": a.incident_id, "message": a.message}
            for a in rows
        ]  # fmt: skip


MAX_ESCALATIONS_SHOWN = 20  # the banner and the health API: the oldest, then a count


def escalations(cp: ControlPlane, now: datetime | None = None) -> list[dict[str, Any]]:
    """The open incidents a human was told about (healing held, unsafe, or not done in
    time), each in one line: how long, what was tried, and how the last try ended. At most
    MAX_ESCALATIONS_SHOWN, the oldest first, then one line counting the rest (a flood of
    alerts must not make a page or a health answer megabytes long)."""
    now = now or datetime.now(UTC)
    with store.read(cp.factory) as s:
        escalated = sorted(store.escalated_incidents(s), key=lambda i: i.opened_at)
        more = escalated[MAX_ESCALATIONS_SHOWN:]
        escalated = escalated[:MAX_ESCALATIONS_SHOWN]
        runs = [run_view(r) for r in store.runs_of_incidents(s, [i.id for i in escalated])]
    found = []
    for incident in escalated:
        policy = cp.settings.policy(incident.policy) if incident.policy else None
        mine = sorted(
            (r for r in runs if r.incident_id == incident.id),
            key=lambda r: (r.created_at, r.try_number),
        )
        action = policy.action if policy else (mine[-1].action if mine else "no action")
        mine = [r for r in mine if r.action == action]
        found.append(
            {
                "incident": incident.id,
                "target": incident.target,
                "severity": incident.severity,
                "escalated_at": iso(incident.escalated_at),
                "line": escalation_line(
                    incident.summary,
                    lasting_since(incident),
                    now,
                    action,
                    mine,
                ),
            }
        )
    if more:
        found.append(
            {
                "incident": more[0].id,
                "target": "…",
                "severity": "",
                "escalated_at": iso(more[0].escalated_at),
                "line": f"and {len(more)} more escalated incident(s): see Incidents",
            }
        )
    return found


def awaiting_count(cp: ControlPlane) -> int:
    with store.read(cp.factory) as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(ActionRun)
                .where(ActionRun.state == ActionState.AWAITING_APPROVAL)
            )
            or 0
        )


def requestable(cp: ControlPlane) -> dict[str, Any]:
    """What an operator may ask for, and on which services."""
    return {
        "actions": sorted(ACTIONS),
        "targets": [s.name for s in cp.settings.services],
        "help": {kind: describe_action(kind) for kind in sorted(ACTIONS)},
    }


def primary_health(cp: ControlPlane, node: str | None = None) -> tuple[bool, dict[str, Any]]:
    """Patroni's `GET /primary`: is there a writable primary now, and which node is it. Only a
    fresh UP result of a `pg_primary` probe whose leader answered in that very look: a leader
    silent within its grace is no failover yet, but it takes no write either. With `node`,
    only that node leading (a load balancer asking about each of its backends)."""
    now = cp.clock()
    with store.read(cp.factory) as s:
        for spec in cp.settings.probes:
            if spec.kind != "pg_primary":
                continue
            runs = store.recent_probe_runs(s, spec.name, 1)
            if not runs:
                return False, {"primary": None, "reason": "no result yet"}
            run = runs[0]
            fresh = now - run.at < timedelta(seconds=max(3 * spec.interval_s, 5))
            leader = run.details.get("leader")
            answered = (run.details.get("nodes") or {}).get(leader, {}).get("state") == "primary"
            ok = fresh and run.health == Health.UP and answered
            reason = run.summary if fresh else f"stale: last result at {iso(run.at)}"
            if ok and node is not None and node != leader:
                ok, reason = False, f"{node} is not the primary ({leader} is)"
            return ok, {"primary": leader if ok else None, "reason": reason, "at": iso(run.at)}
    return False, {"primary": None, "reason": "no pg_primary probe is configured"}
