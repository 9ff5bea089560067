"""The trust boundary, on the real lab stack: what comes from outside (alerts, bodies, ids,
headers) never makes the control plane act where it should not, never crashes either service,
writes nothing when refused, and never counts as a database outage."""

from __future__ import annotations

import json
import sqlite3
import string
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from lab.observe import StackView, cluster_facts
from lab.process import wait_until
from lab.stack import Stack
from shop.models import Order
from tests.test_controlplane import Api, webhook

BIG_ID = 2**63  # one past the state store's integers
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def api(stack: Stack) -> Api:
    return Api(stack)


@pytest.fixture(scope="module")
def shop(stack: Stack) -> str:
    url: str = stack.describe()["shop"]["instances"][0]
    return url


def alertmanager(stack: Stack) -> str:
    url: str = stack.describe()["components"]["alertmanager"]["url"]
    return url


def roles(stack: Stack) -> tuple[str | None, Any]:
    """Who leads, as the nodes answer and as the control plane's facts say."""
    known = cluster_facts(stack.layout.data_dir) or {}
    return StackView.of(stack.layout.data_dir).leader(), known.get("leader")


def runs_since(api: Api, since: datetime, action: str) -> list[dict[str, Any]]:
    return [
        r
        for r in api.get(f"/actions?action={action}&limit=500")["actions"]
        if datetime.fromisoformat(r["created_at"]) >= since
    ]


def db_errors(shop: str) -> float:
    text = requests.get(f"{shop}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "shop_db_errors"
        for s in family.samples
        if s.name.endswith("_total")
    )


def stored_alerts(stack: Stack, fingerprints: list[str]) -> int:
    path = stack.layout.data_dir / "controlplane" / "state.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
        marks = ",".join("?" * len(fingerprints))
        row = conn.execute(
            f"SELECT count(*) FROM alerts WHERE fingerprint IN ({marks})", fingerprints
        ).fetchone()
    return int(row[0])


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- 1. Alertmanager refuses an unauthenticated alert; an authenticated forged one acts on nothing
@pytest.fixture
def forged_alerts(stack: Stack) -> Iterator[list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    yield sent
    for alert in sent:  # resolved, so that Alertmanager stops sending them
        alert["endsAt"] = datetime.now(UTC).isoformat()
    if sent:
        requests.post(
            f"{alertmanager(stack)}/api/v2/alerts",
            json=sent,
            auth=stack.alertmanager_auth,
            timeout=10,
        )


def test_1_an_alert_asking_for_a_switchover_or_naming_a_probe_through_alertmanager_acts_on_nothing(
    stack: Stack, api: Api, forged_alerts: list[dict[str, Any]]
) -> None:
    before = roles(stack)
    since = datetime.now(UTC) - timedelta(seconds=1)
    name = f"Forged{uuid.uuid4().hex[:8]}"
    for labels in (
        {"alertname": name, "service": "shop-db-cluster", "request": "switchover"},
        {"alertname": name + "P", "service": "shop-db-cluster", "probe": "shop-db-primary"},
        {"alertname": name + "S", "service": "shop-db-cluster", "probe": "shop-db-standby"},
        {"alertname": name + "K", "kind": "shop-db-primary", "source": "probe", "target": "pg0"},
    ):
        forged_alerts.append(
            {
                "labels": labels,
                "annotations": {"summary": "forged"},
                "startsAt": datetime.now(UTC).isoformat(),
            }
        )
    # Whoever does not know Alertmanager's password cannot post an alert at all.
    refused = requests.post(f"{alertmanager(stack)}/api/v2/alerts", json=forged_alerts, timeout=10)
    assert refused.status_code == 401, refused.text
    # And one who does (or Prometheus, its only client) reaches no probe's policy: Alertmanager
    # forwards with the webhook token, and an alert's labels still name nothing.
    sent = requests.post(
        f"{alertmanager(stack)}/api/v2/alerts",
        json=forged_alerts,
        auth=stack.alertmanager_auth,
        timeout=10,
    )
    assert sent.status_code == 200, sent.text

    def opened() -> list[dict[str, Any]]:
        return [
            i
            for i in api.get("/incidents?state=open&limit=500")["incidents"]
            if i["kind"].startswith(name)
        ]

    wait_until(lambda: len(opened()) == 4, timeout_s=60, what="the forged alerts' incidents")
    api.wait_cycles(5)
    for incident in opened():
        assert incident["source"] == "alert"
        assert api.get(f"/incidents/{incident['id']}")["actions"] == []
    for action in ("switchover", "failover", "rejoin"):
        assert runs_since(api, since, action) == [], action
    assert roles(stack) == before


# -- 2. callers cannot replace a policy's params ------------------------------------------------
@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"action": "cache_flush", "target": "redis", "params": {"instances": ["http://x"]}},
         "params.instances"),
        ({"action": "cache_flush", "target": "redis", "params": {"admin_token": "t"}},
         "params.admin_token"),
        ({"action": "switchover", "target": "shop-db-cluster",
          "params": {"nodes": {"pg0": "host=elsewhere"}}}, "params.nodes"),
        ({"action": "switchover", "target": "shop-db-cluster", "params": {"candidate": "pg9"}},
         "params.candidate"),
        ({"action": "restart", "target": "shop-0",
          "params": {"liveness_url": "http://elsewhere/"}}, "params.liveness_url"),
        ({"action": "failover", "target": "shop-db-cluster",
          "params": {"require_synchronous": False}}, "params.require_synchronous"),
        ({"action": "restore", "target": "shop-db-cluster",
          "params": {"backups_dir": "/", "archive_dir": "/tmp"}}, "params.backups_dir"),
    ],
)  # fmt: skip
def test_2_an_operator_param_the_action_does_not_declare_is_a_400_naming_it_and_writes_nothing(
    api: Api, body: dict[str, Any], named: str
) -> None:
    reason = f"trust-{uuid.uuid4().hex}"
    before = len(api.get(f"/actions?action={body['action']}&limit=500")["actions"])
    response = api.post("/actions", {**body, "reason": reason})
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]
    runs = api.get(f"/actions?action={body['action']}&limit=500")["actions"]
    assert not any(r["reason"] == reason for r in runs)
    assert len(runs) >= before


