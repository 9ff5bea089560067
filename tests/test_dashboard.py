"""The dashboard and the API's roles, in process (a SQLite state store, NoExecutor): every page
and endpoint as each role and unauthenticated, CSRF, the login limit, approve and reject."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from controlplane import accounts, services, store
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.models import ActionRun, ActionState, Incident
from controlplane.runtime import ControlPlane
from lab.layout import find_free_base_port
from remediation.executors.none import NoExecutor
from web import create_app
from web.charts import all_charts, lag_lines, line_chart

PASSWORD = "correct horse battery"
PAGES = ["/dashboard/", "/dashboard/incidents", "/dashboard/actions", "/dashboard/charts",
         "/dashboard/backups", "/dashboard/silences", "/dashboard/gamedays",
         "/dashboard/api/overview.json",
         "/dashboard/api/badge.json"]  # fmt: skip


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        instance_id="cp-test",
        api_token="generated-token",
        admin_password="admin-password",
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
    for name, role in (("vera", "viewer"), ("otto", "operator")):
        accounts.add_user(plane.factory, name, role, PASSWORD, utcnow())
    yield plane
    plane.stop()


@pytest.fixture
def app(cp: ControlPlane) -> Flask:
    return create_app(control_plane=cp)


def csrf_of(client: FlaskClient, path: str = "/login") -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert found, path
    return found.group(1)


def logged_in(app: Flask, name: str, password: str = PASSWORD) -> FlaskClient:
    client = app.test_client()
    response = client.post(
        "/login", data={"username": name, "password": password, "csrf_token": csrf_of(client)}
    )
    assert response.status_code == 302, response.text
    return client


def awaiting_run(cp: ControlPlane) -> int:
    cp.run_probe(cp.settings.probes[0])
    cp.loop.run_cycle()
    with store.read(cp.factory) as s:
        runs = store.runs_in_state(s, ActionState.AWAITING_APPROVAL)
    assert runs
    return runs[0].id


def run_of(cp: ControlPlane, run_id: int) -> ActionRun:
    with store.read(cp.factory) as s:
        run = s.get(ActionRun, run_id)
        assert run is not None
        return run


@pytest.mark.parametrize("path", PAGES)
def test_a_stranger_is_sent_to_the_login_page(app: Flask, path: str) -> None:
    response = app.test_client().get(path)
    assert response.status_code == 302 and "/login" in response.location


@pytest.mark.parametrize("who", ["vera", "otto"])
@pytest.mark.parametrize("path", PAGES)
def test_every_page_answers_each_role(app: Flask, who: str, path: str) -> None:
    assert logged_in(app, who).get(path).status_code == 200


@pytest.mark.parametrize("who", ["vera", "otto", "admin"])
def test_every_detail_page_and_view_answers_each_role(
    app: Flask, cp: ControlPlane, who: str
) -> None:
    run_id = awaiting_run(cp)
    [incident] = services.list_incidents(cp, "open", 5)
    client = logged_in(app, who, "admin-password" if who == "admin" else PASSWORD)
    for path in [*PAGES, f"/dashboard/incidents/{incident['id']}", f"/dashboard/actions/{run_id}",
                 "/dashboard/api/charts.json?range=1h", "/dashboard/charts?range=24h"]:  # fmt: skip
        assert client.get(path).status_code == 200, path
    assert client.get("/dashboard/admin").status_code == (200 if who == "admin" else 403)


MUTATIONS = ["/dashboard/actions/1/approve", "/dashboard/actions/1/reject",
             "/dashboard/actions/preview", "/dashboard/actions/request", "/dashboard/backups/start",
             "/dashboard/silences", "/dashboard/silences/1/expire", "/dashboard/admin/users",
             "/dashboard/admin/tokens", "/dashboard/admin/tokens/revoke",
             "/dashboard/admin/users/disable"]  # fmt: skip


@pytest.mark.parametrize("path", MUTATIONS)
def test_a_stranger_with_a_csrf_token_changes_nothing(
    app: Flask, cp: ControlPlane, path: str
) -> None:
    run_id = awaiting_run(cp)
    stranger = app.test_client()
    form = {"csrf_token": csrf_of(stranger), "action": "restart", "target": "svc", "reason": "x",
            "confirm": "svc", "matchers": "a=b", "duration_min": "5", "comment": "x",
            "name": "eve", "role": "admin", "password": "x" * 12}  # fmt: skip
    response = stranger.post(path, data=form)
    assert response.status_code == 302 and "/login" in response.location
    assert run_of(cp, run_id).state == ActionState.AWAITING_APPROVAL
    assert services.views.silences(cp) == [] and accounts.load_user(cp.factory, "eve") is None


def test_the_lab_admin_logs_in_and_sees_the_admin_page(app: Flask) -> None:
    admin = logged_in(app, "admin", "admin-password")
    assert admin.get("/dashboard/admin").status_code == 200
    assert logged_in(app, "otto").get("/dashboard/admin").status_code == 403


def test_a_wrong_password_and_a_locked_out_login_read_the_same(app: Flask) -> None:
    client = app.test_client()
    token = csrf_of(client)
    bodies = []
    for _ in range(7):
        response = client.post(
            "/login", data={"username": "otto", "password": "wrong", "csrf_token": token}
        )
        assert response.status_code == 401
        bodies.append(re.search(r'role="alert">([^<]+)<', response.text).group(1))  # type: ignore[union-attr]
    assert len(set(bodies)) == 1
    locked = client.post(
        "/login", data={"username": "otto", "password": PASSWORD, "csrf_token": token}
    )
    assert locked.status_code == 401  # rate-limited: the right password waits too


def test_the_session_cookie_is_httponly_and_samesite(app: Flask) -> None:
    client = app.test_client()
    response = client.post(
        "/login", data={"username": "otto", "password": PASSWORD, "csrf_token": csrf_of(client)}
    )
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_a_form_without_its_csrf_token_is_refused(app: Flask, cp: ControlPlane) -> None:
    run_id = awaiting_run(cp)
    otto = logged_in(app, "otto")
    response = otto.post(f"/dashboard/actions/{run_id}/approve")
    assert response.status_code == 400 and "CSRF" in response.text
    assert run_of(cp, run_id).state == ActionState.AWAITING_APPROVAL
    api = otto.post(f"/api/v1/actions/{run_id}/approve")  # a session on the API: CSRF too
    assert api.status_code == 400 and "CSRF" in api.json["error"]  # type: ignore[index]
    login = app.test_client().post("/login", data={"username": "otto", "password": PASSWORD})
    assert login.status_code == 400


def test_an_operator_approves_a_waiting_run_named_in_the_audit(
    app: Flask, cp: ControlPlane
) -> None:
    run_id = awaiting_run(cp)
    otto = logged_in(app, "otto")
    page = otto.get(f"/dashboard/actions/{run_id}")
    assert 'id="approve"' in page.text and 'id="reject"' in page.text
    response = otto.post(
        f"/dashboard/actions/{run_id}/approve", data={"csrf_token": csrf_of(otto, "/dashboard/")}
    )
    assert response.status_code == 302
    assert run_of(cp, run_id).state == ActionState.PENDING
    audit = services.get_action(cp, run_id)["audit"]
    assert ("otto", "approve") in [(a["actor"], a["verb"]) for a in audit]


def test_an_operator_rejects_a_waiting_run_and_it_never_runs(app: Flask, cp: ControlPlane) -> None:
    run_id = awaiting_run(cp)
    otto = logged_in(app, "otto")
    otto.post(
        f"/dashboard/actions/{run_id}/reject",
        data={"csrf_token": csrf_of(otto, "/dashboard/"), "comment": "not now"},
    )
    run = run_of(cp, run_id)
    assert run.state == ActionState.REJECTED and run.finished_at is not None
    cp.loop.run_cycle()
    assert run_of(cp, run_id).state == ActionState.REJECTED
    audit = services.get_action(cp, run_id)["audit"]
    assert ("otto", "reject", "not now") in [(a["actor"], a["verb"], a["message"]) for a in audit]
    again = otto.post(
        f"/dashboard/actions/{run_id}/approve", data={"csrf_token": csrf_of(otto, "/dashboard/")}
    )
    assert again.status_code == 409 and "<html" in again.text  # an HTML error page


def test_a_viewer_sees_no_buttons_and_is_refused_anyway(app: Flask, cp: ControlPlane) -> None:
    run_id = awaiting_run(cp)
    vera = logged_in(app, "vera")
    page = vera.get(f"/dashboard/actions/{run_id}")
    assert 'id="approve"' not in page.text and 'id="reject"' not in page.text
    assert "Request an action" not in vera.get("/dashboard/actions").text
    token = csrf_of(vera, "/dashboard/")
    for path, data in [
        (f"/dashboard/actions/{run_id}/approve", {}),
        (f"/dashboard/actions/{run_id}/reject", {}),
        ("/dashboard/actions/preview", {"action": "restart", "target": "svc", "reason": "x"}),
        ("/dashboard/actions/request", {"action": "restart", "target": "svc", "reason": "x"}),
        ("/dashboard/silences", {"matchers": "a=b", "duration_min": "5", "comment": "x"}),
        ("/dashboard/silences/1/expire", {}),
        ("/dashboard/admin/users", {"name": "x", "role": "admin", "password": "x" * 9}),
        ("/dashboard/admin/tokens", {"name": "x", "role": "admin"}),
    ]:
        response = vera.post(path, data={"csrf_token": token, **data})
        assert response.status_code == 403, path
    assert vera.get("/dashboard/admin").status_code == 403
    assert run_of(cp, run_id).state == ActionState.AWAITING_APPROVAL


def test_a_request_shows_its_precheck_then_runs_only_once_confirmed(
    app: Flask, cp: ControlPlane
) -> None:
    otto = logged_in(app, "otto")
    token = csrf_of(otto, "/dashboard/")
    form = {"csrf_token": token, "action": "restart", "target": "svc", "reason": "stuck"}
    preview = otto.post("/dashboard/actions/preview", data=form)
    assert preview.status_code == 200 and "check-ok" in preview.text
    assert "Type &#34;svc&#34; to confirm" in preview.text or 'Type "svc"' in preview.text
    with store.read(cp.factory) as s:
        assert store.list_runs(s, incident_id=None, limit=5) == []
    unconfirmed = otto.post("/dashboard/actions/request", data=form)
    assert unconfirmed.status_code == 400
    done = otto.post("/dashboard/actions/request", data={**form, "confirm": "svc"})
    assert done.status_code == 302
    with store.read(cp.factory) as s:
        [run] = store.list_runs(s, incident_id=None, limit=5)
    assert (run.requested_by, run.state) == ("otto", ActionState.PENDING)


def test_a_preview_lists_the_steps_a_dry_run_of_the_policy_would_take(app: Flask) -> None:
    otto = logged_in(app, "otto")
    form = {"csrf_token": csrf_of(otto, "/dashboard/"), "action": "restart", "target": "svc",
            "reason": "stuck"}  # fmt: skip
    page = otto.post("/dashboard/actions/preview", data=form).text
    plan = re.search(r'<ol class="list" id="plan">(.*?)</ol>', page, re.S)
    assert plan, page
    steps = re.findall(r"<li>(.*?)</li>", plan.group(1), re.S)
    assert len(steps) >= 3 and "SIGKILL of its whole process tree" in plan.group(1)


DRY_RUN_PARAMS: dict[str, dict[str, Any]] = {
    "restart": {"liveness_url": "http://{instance}/healthz"},
    "cache_flush": {"redis_url": "redis://r:1/0", "instances": ["http://s0", "http://s1"],
                    "admin_token": "t"},
    "in_doubt": {"orders_dsn": "dbname=o", "inventory_dsn": "dbname=i", "min_age_s": 7},
    "failover": {"nodes": {"pg-a": "dbname=a", "pg-b": "dbname=b"}, "rejoin": False},
    "rejoin": {"nodes": {"pg-a": "dbname=a", "pg-b": "dbname=b"}, "rebuild": True},
    "switchover": {"nodes": {"pg-a": "dbname=a", "pg-b": "dbname=b"}, "candidate": "pg-b"},
    "restore": {"nodes": {"pg-a": "dbname=a"}, "backups_dir": "/b", "archive_dir": "/w",
                "scratch_dir": "/s", "to": "2024-05-01T12:00:00+00:00", "full": True,
                "accept_loss": 3},
    "backup": {"nodes": {"pg-a": "dbname=a"}, "backups_dir": "/b", "archive_dir": "/w",
               "scratch_dir": "/s"},
    "drill": {"nodes": {"pg-a": "dbname=a"}, "backups_dir": "/b", "archive_dir": "/w",
              "scratch_dir": "/s", "label": "base-1"},
    "prune-backups": {"nodes": {"pg-a": "dbname=a"}, "backups_dir": "/b", "archive_dir": "/w",
                      "keep_count": 2},
}  # fmt: skip
DRY_RUN_SAYS = {"restart": "http://{instance}/healthz", "cache_flush": "http://s0, http://s1",
                "in_doubt": "over 7 s", "failover": "pg-a, pg-b", "rejoin": "rebuilt",
                "switchover": "promote pg-b", "restore": "exactly 3 order(s)",
                "backup": "pg_verifybackup", "drill": "check base-1",
                "prune-backups": "newest 2"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DRY_RUN_PARAMS))
def test_every_action_dry_runs_from_its_params_and_refuses_bad_ones(kind: str) -> None:
    from pydantic import ValidationError

    from remediation.registry import ACTIONS, action_class

    assert set(DRY_RUN_PARAMS) == set(ACTIONS)
    steps = action_class(kind).plan("svc", DRY_RUN_PARAMS[kind])
    assert steps and all(isinstance(step, str) and step for step in steps)
    assert DRY_RUN_SAYS[kind] in " ".join(steps)
    with pytest.raises(ValidationError):
        action_class(kind).plan("svc", {**DRY_RUN_PARAMS[kind], "unknown_param": 1})


def test_the_overview_names_each_service_once_with_what_the_control_plane_hears_of_it(
    tmp_path: Path,
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        instance_id="cp-test",
        api_token="generated-token",
        services=[{"name": "prometheus", "component": "prometheus"},
                  {"name": "alertmanager", "component": "alertmanager"}],
        probes=[{"name": "am-tcp", "kind": "tcp", "service": "alertmanager", "interval_s": 1,
                 "timeout_s": 0.5, "params": {"port": find_free_base_port()}}],
    )  # fmt: skip
    plane = ControlPlane(settings, executor=NoExecutor())
    try:
        plane.run_probe(settings.probes[0])
        data = services.views.overview(plane)
    finally:
        plane.stop()
    names = [s["name"] for s in data["services"]]
    assert sorted(names) == ["alertmanager", "prometheus"]
    am = next(s for s in data["services"] if s["name"] == "alertmanager")
    assert [p["name"] for p in am["probes"]] == ["am-tcp", "webhook"]
    assert am["health"] == "down"  # its own probe's verdict, not the webhook's "unknown"


def test_a_preview_of_what_no_policy_allows_says_so_before_anything_else(app: Flask) -> None:
    otto = logged_in(app, "otto")
    form = {"csrf_token": csrf_of(otto, "/dashboard/"), "action": "failover", "target": "svc",
            "reason": "curious"}  # fmt: skip
    page = otto.post("/dashboard/actions/preview", data=form)
    assert page.status_code == 200 and "no policy lets failover act on svc" in page.text
    assert "runs with the params and limits of policy" not in page.text


def test_a_restore_preview_names_no_backup_when_none_is_configured(app: Flask) -> None:
    otto = logged_in(app, "otto")
    form = {"csrf_token": csrf_of(otto, "/dashboard/"), "action": "restore", "target": "svc",
            "reason": "damage", "to": "2024-05-01T12:00:00+00:00", "full": "yes",
            "accept_loss": "3"}  # fmt: skip
    page = otto.post("/dashboard/actions/preview", data=form)
    assert page.status_code == 200 and "no backups are configured" in page.text


def test_a_restore_asks_for_the_time_to_restore_to_before_anything(
    app: Flask, cp: ControlPlane
) -> None:
    otto = logged_in(app, "otto")
    form = {"csrf_token": csrf_of(otto, "/dashboard/"), "action": "restore", "target": "svc",
            "reason": "damage", "confirm": "svc"}  # fmt: skip
    for path in ("/dashboard/actions/preview", "/dashboard/actions/request"):
        response = otto.post(path, data=form)
        assert response.status_code == 400 and "time to restore to" in response.text, path
    with store.read(cp.factory) as s:
        assert store.list_runs(s, incident_id=None, limit=5) == []
    # A time typed without a zone is UTC, for the preview and for the run alike.
    page = otto.post("/dashboard/actions/preview", data={**form, "to": "2024-05-01T12:00:00"})
    assert page.status_code == 200 and "2024-05-01T12:00:00+00:00" in page.text


def test_silences_are_created_and_expired_from_the_page(app: Flask, cp: ControlPlane) -> None:
    otto = logged_in(app, "otto")
    token = csrf_of(otto, "/dashboard/")
    form = {"csrf_token": token, "matchers": "alertname=X", "duration_min": "10", "comment": "m"}
    assert otto.post("/dashboard/silences", data=form).status_code == 302
    [silence] = services.views.silences(cp)
    assert silence["created_by"] == "otto"
    otto.post(f"/dashboard/silences/{silence['id']}/expire", data={"csrf_token": token})
    assert services.views.silences(cp) == []


def test_named_api_tokens_are_shown_once_audited_by_name_and_revocable(
    app: Flask, cp: ControlPlane
) -> None:
    admin = logged_in(app, "admin", "admin-password")
    page = admin.post(
        "/dashboard/admin/tokens",
        data={"csrf_token": csrf_of(admin, "/dashboard/"), "name": "ci", "role": "operator"},
    )
    token = re.search(r'id="new-token">([^<]+)<', page.text).group(1)  # type: ignore[union-attr]
    assert token not in admin.get("/dashboard/admin").text
    api = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    response = api.post(
        "/api/v1/actions", json={"action": "restart", "target": "svc", "reason": "ci"},
        headers=auth,
    )  # fmt: skip
    assert response.status_code == 202
    assert services.get_action(cp, response.json["id"])["requested_by"] == "token:ci"  # type: ignore[index]
    admin.post(
        "/dashboard/admin/tokens/revoke",
        data={"csrf_token": csrf_of(admin, "/dashboard/"), "name": "ci"},
    )
    assert api.get("/api/v1/health", headers=auth).status_code == 401


def test_a_viewer_token_reads_but_may_not_act(app: Flask, cp: ControlPlane) -> None:
    token = accounts.create_token(cp.factory, "grafana", "viewer", "admin", utcnow())
    auth = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    assert client.get("/api/v1/incidents", headers=auth).status_code == 200
    refused = client.post(
        "/api/v1/actions", json={"action": "restart", "target": "svc", "reason": "x"},
        headers=auth,
    )  # fmt: skip
    assert refused.status_code == 403 and refused.json["error"]  # type: ignore[index]


def test_the_generated_token_keeps_working_and_rejects_over_the_api(
    app: Flask, cp: ControlPlane
) -> None:
    run_id = awaiting_run(cp)
    client = app.test_client()
    auth = {"Authorization": "Bearer generated-token"}
    response = client.post(f"/api/v1/actions/{run_id}/reject", headers=auth)
    assert response.status_code == 200 and response.json["state"] == "rejected"  # type: ignore[index]
    assert services.get_action(cp, run_id)["audit"][-1]["actor"] == "token:generated"
    assert client.get("/api/v1/health").status_code == 401
    assert client.get("/api/v1/health").json["error"]  # type: ignore[index]


def test_the_openapi_document_describes_every_route_with_its_models(app: Flask) -> None:
    doc = app.test_client().get("/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")  # type: ignore[index]
    post = doc["paths"]["/api/v1/actions"]["post"]  # type: ignore[index]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ActionRequestIn"
    )
    assert "202" in post["responses"] and "403" in post["responses"]
    assert "ActionRequestIn" in doc["components"]["schemas"]  # type: ignore[index]
    assert "/api/v1/actions/{run_id}/reject" in doc["paths"]  # type: ignore[index]


def test_the_primary_health_check_is_503_without_a_primary_probe(app: Flask) -> None:
    response = app.test_client().get("/api/v1/health/database/primary")
    assert response.status_code == 503 and response.json["primary"] is None  # type: ignore[index]


def test_the_overview_json_lists_services_incidents_and_waiting_runs(
    app: Flask, cp: ControlPlane
) -> None:
    run_id = awaiting_run(cp)
    data = logged_in(app, "vera").get("/dashboard/api/overview.json").json
    svc = next(s for s in data["services"] if s["name"] == "svc")  # type: ignore[index]
    assert svc["health"] == "down" and svc["since"]
    assert [r["id"] for r in data["awaiting"]] == [run_id]  # type: ignore[index]
    assert data["incidents"] and data["incidents"][0]["target"] == "svc"  # type: ignore[index]


def test_an_incident_page_shows_its_timeline_and_times(app: Flask, cp: ControlPlane) -> None:
    awaiting_run(cp)
    [incident] = services.list_incidents(cp, "open", 5)
    page = logged_in(app, "vera").get(f"/dashboard/incidents/{incident['id']}")
    assert (
        page.status_code == 200 and "time to detect" in page.text and "await-approval" in page.text
    )
    assert logged_in(app, "vera").get("/dashboard/incidents/999").status_code == 404


def test_an_incident_timeline_starts_with_its_detection(app: Flask, cp: ControlPlane) -> None:
    awaiting_run(cp)
    [incident] = services.list_incidents(cp, "open", 5)
    page = logged_in(app, "vera").get(f"/dashboard/incidents/{incident['id']}").text
    first = re.search(r'<ul class="timeline"[^>]*>\s*<li id="([^"]+)">(.*?)</li>', page, re.S)
    assert first and first.group(1) == "detected"
    assert f'datetime="{incident["detected_at"]}"' in first.group(2)
    assert "first failed probe: svc-tcp on svc" in first.group(2)
    assert "<b>—</b>" in page and "— s" not in page  # no action started yet: no unit


def test_the_charts_page_has_a_place_for_every_figure_it_is_sent(app: Flask) -> None:
    vera = logged_in(app, "vera")
    page = vera.get("/dashboard/charts").text
    places = set(re.findall(r'class="chart" id="chart-([a-z_]+)"', page))
    figures = vera.get("/dashboard/api/charts.json?range=15m").json
    assert "replication_lag" in figures  # type: ignore[operator]
    assert places == set(figures)  # type: ignore[arg-type]


def test_every_plot_is_drawn_without_plotlys_share_to_cloud_button() -> None:
    # Plotly.js 4 shows "Share chart..." by default: it uploads the figure to cloud.plotly.com.
    static = Path(__file__).parent.parent / "web" / "static"
    assert re.search(
        r"SG\.plotlyConfig = \{[^}]*showSendToCloud: false", (static / "app.js").read_text()
    )
    calls = [
        (js.name, call)
        for js in static.glob("*.js")
        for call in re.findall(r"Plotly\.(?:newPlot|react)\(([^;]*)\);", js.read_text())
    ]
    assert calls and all(call.endswith(", SG.plotlyConfig") for _, call in calls), calls


def test_plotly_is_served_by_the_app(app: Flask) -> None:
    response = app.test_client().get("/dashboard/static/plotly.min.js")
    assert response.status_code == 200 and b"plotly" in response.data[:2000].lower()


def test_a_chart_draws_lines_incident_spans_and_run_markers() -> None:
    fig = line_chart(
        "orders",
        [{"name": "ok", "x": ["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"], "y": [1.0, 2.0]}],
        spans=[{"start": "2024-01-01T00:00:10Z", "end": "2024-01-01T00:00:40Z", "label": "#1"}],
        markers=[{"at": "2024-01-01T00:00:20Z", "action": "restart", "target": "shop-1",
                  "state": "succeeded", "who": "otto", "id": 7}],
    )  # fmt: skip
    assert [t.name for t in fig.data] == ["ok", "incidents", "actions"]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].type == "rect"
    assert fig.data[1].text[0] == "#1"  # the span's hover text, on its bar below
    assert fig.data[2].marker.symbol == "triangle-up"
    assert fig.layout.legend.y <= -0.2  # clear of the date under the time axis


def test_every_panel_becomes_a_figure_even_without_data() -> None:
    series: dict[str, Any] = {
        "a": {"title": "A", "unit": "s", "lines": []},
        "b": {"title": "B", "unit": "", "lines": [], "error": "Prometheus: down"},
    }
    figs = all_charts(series, {"spans": [], "markers": []})
    assert set(figs) == {"a", "b"} and "Prometheus: down" in figs["b"].layout.title.text


NODES = {"pg-a": "host=127.0.0.1 port=1", "pg-b": "host=127.0.0.1 port=2"}


@pytest.fixture
def cluster_cp(tmp_path: Path) -> Iterator[ControlPlane]:
    """A cluster with the operator policies of the lab: switchover and backup."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        instance_id="cp-test",
        api_token="generated-token",
        admin_password="admin-password",
        services=[{"name": "shop-db-cluster", "component": "pg"}],
        policies=[
            {"name": "switchover", "source": "operator", "match": {"target": "shop-db-cluster"},
             "action": "switchover", "params": {"nodes": NODES}},
            {"name": "backup", "source": "operator", "match": {"target": "shop-db-cluster"},
             "action": "backup", "max_attempts": 1,
             "params": {"nodes": NODES, "backups_dir": str(tmp_path / "b"),
                        "archive_dir": str(tmp_path / "a"), "scratch_dir": str(tmp_path / "s")}},
        ],
    )  # fmt: skip
    plane = ControlPlane(settings, executor=NoExecutor(), action_backoff_s=0.01)
    for name, role in (("vera", "viewer"), ("otto", "operator")):
        accounts.add_user(plane.factory, name, role, PASSWORD, utcnow())
    yield plane
    plane.stop()


