"""The JSON API: health, incidents, actions (requests and approvals), silences."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel

from controlplane import services
from web import shared_reads
from web.auth import bearer_token, control_plane
from web.body import has_body, json_object, validated
from web.login import csrf, require
from web.openapi import (
    AcceptedOut,
    ActionsQuery,
    BackupsOut,
    ExpiredOut,
    HealthOut,
    IncidentDetailOut,
    IncidentsOut,
    IncidentsQuery,
    PrimaryOut,
    PrimaryQuery,
    RunDetailOut,
    RunsOut,
    SilenceOut,
    document,
    documented,
)

api = Blueprint("api", __name__)
M = TypeVar("M", bound=BaseModel)
PUBLIC = frozenset({"alerts.receive", "api.openapi", "api.database_primary"})


@api.before_request
def authenticate() -> None:
    """A bearer token (the generated one, or a named one), or a dashboard session: then a
    mutating call must carry the page's CSRF token (X-CSRFToken), as a form does."""
    if request.endpoint in PUBLIC:
        return
    require(services.Role.VIEWER)
    if request.method not in ("GET", "HEAD") and bearer_token() is None:
        csrf.protect()


def actor() -> str:
    """Who the audit log names: the user, or `token:<name>`; never a generic "api"."""
    return require(services.Role.OPERATOR).actor


def parse(model: type[M]) -> M:
    return validated(model, json_object())


def query(model: type[M]) -> M:
    """The query string, by the model the document describes it with (each key once)."""
    return validated(model, request.args.to_dict())


@api.get("/health")
@documented(200, HealthOut, errors=(401,))
def health() -> Response:
    """Health per service and overall"""
    return jsonify(shared_reads.health(control_plane()))


@api.get("/incidents")
@documented(200, IncidentsOut, query=IncidentsQuery)
def incidents() -> Response:
    """Incidents, newest first"""
    q = query(IncidentsQuery)
    return jsonify(incidents=services.list_incidents(control_plane(), q.state, q.limit))


@api.get("/incidents/<id:incident_id>")
@documented(200, IncidentDetailOut)
def incident(incident_id: int) -> Response:
    """One incident with its timeline and runs"""
    return jsonify(services.get_incident(control_plane(), incident_id))


@api.get("/actions")
@documented(200, RunsOut, query=ActionsQuery)
def actions() -> Response:
    """Action runs, newest first"""
    q = query(ActionsQuery)
    return jsonify(actions=services.list_actions(control_plane(), q.action, q.limit))


@api.get("/backups")
@documented(200, BackupsOut)
def backups() -> Response:
    """The backup catalog with drill results"""
    return jsonify(backups=services.list_backups(control_plane()))


@api.post("/actions")
@documented(202, AcceptedOut, body=services.ActionRequestIn)
def request_action() -> tuple[Response, int]:
    """Request an action (an intent: the loop runs it)"""
    run_id = services.request_action(control_plane(), parse(services.ActionRequestIn), actor())
    return jsonify(id=run_id, state="pending"), 202


@api.get("/actions/<id:run_id>")
@documented(200, RunDetailOut)
def action(run_id: int) -> Response:
    """One run with its audit"""
    return jsonify(services.get_action(control_plane(), run_id))


@api.post("/actions/<id:run_id>/approve")
@documented(202, AcceptedOut)
def approve(run_id: int) -> tuple[Response, int]:
    """Approve a run awaiting approval"""
    services.approve_action(control_plane(), run_id, actor())
    return jsonify(id=run_id, state="pending"), 202


@api.post("/actions/<id:run_id>/reject")
@documented(200, AcceptedOut, body=services.RejectIn, body_required=False)
def reject(run_id: int) -> tuple[Response, int]:
    """Reject a run awaiting approval"""
    body = parse(services.RejectIn) if has_body() else services.RejectIn()
    services.reject_action(control_plane(), run_id, actor(), body.comment)
    return jsonify(id=run_id, state="rejected"), 200


@api.post("/silences")
@documented(201, SilenceOut, body=services.SilenceIn)
def silence() -> tuple[Response, int]:
    """Silence matching incidents for a while"""
    created: dict[str, Any] = services.create_silence(
        control_plane(), parse(services.SilenceIn), actor()
    )
    return jsonify(created), 201


@api.delete("/silences/<id:silence_id>")
@documented(200, ExpiredOut)
def unsilence(silence_id: int) -> tuple[Response, int]:
    """Expire a silence"""
    services.expire_silence(control_plane(), silence_id, actor())
    return jsonify(id=silence_id, expired=True), 200


@api.get("/openapi.json")
def openapi() -> Response:
    return jsonify(document())


@api.get("/health/database/primary")
@documented(200, PrimaryOut, query=PrimaryQuery, errors=(400,), also=((503, PrimaryOut),),
            auth="none")  # fmt: skip
def database_primary() -> tuple[Response, int]:
    """200 only where a writable primary is (for load balancers, Patroni's GET /primary)

    With `node`: 200 only if that node is the writable primary, for a load balancer that asks
    about each of its backends. A primary silent within its grace is not writable: 503."""
    ok, body = services.views.primary_health(control_plane(), query(PrimaryQuery).node)
    return jsonify(body), 200 if ok else 503