# -- 5. big and odd bodies: 4xx JSON, nothing written ------------------------------------------
def test_5_a_body_beyond_the_size_limit_is_a_413(api: Api, stack: Stack) -> None:
    fingerprint = f"big-{uuid.uuid4().hex[:12]}"
    body = webhook("Huge", "resolved", fingerprint)
    body["alerts"][0]["annotations"]["summary"] = "x" * (5 * 1024 * 1024)
    response = api.alert(body)
    assert response.status_code == 413 and response.json()["error"]
    assert stored_alerts(stack, [fingerprint]) == 0


def test_5_deeply_nested_json_is_a_400_on_both_services(api: Api, shop: str) -> None:
    deep = '{"alerts": ' + nested(100_000) + "}"
    within_the_shops_limit = '{"customer": ' + nested(30_000) + "}"  # 60 kB < 64 kB
    json_headers = {"Content-Type": "application/json"}
    for url, headers in (
        (f"{api.url}/api/v1/alerts", {**api.hook, **json_headers}),
        (f"{api.url}/api/v1/silences", {**api.headers, **json_headers}),
        (f"{api.url}/api/v1/actions", {**api.headers, **json_headers}),
        (f"{shop}/orders", {"Idempotency-Key": uuid.uuid4().hex, **json_headers}),
    ):
        body = within_the_shops_limit if url.endswith("/orders") else deep
        response = requests.post(url, data=body, headers=headers, timeout=30)
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"]


def test_5_a_start_time_without_a_zone_and_a_lone_surrogate_are_400s(
    api: Api, stack: Stack
) -> None:
    naive = webhook("Naive", "firing", f"naive-{uuid.uuid4().hex[:12]}")
    naive["alerts"][0]["startsAt"] = "2026-11-24T20:35:09"
    surrogate = webhook("Lone", "firing", f"lone-{uuid.uuid4().hex[:12]}", odd="\ud800")
    for body in (naive, surrogate):
        response = api.alert(body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]
        assert stored_alerts(stack, [body["alerts"][0]["fingerprint"]]) == 0
    silence = api.post("/silences", {"matchers": {"a": "\ud800"}, "duration_s": 60})
    assert silence.status_code == 400


