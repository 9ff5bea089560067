"""The API against its own OpenAPI document, in process (a SQLite state store, NoExecutor, the
loop not running): schemathesis generates requests from the document and checks that nothing
answers 5xx and every status, content type and body is the one documented."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from controlplane import store
from controlplane.config import Settings
from controlplane.models import ActionState
from controlplane.runtime import ControlPlane
from lab.layout import find_free_base_port
from remediation.executors.none import NoExecutor
from web import api_app, create_app
from web.openapi import IncidentDetailOut, RunDetailOut, document

API_TOKEN = "generated-token"
WEBHOOK_TOKEN = "webhook-token"
PRIMARY = "/api/v1/health/database/primary"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane with an open incident and a run awaiting approval, so that reads of
    ids 1.. find something and approve/reject meet a real state change."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path_factory.mktemp('openapi') / 'state.db'}",
        instance_id="cp-test",
        api_token=API_TOKEN,
        webhook_token=WEBHOOK_TOKEN,
        services=[{"name": "svc", "component": "svc"}],
        probes=[
            {"name": "svc-tcp", "kind": "tcp", "service": "svc", "interval_s": 1,
             "timeout_s": 0.5, "failures_to_open": 1, "params": {"port": find_free_base_port()}}
        ],
        policies=[
            {"name": "fix-svc", "source": "probe", "match": {"service": "svc"},
             "action": "restart", "mode": "approval", "max_attempts": 1}
        ],
    )  # fmt: skip
    plane = ControlPlane(settings, executor=NoExecutor(), action_backoff_s=0.01)
    plane.run_probe(settings.probes[0])
    plane.loop.run_cycle()
    with store.read(plane.factory) as s:
        assert store.runs_in_state(s, ActionState.AWAITING_APPROVAL)
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def app(cp: ControlPlane) -> Flask:
    return create_app(control_plane=cp)


# The document is built from the API's views on an app of their own (no control plane needed
# at collection time); the first test checks that it is the one the app serves.
# (schemathesis' `from_fixture` does not run under pytest 9.)
schema = schemathesis.openapi.from_dict(document(api_app()))


def test_the_app_serves_the_document_the_check_runs_against(app: Flask) -> None:
    response = app.test_client().get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert response.json == document(api_app())


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_answers_as_its_document_says(app: Flask, case: schemathesis.Case) -> None:
    # The webhook takes Alertmanager's token, everything else the API token.
    token = WEBHOOK_TOKEN if case.operation.path == "/api/v1/alerts" else API_TOKEN
    checks = CHECKS
    if case.operation.path == PRIMARY:
        # Its 503 ("no writable primary here") is the answer load balancers read, documented
        # with its own body; the other checks still hold it to that document.
        checks = [c for c in CHECKS if c is not not_a_server_error]
    case.call_and_validate(app=app, headers={"Authorization": f"Bearer {token}"}, checks=checks)


def test_an_incident_and_a_run_that_exist_match_their_documented_bodies(app: Flask) -> None:
    # Random ids mostly miss; these two reach the rows the fixture made (timeline, audit).
    client = app.test_client()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    incident = client.get("/api/v1/incidents/1", headers=auth)
    run = client.get("/api/v1/actions/1", headers=auth)
    assert incident.status_code == run.status_code == 200
    assert IncidentDetailOut.model_validate(incident.json).timeline
    assert RunDetailOut.model_validate(run.json).audit


def test_every_api_route_the_app_serves_is_in_the_document_and_nothing_else(app: Flask) -> None:
    # spectree documents only the views it decorates: an API view left undecorated is missing.
    served: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.rule == "/api/v1/openapi.json":
            continue
        path = "/api/v1/" + rule.rule.removeprefix("/api/v1/").replace("<id:", "{").replace(
            ">", "}"
        )
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            served.add((method.lower(), path))
    documented = {(m, p) for p, ops in document(api_app())["paths"].items() for m in ops}
    assert served == documented
