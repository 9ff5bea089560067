"""The operators' dashboard: server-rendered pages, kept live by polling small JSON views.
Every button writes an intent through `services` (the loop acts); every form carries CSRF."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from flask import Blueprint, Response, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from controlplane import services
from controlplane.errors import InvalidRequest
from web import gamedays, shared_reads
from web.auth import control_plane
from web.body import validated
from web.charts import all_charts
from web.login import principal, require

dashboard = Blueprint("dashboard", __name__, url_prefix="/dashboard")
Role = services.Role


@dashboard.before_request
def logged_in() -> BaseResponse | None:
    if request.endpoint == "dashboard.plotly_js":
        return None
    if principal() is None:
        return redirect(url_for("login.form", next=request.full_path.rstrip("?")))
    return None


def field(name: str, limit: int = 1000) -> str:
    value = request.form.get(name, "")
    if len(value) > limit:
        raise InvalidRequest(f"{name} must be at most {limit} characters")
    return value.strip()


def as_json(data: Any) -> Response:
    response = Response(json.dumps(data, default=str), mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


# -- overview -------------------------------------------------------------------------------------
@dashboard.get("/")
def overview() -> str:
    return render_template("overview.html", page="overview")


@dashboard.get("/api/overview.json")
def overview_json() -> Response:
    return as_json(shared_reads.overview(control_plane()))


@dashboard.get("/api/badge.json")
def badge_json() -> Response:
    cp = control_plane()
    return as_json(
        {
            "awaiting": services.views.awaiting_count(cp),
            "escalations": services.views.escalations(cp),
        }
    )


@dashboard.get("/static/plotly.min.js")
def plotly_js() -> Response:
    """Plotly's JavaScript from the installed `plotly` package: no internet needed."""
    text = resources.files("plotly").joinpath("package_data/plotly.min.js").read_bytes()
    response = Response(text, mimetype="application/javascript")
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


# -- charts ---------------------------------------------------------------------------------------
@dashboard.get("/charts")
def charts() -> str:
    chosen = request.args.get("range", "1h")
    if chosen not in services.timeseries.RANGES_S:
        chosen = "1h"
    return render_template(
        "charts.html",
        page="charts",
        chosen=chosen,
        ranges=list(services.timeseries.RANGES_S),
        panels=chart_names(),
    )


def chart_names() -> list[str]:
    """Every figure charts.json draws: the Prometheus panels, then the replication lag (from
    the state store, beside them in `timeseries.series`)."""
    return [*services.timeseries.PANELS, "replication_lag"]