def test_5_too_many_or_too_large_labels_are_400s(api: Api, stack: Stack) -> None:
    many = webhook("Many", "firing", f"many-{uuid.uuid4().hex[:12]}")
    many["alerts"][0]["labels"].update({f"l{i}": "v" for i in range(100)})
    large = webhook("Large", "firing", f"large-{uuid.uuid4().hex[:12]}", big="v" * 5000)
    bad_name = webhook("BadName", "firing", f"bad-{uuid.uuid4().hex[:12]}")
    bad_name["alerts"][0]["labels"]["no such\nlabel"] = "v"
    for body in (many, large, bad_name):
        assert api.alert(body).status_code == 400
        assert stored_alerts(stack, [body["alerts"][0]["fingerprint"]]) == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/incidents/{BIG_ID}"),
        ("GET", f"/actions/{BIG_ID}"),
        ("POST", f"/actions/{BIG_ID}/approve"),
        ("DELETE", f"/silences/{BIG_ID}"),
        ("GET", "/incidents/99999999999999999999999999"),
        ("GET", "/actions/0"),
    ],
)
def test_5_ids_out_of_range_are_404s(api: Api, method: str, path: str) -> None:
    response = requests.request(method, f"{api.url}/api/v1{path}", headers=api.headers, timeout=10)
    assert response.status_code == 404, response.text
    assert response.json()["error"]


def test_5_an_incident_request_beyond_the_ids_is_a_400(api: Api) -> None:
    body = {"action": "cache_flush", "target": "redis", "reason": "x", "incident_id": BIG_ID}
    assert api.post("/actions", body).status_code == 400


def test_5_the_shop_refuses_odd_input_without_touching_the_database(
    shop: str, new_product: Any, engines: dict[str, Engine]
) -> None:
    product = new_product(stock=10)
    errors = db_errors(shop)
    assert requests.get(f"{shop}/products/99999999999999999999", timeout=10).status_code == 404
    assert requests.get(f"{shop}/products/{2**31}", timeout=10).status_code == 404
    assert requests.get(f"{shop}/products?after={2**40}", timeout=10).status_code == 400
    key = f"nul-{uuid.uuid4().hex}"
    for field in ("customer", "address"):
        body = {"product_id": product, "quantity": 1, "customer": "ann", "address": "1 Rd"}
        body[field] = "an\x00n"
        response = requests.post(
            f"{shop}/orders", json=body, headers={"Idempotency-Key": key}, timeout=30
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]
    patched = requests.patch(
        f"{shop}/admin/products/{product}",
        json={"stock": 1},
        headers={"Authorization": "Bearer \xe9"},
        timeout=10,
    )
    assert patched.status_code == 401 and patched.json()["error"]
    with engines["orders"].connect() as conn:
        assert conn.execute(select(func.count()).where(Order.idempotency_key == key)).scalar() == 0
    assert db_errors(shop) == errors


# -- 6. bad input never opens a database incident ----------------------------------------------
def test_6_a_flood_of_requests_for_a_huge_product_id_is_no_database_outage(
    shop: str, api: Api
) -> None:
    since = datetime.now(UTC)
    errors = db_errors(shop)
    statuses = {
        requests.get(f"{shop}/products/99999999999999999999", timeout=10).status_code
        for _ in range(150)
    }
    assert statuses == {404}
    assert db_errors(shop) == errors
    api.wait_cycles(10)  # Prometheus scrapes every second; the rule fires after 2 s
    assert db_errors(shop) == errors
    assert not [
        i
        for i in api.get("/incidents?limit=500")["incidents"]
        if i["kind"] == "ShopDatabaseNoPrimary" and datetime.fromisoformat(i["opened_at"]) > since
    ]
    assert runs_since(api, since, "failover") == []