def test_start_a_backup_requests_a_backup_run_through_the_engine(cluster_cp: ControlPlane) -> None:
    app = create_app(control_plane=cluster_cp)
    otto = logged_in(app, "otto")
    page = otto.get("/dashboard/backups")
    assert "Start a backup" in page.text
    token = csrf_of(otto, "/dashboard/backups")
    assert otto.post("/dashboard/backups/start", data={}).status_code == 400  # no CSRF token
    done = otto.post("/dashboard/backups/start", data={"csrf_token": token, "reason": "patching"})
    assert done.status_code == 302
    with store.read(cluster_cp.factory) as s:
        [run] = store.list_runs(s, incident_id=None, limit=5)
    assert (run.action, run.target, run.requested_by) == ("backup", "shop-db-cluster", "otto")
    assert run.state == ActionState.PENDING and not run.params.get("params")


def test_a_viewer_gets_no_backup_button_and_is_refused(cluster_cp: ControlPlane) -> None:
    app = create_app(control_plane=cluster_cp)
    vera = logged_in(app, "vera")
    assert "Start a backup" not in vera.get("/dashboard/backups").text
    token = csrf_of(vera, "/dashboard/")
    assert vera.post("/dashboard/backups/start", data={"csrf_token": token}).status_code == 403


def test_no_backup_button_without_an_operator_backup_policy(app: Flask) -> None:
    otto = logged_in(app, "otto")
    assert "Start a backup" not in otto.get("/dashboard/backups").text