@dashboard.get("/api/charts.json")
def charts_json() -> Response | tuple[Response, int, dict[str, str]]:
    """Every panel's Plotly figure for the range, incidents and runs drawn over them: computed
    once per range per worker every few seconds, however many viewers poll it, and by a bounded
    number of threads (a quick 503 beyond, with Retry-After, when no earlier answer exists)."""
    cp = control_plane()
    chosen = request.args.get("range", "1h")
    if chosen not in services.timeseries.RANGES_S:
        raise InvalidRequest(f"range must be one of {', '.join(services.timeseries.RANGES_S)}")
    try:
        body = shared_reads.charts.get((cp, chosen), lambda: chart_figures(cp, chosen))
    except shared_reads.Busy as busy:
        response = as_json({"error": "the charts are being drawn for other viewers: retry"})
        return response, 503, {"Retry-After": str(busy.retry_after_s)}
    response = Response(body, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def chart_figures(cp: services.ControlPlane, chosen: str) -> bytes:
    """The body of charts.json: `{panel: figure}`, as JSON."""
    now = cp.clock()
    data = services.timeseries.series(cp, chosen, now)
    notes = services.timeseries.chart_notes(cp, chosen, now)
    start = now - timedelta(seconds=services.timeseries.RANGES_S[chosen])
    figures = all_charts(data, notes, (start.isoformat(), now.isoformat()))
    body = "{" + ",".join(f"{json.dumps(k)}:{f.to_json()}" for k, f in figures.items()) + "}"
    return body.encode()


# -- game days (web/gamedays.py) -----------------------------------------------------------------
dashboard.add_url_rule("/gamedays", "gamedays", gamedays.runs_page)
dashboard.add_url_rule("/gamedays/<run_id>", "gameday", gamedays.run_page)
dashboard.add_url_rule("/gamedays/<run_id>/report.json", "gameday_json", gamedays.report_json)


# -- incidents ------------------------------------------------------------------------------------
@dashboard.get("/incidents")
def incidents() -> str:
    state = request.args.get("state") or None
    if state not in (None, "open", "resolved"):
        raise InvalidRequest("state must be open or resolved")
    target = request.args.get("target", "")[:100]
    found = services.list_incidents(control_plane(), state, 500)
    if target:
        found = [i for i in found if target in (i["target"], i["kind"])]
    return render_template(
        "incidents.html", page="incidents", incidents=found, state=state or "", target=target
    )


@dashboard.get("/incidents/<id:incident_id>")
def incident(incident_id: int) -> str:
    cp = control_plane()
    story = services.views.incident_story(cp, incident_id, services.get_incident(cp, incident_id))
    return render_template("incident.html", page="incidents", incident=story)


# -- actions --------------------------------------------------------------------------------------
@dashboard.get("/actions")
def actions() -> str:
    cp = control_plane()
    kind = request.args.get("action") or None
    if kind is not None and len(kind) > 100:
        raise InvalidRequest("action must be at most 100 characters")
    return render_template(
        "actions.html",
        page="actions",
        runs=services.list_actions(cp, kind, 200),
        audit=services.views.audit_log(cp, 100),
        kind=kind or "",
        choices=services.views.requestable(cp),
        candidates=switchover_candidates(cp),
    )


def operator_policies(cp: services.ControlPlane, action: str) -> list[Any]:
    return [p for p in cp.settings.policies if p.source == "operator" and p.action == action]


def switchover_candidates(cp: services.ControlPlane) -> list[str]:
    """The nodes a switchover may go to: those of the operator's switchover policies."""
    nodes = {n for p in operator_policies(cp, "switchover") for n in p.params.get("nodes") or {}}
    return sorted(nodes)


@dashboard.get("/actions/<id:run_id>")
def action(run_id: int) -> str:
    run = services.get_action(control_plane(), run_id)
    return render_template("action.html", page="actions", run=run)


@dashboard.post("/actions/<id:run_id>/approve")
def approve(run_id: int) -> BaseResponse:
    who = require(Role.OPERATOR)
    services.approve_action(control_plane(), run_id, who.actor)
    return redirect(url_for("dashboard.action", run_id=run_id))


@dashboard.post("/actions/<id:run_id>/reject")
def reject(run_id: int) -> BaseResponse:
    who = require(Role.OPERATOR)
    services.reject_action(control_plane(), run_id, who.actor, field("comment"))
    return redirect(url_for("dashboard.action", run_id=run_id))


def request_form() -> tuple[services.ActionRequestIn, dict[str, Any]]:
    params: dict[str, Any] = {}
    if field("action", 100) == "restore":
        params["to"] = restore_point(field("to", 100)).isoformat()
    if field("full") == "yes":
        params["full"] = True
    loss = field("accept_loss", 20)
    if loss:
        try:
            params["accept_loss"] = int(loss)
        except ValueError:
            raise InvalidRequest("accept_loss must be a whole number") from None
    # The form offers a switchover's candidate beside every action: it counts for that one only.
    if field("candidate", 100) and field("action", 100) == "switchover":
        params["candidate"] = field("candidate", 100)
    if field("decision", 100):
        params["decision"] = field("decision", 100)
    incident = field("incident_id", 20)
    if incident and not (incident.isascii() and incident.isdigit()):
        # isdigit() alone takes a superscript two (which int() refuses) and Arabic-Indic digits
        raise InvalidRequest("incident_id must be a whole number (0-9)")
    body = validated(
        services.ActionRequestIn,
        {
            "action": field("action", 100),
            "target": field("target", 100),
            "reason": field("reason"),
            "incident_id": int(incident) if incident else None,
            "params": params,
        },
    )
    return body, params


def restore_point(typed: str) -> datetime:
    """A restore from the dashboard names its point, typed by the operator, so that the
    confirmation can show the backup it starts from and the orders it would discard. A time
    without a zone is UTC (the preview and the run must read it alike)."""
    if not typed:
        raise InvalidRequest("a restore needs the time to restore to: type it")
    try:
        to = datetime.fromisoformat(typed)
    except ValueError:
        raise InvalidRequest("to must be a time such as 2024-05-01T12:00:00+00:00") from None
    return to if to.tzinfo else to.replace(tzinfo=UTC)


@dashboard.post("/actions/preview")
def preview() -> str:
    """The confirmation: the precheck's verdict and what the run would do, before it runs."""
    require(Role.OPERATOR)
    cp = control_plane()
    body, params = request_form()
    verdict = services.views.preview_request(cp, body.action, body.target, params)
    restore = None
    if body.action == "restore":
        restore = services.views.restore_preview(cp, datetime.fromisoformat(params["to"]))
    return render_template(
        "preview.html", page="actions", body=body, params=params, verdict=verdict, restore=restore
    )


@dashboard.post("/actions/request")
def request_action() -> BaseResponse:
    who = require(Role.OPERATOR)
    body, _ = request_form()
    if field("confirm") != body.target:
        raise InvalidRequest(f"type the target's name ({body.target}) to confirm")
    run_id = services.request_action(control_plane(), body, who.actor)
    return redirect(url_for("dashboard.action", run_id=run_id))


# -- backups and silences -------------------------------------------------------------------------
@dashboard.get("/backups")
def backups() -> str:
    cp = control_plane()
    return render_template(
        "backups.html",
        page="backups",
        backups=services.list_backups(cp),
        can_start=bool(backup_targets(cp)),
    )


def backup_targets(cp: services.ControlPlane) -> list[str]:
    """Where "Start a backup" goes: the target of the operator's `backup` policy."""
    return [t for p in operator_policies(cp, "backup") if (t := p.match.get("target"))]


@dashboard.post("/backups/start")
def start_backup() -> BaseResponse:
    """An intent, as any request: a `backup` run (base backup, verify, drill) for the loop."""
    who = require(Role.OPERATOR)
    cp = control_plane()
    targets = backup_targets(cp)
    if not targets:
        raise InvalidRequest("no operator policy runs a backup: see the targets file")
    body = validated(
        services.ActionRequestIn,
        {
            "action": "backup",
            "target": targets[0],
            "reason": field("reason") or "operator: backup from the dashboard",
        },
    )
    run_id = services.request_action(cp, body, who.actor)
    return redirect(url_for("dashboard.action", run_id=run_id))


@dashboard.get("/silences")
def silences() -> str:
    return render_template(
        "silences.html", page="silences", silences=services.views.silences(control_plane())
    )


@dashboard.post("/silences")
def silence() -> BaseResponse:
    who = require(Role.OPERATOR)
    matchers: dict[str, str] = {}
    for line in field("matchers", 2000).splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            raise InvalidRequest("matchers are lines of label=value")
        if name.strip() in matchers:
            raise InvalidRequest(f"label {name.strip()[:100]!r} is matched twice: once each")
        matchers[name.strip()] = value.strip()
    try:
        minutes = float(field("duration_min", 20))
    except ValueError:
        raise InvalidRequest("the duration is a number of minutes") from None
    if not math.isfinite(minutes):
        raise InvalidRequest("the duration is a number of minutes")
    body = validated(
        services.SilenceIn,
        {"matchers": matchers, "duration_s": minutes * 60, "comment": field("comment")},
    )
    if not body.comment:
        raise InvalidRequest("a silence needs a reason")
    services.create_silence(control_plane(), body, who.actor)
    return redirect(url_for("dashboard.silences"))


@dashboard.post("/silences/<id:silence_id>/expire")
def expire(silence_id: int) -> BaseResponse:
    who = require(Role.OPERATOR)
    services.expire_silence(control_plane(), silence_id, who.actor)
    return redirect(url_for("dashboard.silences"))


# -- administration -------------------------------------------------------------------------------
@dashboard.get("/admin")
def admin() -> str:
    require(Role.ADMIN)
    cp = control_plane()
    return render_template(
        "admin.html",
        page="admin",
        users=services.accounts.list_users(cp.factory),
        tokens=services.accounts.list_tokens(cp.factory),
        new_token=None,
    )


@dashboard.post("/admin/users")
def add_user() -> BaseResponse:
    who = require(Role.ADMIN)
    cp = control_plane()
    password = request.form.get("password", "")  # as typed: the login does not strip it
    if len(password) > 1000:
        raise InvalidRequest("password must be at most 1000 characters")
    services.accounts.add_user(
        cp.factory, field("name", 100), field("role", 20), password, cp.clock(), who=who.actor
    )
    return redirect(url_for("dashboard.admin"))


@dashboard.post("/admin/users/disable")
def disable_user() -> BaseResponse:
    """Disable (or, with enable=yes, enable) a user: its logins fail, its sessions end."""
    who = require(Role.ADMIN)
    cp = control_plane()
    services.accounts.set_disabled(
        cp.factory, field("name", 100), field("enable") != "yes", who.actor, cp.clock()
    )
    return redirect(url_for("dashboard.admin"))


@dashboard.post("/admin/tokens")
def add_token() -> str:
    who = require(Role.ADMIN)
    cp = control_plane()
    token = services.accounts.create_token(
        cp.factory, field("name", 100), field("role", 20), who.actor, cp.clock()
    )
    return render_template(
        "admin.html",
        page="admin",
        users=services.accounts.list_users(cp.factory),
        tokens=services.accounts.list_tokens(cp.factory),
        new_token={"name": field("name", 100), "token": token},
    )


@dashboard.post("/admin/tokens/revoke")
def revoke_token() -> BaseResponse:
    who = require(Role.ADMIN)
    cp = control_plane()
    services.accounts.revoke_token(cp.factory, field("name", 100), who.actor, cp.clock())
    return redirect(url_for("dashboard.admin"))