# -- 8. logs, tokens and media types ------------------------------------------------------------
def test_8_an_alert_name_with_a_newline_forges_no_log_line(api: Api, stack: Stack) -> None:
    marker = uuid.uuid4().hex
    fingerprint = f"nl-{marker[:12]}"
    forged = f"Evil\nINFO controlplane.loop: forged {marker}"
    assert api.alert(webhook(forged, "firing", fingerprint)).status_code == 200
    wait_until(
        lambda: api.incident(f"alert:{fingerprint}") is not None,
        timeout_s=30,
        what="the incident opened",
    )
    api.wait_cycles(2)
    api.alert(webhook(forged, "resolved", fingerprint))
    log = (stack.layout.logs / "controlplane.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if marker in line]
    assert lines, "the alert's name was logged"
    assert all("Evil\\nINFO" in line for line in lines), lines


@pytest.mark.parametrize(
    "authorization",
    ["{token}", "bearer {token}", "Bearer  {token}", "Bearer {token} x", "Token {token}",
     "Bearer \xe9", "Basic {token}"],
)  # fmt: skip
def test_8_only_exactly_bearer_and_the_token_is_accepted(
    api: Api, stack: Stack, shop: str, authorization: str
) -> None:
    cp = requests.get(
        f"{api.url}/api/v1/health",
        headers={"Authorization": authorization.format(token=stack.api_token)},
        timeout=10,
    )
    assert cp.status_code == 401 and cp.json()["error"]
    flush = requests.post(
        f"{shop}/admin/cache/flush",
        headers={"Authorization": authorization.format(token=stack.admin_token)},
        timeout=10,
    )
    assert flush.status_code == 401 and flush.json()["error"]


def test_8_json_sent_as_text_or_a_form_is_a_415(api: Api, stack: Stack, shop: str) -> None:
    body = webhook("Plain", "firing", f"plain-{uuid.uuid4().hex[:12]}")
    as_text = requests.post(
        f"{api.url}/api/v1/alerts",
        data=json.dumps(body),
        headers={**api.hook, "Content-Type": "text/plain"},
        timeout=10,
    )
    assert as_text.status_code == 415 and as_text.json()["error"]
    form = requests.post(
        f"{api.url}/api/v1/silences", data={"matchers": "x"}, headers=api.headers, timeout=10
    )
    assert form.status_code == 415
    order = requests.post(
        f"{shop}/orders",
        data=json.dumps({"product_id": 1, "quantity": 1, "customer": "a", "address": "b"}),
        headers={"Idempotency-Key": uuid.uuid4().hex, "Content-Type": "text/plain"},
        timeout=10,
    )
    assert order.status_code == 415
    assert stored_alerts(stack, [body["alerts"][0]["fingerprint"]]) == 0


# -- properties: never a 5xx, nothing half-written ----------------------------------------------
text = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
label_names = st.one_of(
    st.sampled_from(["alertname", "service", "probe", "request", "kind", "target", "severity"]),
    st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=12),
    text,
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), finite, text)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=8,
)
times = st.one_of(
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda t: t.isoformat()),
    st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59-14:00", "", "now"]),
    junk,
)


@st.composite
def alert_bodies(draw: st.DrawFn) -> dict[str, Any]:
    alerts = []
    for _ in range(draw(st.integers(1, 3))):
        alert: dict[str, Any] = {
            "status": draw(st.sampled_from(["resolved", "firing", "pending", 1])),
            "labels": draw(st.dictionaries(label_names, text | junk, max_size=5)),
            "annotations": draw(st.dictionaries(label_names, text, max_size=2) | junk),
            "startsAt": draw(times),
            "endsAt": draw(times),
            "fingerprint": f"hyp-{uuid.uuid4().hex[:16]}",
        }
        for key in draw(st.lists(st.sampled_from(list(alert)), max_size=2)):
            alert.pop(key, None)
        alerts.append(alert)
    body: dict[str, Any] = {
        "version": draw(st.sampled_from(["4", "3", 4])),
        "status": draw(st.sampled_from(["firing", "resolved", "x"])),
        "receiver": draw(text),
        "alerts": alerts,
    }
    body.update(draw(st.dictionaries(text, junk, max_size=2)))
    return body


@PROPERTY
@given(body=alert_bodies())
def test_any_webhook_body_is_taken_whole_or_refused_whole_never_a_5xx(
    api: Api, stack: Stack, body: dict[str, Any]
) -> None:
    # Resolved alerts only are stored (firing ones would open incidents; their policies are
    # the decide tables' business): a refused delivery stores none of its alerts.
    for alert in body["alerts"]:
        if alert.get("status") == "firing":
            alert["status"] = "resolved"
    response = api.alert(body)
    assert response.status_code in (200, 400), response.text
    assert response.json()
    fingerprints = [a["fingerprint"] for a in body["alerts"] if "fingerprint" in a]
    if fingerprints:
        expected = len(fingerprints) if response.status_code == 200 else 0
        assert stored_alerts(stack, fingerprints) == expected