def test_the_request_form_offers_the_switchover_candidates(cluster_cp: ControlPlane) -> None:
    app = create_app(control_plane=cluster_cp)
    otto = logged_in(app, "otto")
    page = otto.get("/dashboard/actions").text
    assert 'name="candidate"' in page
    assert "<option>pg-a</option>" in page and "<option>pg-b</option>" in page
    token = csrf_of(otto, "/dashboard/")
    form = {"csrf_token": token, "target": "shop-db-cluster", "reason": "patching",
            "candidate": "pg-b"}  # fmt: skip
    switch = otto.post("/dashboard/actions/preview", data={**form, "action": "switchover"})
    assert (
        switch.status_code == 200
        and "operator params accepted: {&#39;candidate&#39;: &#39;pg-b&#39;}" in switch.text
    )
    # Another action ignores the candidate: it is not one of its params.
    backup = otto.post("/dashboard/actions/preview", data={**form, "action": "backup"})
    assert "operator params accepted: none" in backup.text


def test_the_lag_chart_draws_a_line_per_standby_with_gaps_when_absent() -> None:
    samples = [
        {"at": "2024-01-01T00:00:00Z", "lag_bytes": {"pg-b": 0}},
        {"at": "2024-01-01T00:00:05Z", "lag_bytes": {"pg-b": 16384, "pg-c": 8}},
        {"at": "2024-01-01T00:00:10Z", "lag_bytes": {}},
    ]
    assert lag_lines(samples) == [
        {"name": "pg-b", "x": [s["at"] for s in samples], "y": [0, 16384, None]},
        {"name": "pg-c", "x": [s["at"] for s in samples], "y": [None, 8, None]},
    ]
    series = {"replication_lag": {"title": "Lag", "unit": "bytes", "samples": samples}}
    fig = all_charts(series, {"spans": [], "markers": []})["replication_lag"]
    assert [t.name for t in fig.data] == ["pg-b", "pg-c"]
    assert fig.layout.yaxis.tickformat == ".3s"
    assert lag_lines([]) == []


