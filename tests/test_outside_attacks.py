"""Attacks from outside that the trust-boundary tests did not cover: odd input on the dashboard's
forms, an action asked for on what is over, unaudited administration, text PostgreSQL cannot
hold, and clients that make the shop mint metric series or look slow. In process where the web
layer alone is at stake; on the real lab stack where a real server is."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from controlplane import accounts, services, store
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.models import ActionRun, AuditEntry, Incident, IncidentState
from controlplane.runtime import ControlPlane
from lab.stack import Stack
from remediation.executors.none import NoExecutor
from tests.test_dashboard import app as app  # fixtures, as they are there
from tests.test_dashboard import awaiting_run, csrf_of, logged_in
from tests.test_dashboard import cp as cp
from web import create_app

GENERATED = {"Authorization": "Bearer generated-token"}


def runs_of(plane: ControlPlane) -> list[ActionRun]:
    with store.read(plane.factory) as s:
        return store.list_runs(s, incident_id=None, limit=50)


# -- the dashboard's forms ------------------------------------------------------------------------
@pytest.mark.parametrize("incident", ["\u00b2", "\u0661", "1x", "-1"])
def test_a_request_form_with_an_incident_that_is_no_plain_number_is_a_400_writing_nothing(
    app: Flask, cp: ControlPlane, incident: str
) -> None:
    otto = logged_in(app, "otto")
    form = {"csrf_token": csrf_of(otto, "/dashboard/"), "action": "restart", "target": "svc",
            "reason": "stuck", "confirm": "svc", "incident_id": incident}  # fmt: skip
    for path in ("/dashboard/actions/preview", "/dashboard/actions/request"):
        response = otto.post(path, data=form)
        assert response.status_code == 400, (path, response.status_code)
        assert "incident_id" in response.text
    assert runs_of(cp) == []


def test_the_dashboard_s_own_json_views_answer_a_bad_request_in_json(app: Flask) -> None:
    response = logged_in(app, "vera").get("/dashboard/api/charts.json?range=1h%00")
    assert response.status_code == 400 and response.is_json and "range" in response.json["error"]


def test_adding_a_user_is_audited_with_the_admin_who_added_it(app: Flask, cp: ControlPlane) -> None:
    admin = logged_in(app, "admin", "admin-password")
    form = {"csrf_token": csrf_of(admin, "/dashboard/admin"), "name": "mallory",
            "role": "admin", "password": "  spaces count  "}  # fmt: skip
    assert admin.post("/dashboard/admin/users", data=form).status_code == 302
    with store.read(cp.factory) as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.verb == "user-add")).all()
        added = [(a.actor, a.data) for a in rows if a.data.get("user") == "mallory"]
    assert added == [("admin", {"user": "mallory", "role": "admin"})]
    # The password is kept as typed: the login does not strip it either.
    assert accounts.authenticate_user(cp.factory, "mallory", "  spaces count  ") is not None


def test_the_lab_admin_reset_from_the_configuration_is_audited(cp: ControlPlane) -> None:
    accounts.ensure_user(cp.factory, "admin", "admin", "admin-password", utcnow())
    accounts.ensure_user(cp.factory, "admin", "admin", "admin-password", utcnow())  # unchanged
    accounts.ensure_user(cp.factory, "admin", "admin", "another-password", utcnow())
    with store.read(cp.factory) as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.verb.like("user-%"))).all()
        found = [
            (a.verb, a.actor, a.data.get("changed")) for a in rows if a.data["user"] == "admin"
        ]
        assert found == [
            ("user-add", "config", None),
            ("user-update", "config", ["password"]),
        ]


# -- an action on what is over --------------------------------------------------------------------
def test_an_operator_request_on_a_resolved_incident_is_a_409_and_writes_nothing(
    app: Flask, cp: ControlPlane
) -> None:
    awaiting_run(cp)  # opens the probe's incident
    with store.transaction(cp.factory) as s:
        incident = s.scalars(select(Incident)).one()
        store.resolve_incidents(s, [incident.id], utcnow())
        incident_id = incident.id
    before = len(runs_of(cp))
    body = {"action": "restart", "target": "svc", "reason": "late", "incident_id": incident_id}
    response = app.test_client().post("/api/v1/actions", json=body, headers=GENERATED)
    assert response.status_code == 409 and "resolved" in response.json["error"]
    assert len(runs_of(cp)) == before
    with store.read(cp.factory) as s:
        assert s.get(Incident, incident_id).state == IncidentState.RESOLVED  # type: ignore[union-attr]


def test_a_silence_matcher_without_a_value_is_a_400_not_a_silence_of_nothing_or_everything(
    app: Flask, cp: ControlPlane
) -> None:
    body = {"matchers": {"alertname": "X", "team": ""}, "duration_s": 60, "comment": "night"}
    response = app.test_client().post("/api/v1/silences", json=body, headers=GENERATED)
    assert response.status_code == 400 and "team" in response.json["error"]
    assert services.views.silences(cp) == []


# -- text a PostgreSQL state store cannot hold ----------------------------------------------------
@pytest.fixture
def pg_app(stack: Stack) -> Iterator[tuple[Flask, ControlPlane]]:
    """The web app on a PostgreSQL state store (a fresh database on the lab's primary)."""
    name = f"cp_{uuid.uuid4().hex[:10]}"
    with stack.connect("pg0") as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = (
        f"postgresql+psycopg://postgres@127.0.0.1:{stack.layout.pg_port(0)}/{name}"
        f"?passfile={stack.pg_auth.passfile}"
    )
    settings = Settings(
        database_url=url, instance_id="cp-pg", api_token="generated-token",
        admin_password="admin-password",
    )  # fmt: skip
    plane = ControlPlane(settings, executor=NoExecutor())
    try:
        yield create_app(control_plane=plane), plane
    finally:
        plane.stop()
        with stack.connect("pg0") as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_a_nul_in_a_login_a_filter_or_a_token_name_is_a_4xx_on_a_postgresql_state_store(
    pg_app: tuple[Flask, ControlPlane],
) -> None:
    app, _ = pg_app
    client = app.test_client()
    listed = client.get("/api/v1/actions?action=fail%00over", headers=GENERATED)
    assert listed.status_code == 400 and "action" in listed.json["error"]
    login = {"username": "ad\x00min", "password": "admin-password", "csrf_token": csrf_of(client)}
    assert client.post("/login", data=login).status_code == 401
    admin = logged_in(app, "admin", "admin-password")
    form = {"csrf_token": csrf_of(admin, "/dashboard/admin"), "name": "bot\x00"}
    assert admin.post("/dashboard/admin/tokens/revoke", data=form).status_code == 404
    assert admin.get("/dashboard/actions?action=%00").status_code == 400


# -- the shop against clients that misbehave ------------------------------------------------------
def shop_series(shop: str, name: str) -> list[tuple[dict[str, str], float]]:
    text = requests.get(f"{shop}/metrics", timeout=10).text
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def send_raw(shop: str, data: bytes, timeout_s: float = 5) -> bytes:
    host, port = shop.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_client_inventing_http_methods_mints_no_new_metric_series(shops: list[str]) -> None:
    shop = shops[1]
    for i in range(40):
        method = "Q" + "".join(chr(ord("A") + int(d)) for d in f"{i:03d}")
        answer = send_raw(shop, f"{method} /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 405"), answer[:40]
    methods = {
        labels["method"] for labels, _ in shop_series(shop, "shop_request_duration_seconds_count")
    }
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods


def order_bucket(shop: str) -> tuple[float, float]:
    """(orders observed, of them within one second)."""
    count = sum(v for labels, v in shop_series(shop, "shop_request_duration_seconds_count")
                if labels["route"] == "/orders")  # fmt: skip
    fast = sum(v for labels, v in shop_series(shop, "shop_request_duration_seconds_bucket")
               if labels["route"] == "/orders" and labels["le"] == "1.0")  # fmt: skip
    return count, fast


def test_an_order_sent_slowly_is_served_and_not_counted_as_a_slow_request(
    shops: list[str], new_product: Any
) -> None:
    shop, product = shops[0], new_product(stock=5)
    body = f'{{"product_id": {product}, "quantity": 1, "customer": "slow", "address": "1 Rd"}}'
    head = (
        "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close"
        f"\r\nIdempotency-Key: slow-{uuid.uuid4()}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    count, fast = order_bucket(shop)
    host, port = shop.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        for at in range(0, len(body), 16):  # 1.5 s or more to send it all
            time.sleep(0.3)
            sock.sendall(body[at : at + 16].encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 201")
    assert order_bucket(shop) == (count + 1, fast + 1)  # the shop's own time: fast


def answers_beside_trickling_clients(url: str, request_line: bytes, path: str) -> None:
    """40 clients (more than the service's threads) each send `request_line` and then a
    header line now and then, never finishing; meanwhile `path` must keep answering 200 (a
    held thread each would leave it none: its 5 s timeout fails the test)."""
    host, port = url.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port)), timeout=5) for _ in range(40)]
    try:
        for sock in slow:
            sock.sendall(request_line + b"Host: x\r\n")
        for _ in range(6):
            for sock in slow:
                sock.sendall(b"X-Slow: 1\r\n")
            assert requests.get(f"{url}{path}", timeout=5).status_code == 200
            time.sleep(0.5)
    finally:
        for sock in slow:
            sock.close()


