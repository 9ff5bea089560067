"""GET /api/v1/openapi.json: the OpenAPI 3.1 document, generated from one registry of routes
and the pydantic models the API validates requests with (and describes responses by)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, cast

from flask import Flask, current_app
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from spectree import Response as Documented
from spectree import SecurityScheme, SpecTree

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
    # Healing that did not work on this service, in one line (held, unsafe, or late).
    attention: str | None


class HealthOut(BaseModel):
    status: str
    # One line per escalated open incident: "no writable primary for 47 s; failover tried
    # 3 times, last: no standby answers".
    attention: list[str]
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
    escalated_at: str | None  # when a human was told that healing did not work


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
    try_number: int  # which try of this action for its incident
    retry: bool  # it ended, and the incident's next try follows after a backoff
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


def _decimal(value: Any) -> Any:
    """A number in a query string as one writes it: `50`, not `0050`, ` 50 `, `5_0` or in
    another script's digits."""
    if isinstance(value, str) and not re.fullmatch(r"[1-9][0-9]{0,18}", value):
        raise ValueError("must be a whole number in ASCII digits, such as 50")
    return value


Limit = Annotated[int, Field(ge=1, le=500), BeforeValidator(_decimal)]


class IncidentsQuery(BaseModel):
    state: Literal["open", "resolved"] | None = None
    limit: Limit = 50


class PrimaryQuery(BaseModel):
    node: str | None = Field(default=None, min_length=1, max_length=100)


class ActionsQuery(BaseModel):
    action: str | None = Field(default=None, max_length=100)
    limit: Limit = 50


# The document is spectree's, built from the views it decorates (`documented`) and the same
# pydantic models the API validates bodies with. spectree does not validate here (the API's
# own parser answers bad input with its JSON 4xx, web/body.py): it only describes.
# The API's token (CP_API_TOKEN or a named one), and Alertmanager's (CP_WEBHOOK_TOKEN): each
# is refused where the other is asked for.
BEARER = SecurityScheme.parse_obj({"name": "bearer", "data": {"type": "http", "scheme": "bearer"}})
WEBHOOK = SecurityScheme.parse_obj(
    {"name": "webhook", "data": {"type": "http", "scheme": "bearer",
                                 "description": "the webhook token (CP_WEBHOOK_TOKEN)"}}
)  # fmt: skip
spec = SpecTree(
    "flask",
    mode="strict",  # only the decorated views are in it
    title="shopguard control plane",
    version="1",
    openapi_version="3.1.0",
    annotations=False,
    naming_strategy=lambda model: model.__name__,
    nested_naming_strategy=lambda _parent, child: child,
    security_schemes=[BEARER, WEBHOOK],
    security={"bearer": []},
    # What the API answers to input it refuses (web/body.py, services): spectree's default
    # (422 with its own body) is never sent.
    validation_error_status=400,
    validation_error_model=ErrorOut,
)

F = TypeVar("F", bound=Callable[..., Any])


def documented(
    ok: int,
    response: type[BaseModel],
    *,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (400, 401, 403, 404, 409),
    also: tuple[tuple[int, type[BaseModel]], ...] = (),
    auth: Literal["api", "webhook", "none"] = "api",
    body_required: bool = True,
) -> Callable[[F], F]:
    """A view's entry in the document: its answer `ok` with `response`, answers other than
    `ok` with a body of their own (`also`), and `errors` as ErrorOut. A body that is not JSON
    is a 415, one too large a 413 (web/body.py). Its summary is its docstring's first line."""
    codes: dict[str, type[BaseModel]] = {f"HTTP_{ok}": response}
    codes.update({f"HTTP_{code}": model for code, model in also})
    codes.update({f"HTTP_{code}": ErrorOut for code in errors + ((413, 415) if body else ())})
    validate = spec.validate(
        json=body,
        query=query,
        resp=Documented(**codes),
        skip_validation=True,
        security={"api": None, "webhook": {"webhook": []}, "none": {}}[auth],
    )

    def decorate(view: F) -> F:
        wrapped = validate(view)
        wrapped.body_optional = not body_required
        return cast(F, wrapped)

    return decorate


def parameter_of_id(param: dict[str, Any]) -> None:
    """A path id is what the `id` converter matches (web/body.py), which spectree does not
    know: anything else is a 404. Its example (1) is a row the first incident or run has."""
    param["schema"] = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
    param["example"] = 1
    param.pop("description", None)


def document(app: Flask | None = None) -> dict[str, Any]:
    """The OpenAPI document of `app` (default: the app serving the request; `web.api_app()`
    outside one, the API's views alone)."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    with app.app_context():
        doc: dict[str, Any] = copy.deepcopy(spec.spec)
        optional = {
            (re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule), method.lower())
            for rule in app.url_map.iter_rules()
            for method in rule.methods or ()
            if getattr(app.view_functions[rule.endpoint], "body_optional", False)
        }
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                if param["in"] == "path" and param.get("schema") is None:
                    parameter_of_id(param)
            if (path, method) in optional and "requestBody" in op:
                op["requestBody"]["required"] = False
    return doc