def test_the_dashboard_bench_takes_makes_options_and_writes_figures_bench_goals_reads(
    tmp_path: Path,
) -> None:
    from bench.dashboard import arguments, headline
    from lab.bench_goals import bench_of, judge, load, load_goals, save

    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    line = re.search(r"bench/dashboard\.py (.*)", makefile)
    assert line, "make bench-dashboard runs bench/dashboard.py"
    args = arguments().parse_args(line.group(1).replace("$(FIGURES)", str(tmp_path)).split())
    took = {"overview": [0.01, 0.02, 0.3], "health_api": [0.005, 0.006]}
    save(args.figures, headline(took, {"overview": 0, "health_api": 1}, 7.0, 7.1, args.clients))
    written = load(tmp_path)
    assert "dashboard" in written
    # The verdicts come from bench/goals.toml and the figures alone.
    verdicts = {
        g.id: judge(g, written).verdict for g in load_goals() if bench_of(g.figure) == "dashboard"
    }
    assert verdicts["dashboard.overview_p99"] == "FAIL"  # 300 ms against < 100 ms
    assert verdicts["dashboard.health_api_p99"] == "PASS"
    assert verdicts["dashboard.errors"] == "FAIL"  # one error
    assert verdicts["dashboard.probe_rate_vs_quiet"] == "PASS"