@PROPERTY
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "action": st.sampled_from(["cache_flush", "in_doubt", "switchover"]) | text | junk,
            "target": st.sampled_from(["redis", "shop-db", "nope"]) | text,
            "incident_id": st.integers() | junk,
            "params": st.dictionaries(
                st.sampled_from(["candidate", "nodes", "instances", "to", "x"]) | text, junk,
                max_size=3,
            ) | junk,
            "extra": junk,
        },
    )
)  # fmt: skip
def test_any_action_request_body_is_a_202_or_a_4xx_and_a_refused_one_writes_nothing(
    api: Api, body: dict[str, Any]
) -> None:
    reason = f"hyp-{uuid.uuid4().hex}"
    body["reason"] = reason
    if body.get("action") == "switchover":
        body["target"] = "redis"  # no switchover policy there: a request can only fail
    response = api.post("/actions", body)
    assert response.status_code in (202, 400, 404, 409), response.text
    assert response.json()
    runs = api.get("/actions?limit=500")["actions"]
    assert any(r["reason"] == reason for r in runs) == (response.status_code == 202)


@PROPERTY
@given(
    matchers=st.dictionaries(label_names, text | junk, max_size=4) | junk,
    duration_s=st.one_of(finite, st.integers(), junk),
    comment=text | junk,
)
def test_any_silence_body_is_a_201_or_a_400(
    api: Api, matchers: Any, duration_s: Any, comment: Any
) -> None:
    response = api.post(
        "/silences", {"matchers": matchers, "duration_s": duration_s, "comment": comment}
    )
    assert response.status_code in (201, 400), response.text
    if response.status_code == 201:
        requests.delete(
            f"{api.url}/api/v1/silences/{response.json()['id']}", headers=api.headers, timeout=5
        )


@pytest.fixture(scope="module")
def stocked(stack: Stack, engines: dict[str, Engine]) -> int:
    from sqlalchemy import insert

    from shop.models import Product, StockAdjustment

    with engines["inventory"].begin() as conn:
        sku = f"H-{uuid.uuid4().hex[:16]}"
        product_id: int = conn.execute(
            insert(Product)
            .values(sku=sku, name=f"hypothesis {sku}", price_cents=100, stock=1_000_000)
            .returning(Product.id)
        ).scalar_one()
        # Its ledger row, as the shop writes one: stock without it breaks the invariants,
        # and every later test on this stack would see "damage".
        conn.execute(
            insert(StockAdjustment).values(product_id=product_id, delta=1_000_000, reason="initial")
        )
    return product_id


@PROPERTY
@given(
    product_id=st.one_of(st.just(-1), st.integers(), junk),
    quantity=st.one_of(st.integers(-5, 5), st.integers(), junk),
    customer=text | junk,
    address=text | junk,
    extra=st.dictionaries(text, junk, max_size=1),
    real=st.booleans(),
)
def test_any_order_body_is_never_a_5xx_and_a_refused_one_writes_nothing(
    shop: str,
    stocked: int,
    engines: dict[str, Engine],
    product_id: Any,
    quantity: Any,
    customer: Any,
    address: Any,
    extra: dict[str, Any],
    real: bool,
) -> None:
    key = f"hyp-{uuid.uuid4().hex}"
    body = {"product_id": stocked if real else product_id, "quantity": quantity,
            "customer": customer, "address": address, **extra}  # fmt: skip
    errors = db_errors(shop)
    response = requests.post(
        f"{shop}/orders", json=body, headers={"Idempotency-Key": key}, timeout=30
    )
    assert response.status_code in (201, 400, 404, 409), response.text
    assert response.json()
    with engines["orders"].connect() as conn:
        written = conn.execute(select(func.count()).where(Order.idempotency_key == key)).scalar()
    assert written == (1 if response.status_code == 201 else 0)
    assert db_errors(shop) == errors