def test_clients_that_trickle_their_requests_never_keep_the_shop_from_answering(
    shops: list[str],
) -> None:
    answers_beside_trickling_clients(shops[0], b"GET /healthz HTTP/1.1\r\n", "/readyz")


def test_a_client_that_never_finishes_its_request_gets_a_408_and_is_closed(
    shops: list[str],
) -> None:
    answer = send_raw(shops[0], b"GET /healthz HTTP/1.1\r\nHost: x\r\n", timeout_s=20)
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def test_a_body_announced_beyond_the_limit_is_a_json_413_before_it_is_sent(
    shops: list[str],
) -> None:
    answer = send_raw(
        shops[0],
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n{",
    )
    assert answer.startswith(b"HTTP/1.1 413")
    assert "larger" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


@pytest.mark.parametrize(
    "field, value", [("quantity", "true"), ("quantity", '"1"'), ("product_id", "1.0")]
)
def test_a_json_value_of_the_wrong_type_is_a_400_not_an_order(
    shops: list[str], new_product: Any, ledger: Any, field: str, value: str
) -> None:
    product = new_product(stock=5)
    body = {"product_id": str(product), "quantity": "1", "customer": '"ann"', "address": '"1 Rd"'}
    body[field] = value if field == "quantity" else f"{product}.0"
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}"
    response = requests.post(
        f"{shops[0]}/orders", data=text, timeout=10,
        headers={"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())},
    )  # fmt: skip
    assert response.status_code == 400 and field in response.json()["error"], response.text
    assert ledger(product).order_count() == 0


# -- a policy acts where it says ------------------------------------------------------------------
@pytest.fixture
def two_services(tmp_path: Any) -> Iterator[tuple[Flask, ControlPlane]]:
    """A restart policy for `svc` only (a probe policy: it acts on its probe's service)."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        instance_id="cp-test",
        api_token="generated-token",
        services=[{"name": "svc", "component": "svc"}, {"name": "db", "component": "db"}],
        probes=[
            {"name": f"{name}-tcp", "kind": "tcp", "service": name, "interval_s": 1,
             "timeout_s": 0.5, "params": {"port": 9}}
            for name in ("svc", "db")
        ],
        policies=[
            {"name": "fix-svc", "source": "probe", "match": {"service": "svc"},
             "action": "restart"}
        ],
    )  # fmt: skip
    plane = ControlPlane(settings, executor=NoExecutor())
    yield create_app(control_plane=plane), plane
    plane.stop()


def test_an_operator_may_ask_only_for_an_action_a_policy_lets_act_on_that_target(
    two_services: tuple[Flask, ControlPlane],
) -> None:
    app, plane = two_services
    client = app.test_client()
    ask = {"action": "restart", "reason": "operator"}
    refused = client.post("/api/v1/actions", json={**ask, "target": "db"}, headers=GENERATED)
    assert refused.status_code == 400 and "no policy" in refused.json["error"]
    assert runs_of(plane) == []
    allowed = client.post("/api/v1/actions", json={**ask, "target": "svc"}, headers=GENERATED)
    assert allowed.status_code == 202
    [run] = runs_of(plane)
    assert (run.target, run.params["policy"]) == ("svc", "fix-svc")
    assert plane.settings.targets_of(plane.settings.policies[0]) == {"svc"}


def test_clients_that_trickle_their_requests_never_keep_the_control_plane_from_answering(
    stack: Stack,
) -> None:
    url = stack.describe()["components"]["controlplane"]["url"]
    answers_beside_trickling_clients(url, b"POST /api/v1/alerts HTTP/1.1\r\n", "/healthz")


def test_a_request_the_http_parser_refuses_is_answered_in_json_by_both_services(
    stack: Stack, shops: list[str]
) -> None:
    url = stack.describe()["components"]["controlplane"]["url"]
    bad = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x7fb\r\n\r\n",  # DEL in a header
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ]
    for base in (shops[0], url):
        host, port = base.removeprefix("http://").split(":")
        for request in bad:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), (base, request, answer)
            assert b"Content-Type: application/json" in head
            assert "error" in json.loads(body)