def test_an_unexpected_error_is_an_html_page_on_the_dashboard_and_json_on_the_api(
    app: Flask,
) -> None:
    def boom() -> str:
        raise RuntimeError("a bug")

    app.add_url_rule("/dashboard/boom", "boom", boom)
    app.add_url_rule("/api/v1/boom", "api_boom", boom)
    page = app.test_client().get("/dashboard/boom")
    assert page.status_code == 500 and page.mimetype == "text/html" and "a bug" not in page.text
    api = app.test_client().get("/api/v1/boom")
    assert api.status_code == 500 and api.json == {"error": "internal error"}


def test_a_database_row_carries_its_standbys_lag_and_no_other_wal_senders() -> None:
    from controlplane.views import _database_rows

    nodes = {"pg0": {"state": "primary", "timeline": 1},
             "pg1": {"state": "standby", "receiving": "streaming", "timeline": 1}}  # fmt: skip
    details = {"leader": "pg0", "sync": ["pg1"], "lag_bytes": {"pg1": 24576}, "nodes": nodes}
    probe = {"kind": "pg_standby", "details": details}
    rows = {r["node"]: r for r in _database_rows({"standby": probe})}
    assert (rows["pg1"]["lag_bytes"], rows["pg1"]["role"]) == (24576, "Sync Standby")
    assert rows["pg0"]["lag_bytes"] is None


def test_charts_json_is_a_quick_503_with_retry_after_when_no_thread_may_draw(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    from web import shared_reads

    monkeypatch.setattr(shared_reads, "charts", shared_reads.SharedComputation[bytes](5, 0))
    response = logged_in(app, "vera").get("/dashboard/api/charts.json?range=24h")
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
    assert "error" in response.json  # type: ignore[operator]


def test_charts_json_draws_an_alert_storm_as_a_bounded_summary(
    app: Flask, cp: ControlPlane
) -> None:
    now = utcnow()
    with store.transaction(cp.factory) as s:
        for n in range(300):
            s.add(Incident(fingerprint=f"storm-{n}", kind="Storm", source="alert",
                           target=f"svc-{n}", severity="warning", summary="", detected_at=now,
                           opened_at=now, policy=None))  # fmt: skip
    figures = logged_in(app, "vera").get("/dashboard/api/charts.json?range=24h").json
    orders = figures["orders"]  # type: ignore[index]
    assert len(orders["layout"]["shapes"]) == 1
    [bar] = [t for t in orders["data"] if t.get("name") == "incidents"]
    assert bar["text"][0].startswith("300 incidents: ")
