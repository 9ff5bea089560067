"""The JSON API: health, incidents, actions (requests and approvals), silences."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, ValidationError

from controlplane import services
from controlplane.errors import InvalidRequest
from web import shared_reads
from web.auth import bearer_token, control_plane
from web.body import json_object
from web.login import csrf, require
from web.openapi import document

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
    body = json_object()
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(services.validation_errors(exc.errors())) from None


def int_arg(name: str, default: int, high: int) -> int:
    try:
        value = int(request.args.get(name, default))
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None
    if not 1 <= value <= high:
        raise InvalidRequest(f"{name} must be between 1 and {high}")
    return value


@api.get("/health")
def health() -> Response:
    return jsonify(shared_reads.health(control_plane()))


@api.get("/incidents")
def incidents() -> Response:
    state = request.args.get("state")
    if state not in (None, "open", "resolved"):
        raise InvalidRequest("state must be open or resolved")
    found = services.list_incidents(control_plane(), state, int_arg("limit", 50, 500))
    return jsonify(incidents=found)


@api.get("/incidents/<id:incident_id>")
def incident(incident_id: int) -> Response:
    return jsonify(services.get_incident(control_plane(), incident_id))


@api.get("/actions")
def actions() -> Response:
    kind = request.args.get("action")
    if kind is not None and len(kind) > 100:
        raise InvalidRequest("action must be at most 100 characters")
    return jsonify(actions=services.list_actions(control_plane(), kind, int_arg("limit", 50, 500)))


@api.get("/backups")
def backups() -> Response:
    return jsonify(backups=services.list_backups(control_plane()))


@api.post("/actions")
def request_action() -> tuple[Response, int]:
    run_id = services.request_action(control_plane(), parse(services.ActionRequestIn), actor())
    return jsonify(id=run_id, state="pending"), 202


@api.get("/actions/<id:run_id>")
def action(run_id: int) -> Response:
    return jsonify(services.get_action(control_plane(), run_id))


@api.post("/actions/<id:run_id>/approve")
def approve(run_id: int) -> tuple[Response, int]:
    services.approve_action(control_plane(), run_id, actor())
    return jsonify(id=run_id, state="pending"), 202


@api.post("/actions/<id:run_id>/reject")
def reject(run_id: int) -> tuple[Response, int]:
    body = parse(services.RejectIn) if request.content_length else services.RejectIn()
    services.reject_action(control_plane(), run_id, actor(), body.comment)
    return jsonify(id=run_id, state="rejected"), 200


@api.post("/silences")
def silence() -> tuple[Response, int]:
    created: dict[str, Any] = services.create_silence(
        control_plane(), parse(services.SilenceIn), actor()
    )
    return jsonify(created), 201


@api.delete("/silences/<id:silence_id>")
def unsilence(silence_id: int) -> tuple[Response, int]:
    services.expire_silence(control_plane(), silence_id, actor())
    return jsonify(id=silence_id, expired=True), 200


@api.get("/openapi.json")
def openapi() -> Response:
    return jsonify(document())


@api.get("/health/database/primary")
def database_primary() -> tuple[Response, int]:
    """For load balancers: 200 only where a writable primary is."""
    ok, body = services.views.primary_health(control_plane())
    return jsonify(body), 200 if ok else 503
