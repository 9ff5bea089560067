"""GET /api/v1/openapi.json: the OpenAPI 3.1 document, generated from one registry of routes
and the pydantic models the API validates requests with (and describes responses by)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from controlplane import services
from web.body import MAX_ID


class ErrorOut(BaseModel):
    error: str


class AcceptedOut(BaseModel):
    id: int
    state: str


class ProbeOut(BaseModel):
    health: str
    summary: str
    latency_ms: float
    at: str


class ServiceHealthOut(BaseModel):
    status: str
    probes: dict[str, ProbeOut]
    open_incidents: list[int]


class HealthOut(BaseModel):
    status: str
    services: dict[str, ServiceHealthOut]


class PrimaryOut(BaseModel):
    primary: str | None
    reason: str
    at: str | None = None


class IncidentOut(BaseModel):
    # Every field the API sends is declared: an undeclared one fails the schemathesis check.
    model_config = ConfigDict(extra="forbid")

    id: int
    fingerprint: str
    kind: str
    source: str
    target: str
    severity: str
    state: str
    summary: str
    labels: dict[str, Any]
    flapping: bool
    detected_at: str | None
    opened_at: str | None
    action_started_at: str | None
    recovered_at: str | None
    resolved_at: str | None


class IncidentsOut(BaseModel):
    incidents: list[IncidentOut]


class RunOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int
    incident_id: int | None
    action: str
    target: str
    mode: str
    state: str
    requested_by: str
    reason: str
    attempts: int
    output: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None


class RunsOut(BaseModel):
    actions: list[RunOut]


class TimelineEntryOut(BaseModel):
    at: str
    kind: str
    message: str
    data: dict[str, Any]


class IncidentDetailOut(IncidentOut):
    timeline: list[TimelineEntryOut]
    actions: list[RunOut]


class AuditEntryOut(BaseModel):
    at: str
    actor: str
    verb: str
    message: str
    data: dict[str, Any]
    duration_ms: float | None


class RunDetailOut(RunOut):
    audit: list[AuditEntryOut]


class BackupOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    label: str
    started_at: str
    finished_at: str | None
    size_bytes: int | None
    checksum: str | None
    verified_at: str | None


class BackupsOut(BaseModel):
    backups: list[BackupOut]


class SilenceOut(BaseModel):
    id: int
    matchers: dict[str, str]
    ends_at: str


class ExpiredOut(BaseModel):
    id: int
    expired: bool


class AlertsAcceptedOut(BaseModel):
    accepted: int


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    ok: int
    response: type[BaseModel]
    body: type[BaseModel] | None = None
    public: bool = False
    params: tuple[tuple[str, str, str], ...] = ()  # (name, in, type)
    errors: tuple[int, ...] = field(default=(400, 401, 403, 404, 409))
    # Answers other than `ok` that carry a body of their own rather than ErrorOut.
    also: tuple[tuple[int, type[BaseModel]], ...] = ()
    body_required: bool = True

    def error_codes(self) -> tuple[int, ...]:
        """A body that is not JSON is a 415, one too large a 413 (web/body.py)."""
        return self.errors + ((413, 415) if self.body is not None else ())


ROUTES = (
    Route("get", "/health", "Health per service and overall", 200, HealthOut, errors=(401,)),
    Route("get", "/health/database/primary", "200 only where a writable primary is (for load "
          "balancers, Patroni's GET /primary)", 200, PrimaryOut, public=True, errors=(),
          also=((503, PrimaryOut),)),
    Route("get", "/incidents", "Incidents, newest first", 200, IncidentsOut,
          params=(("state", "query", "string"), ("limit", "query", "integer"))),
    Route("get", "/incidents/{incident_id}", "One incident with its timeline and runs", 200,
          IncidentDetailOut, params=(("incident_id", "path", "integer"),)),
    Route("get", "/actions", "Action runs, newest first", 200, RunsOut,
          params=(("action", "query", "string"), ("limit", "query", "integer"))),
    Route("post", "/actions", "Request an action (an intent: the loop runs it)", 202,
          AcceptedOut, body=services.ActionRequestIn),
    Route("get", "/actions/{run_id}", "One run with its audit", 200, RunDetailOut,
          params=(("run_id", "path", "integer"),)),
    Route("post", "/actions/{run_id}/approve", "Approve a run awaiting approval", 202,
          AcceptedOut, params=(("run_id", "path", "integer"),)),
    Route("post", "/actions/{run_id}/reject", "Reject a run awaiting approval", 200,
          AcceptedOut, body=services.RejectIn, body_required=False,
          params=(("run_id", "path", "integer"),)),
    Route("get", "/backups", "The backup catalog with drill results", 200, BackupsOut),
    Route("post", "/silences", "Silence matching incidents for a while", 201, SilenceOut,
          body=services.SilenceIn),
    Route("delete", "/silences/{silence_id}", "Expire a silence", 200, ExpiredOut,
          params=(("silence_id", "path", "integer"),)),
    Route("post", "/alerts", "Alertmanager's webhook (v4), with the webhook token", 200,
          AlertsAcceptedOut, body=services.WebhookIn, errors=(400, 401, 429)),
)  # fmt: skip


def parameter(name: str, where: str, kind: str) -> dict[str, Any]:
    if where != "path":
        return {"name": name, "in": where, "required": False, "schema": {"type": kind}}
    # A path id is what the `id` converter matches (web/body.py): anything else is a 404.
    # Its example (1) is a row the first incident or run has, so a check reaches a real one.
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": kind, "minimum": 1, "maximum": MAX_ID},
        "example": 1,
    }


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"content": {"application/json": {"schema": ref(ErrorOut)}}}
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.method + re.sub(r"[^A-Za-z0-9]+", "_", r.path).rstrip("_"),
            "responses": {
                str(r.ok): {
                    "description": "OK",
                    "content": {"application/json": {"schema": ref(r.response)}},
                },
                **{
                    str(code): {
                        "description": "not OK",
                        "content": {"application/json": {"schema": ref(model)}},
                    }
                    for code, model in r.also
                },
                **{str(code): {"description": "error", **error} for code in r.error_codes()},
            },
            "parameters": [parameter(*p) for p in r.params],
        }
        if r.body is not None:
            op["requestBody"] = {
                "required": r.body_required,
                "content": {"application/json": {"schema": ref(r.body)}},
            }
        if r.public:
            op["security"] = []
        paths.setdefault("/api/v1" + r.path, {})[r.method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "shopguard control plane", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
