"""The web layer against an outsider and a careless user, in process: the webhook intake's
buckets (bounded, and not stopped by a worker killed mid-count), where a login may send its
browser next, and cached health answers that must not outlive or cross their askers."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from controlplane import accounts
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.runtime import ControlPlane
from remediation.executors.none import NoExecutor
from tests.test_dashboard import PASSWORD, csrf_of
from web import create_app
from web.alerts import IntakeLimit, SharedIntakeLimit


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        instance_id="cp-test",
        api_token="generated-token",
        admin_password="admin-password",
    )
    plane = ControlPlane(settings, executor=NoExecutor())
    accounts.add_user(plane.factory, "vera", "viewer", PASSWORD, utcnow())
    yield create_app(control_plane=plane)
    plane.stop()


# -- the webhook intake's buckets -----------------------------------------------------------------
def test_a_worker_killed_while_counting_alerts_leaves_the_intake_unslowed() -> None:
    limit = SharedIntakeLimit(per_minute=60, burst=10)
    child = os.fork()
    if child == 0:  # a web worker, killed inside the shared section (OOM killer, SIGKILL)

        def die(key: int, now: float) -> int:
            os.kill(os.getpid(), signal.SIGKILL)
            return 0

        limit._slot = die  # type: ignore[method-assign]
        limit.take("10.0.0.1", 1)
        os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    started = time.monotonic()
    waits = [limit.take("10.0.0.2", 1) for _ in range(20)]
    took_s = time.monotonic() - started
    assert took_s < 0.5, f"20 alerts took {took_s:.1f} s: the dead worker's lock is still held"
    assert waits[:10] == [0.0] * 10 and all(w > 0 for w in waits[10:])  # still counted


def test_a_worker_stopped_while_counting_alerts_delays_the_others_by_a_second_at_most() -> None:
    limit = SharedIntakeLimit(per_minute=60, burst=10)
    child = os.fork()
    if child == 0:  # stopped inside the shared section (SIGSTOP, a debugger): alive, holding

        def stop(key: int, now: float) -> int:
            os.kill(os.getpid(), signal.SIGSTOP)
            return 0

        limit._slot = stop  # type: ignore[method-assign]
        limit.take("10.0.0.1", 1)
        os._exit(0)
    try:
        _, status = os.waitpid(child, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        started = time.monotonic()
        assert limit.take("10.0.0.2", 1) == 0.0
        assert time.monotonic() - started < limit.LOCK_WAIT_S + 0.5
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


@pytest.mark.parametrize("kind", [IntakeLimit, SharedIntakeLimit])
def test_a_flood_from_ever_new_sources_keeps_the_buckets_bounded(
    kind: type[IntakeLimit] | type[SharedIntakeLimit],
) -> None:
    limit = kind(per_minute=60, burst=5)
    for i in range(50_000):
        limit.take(f"2001:db8::{i:x}", 1, now=1000.0 + i / 1000)
    if isinstance(limit, IntakeLimit):
        assert len(limit._buckets) <= 4096
    else:
        assert len(limit._table) == limit.SLOTS * limit._row.size
    # A source that keeps sending is still limited in the flood.
    assert [limit.take("10.9.9.9", 5, now=1100.0 + i / 1000) for i in range(2)][1] > 0


# -- where a login sends the browser next ---------------------------------------------------------
@pytest.mark.parametrize(
    "next_",
    ["/\\evil.example/", "/\\/evil.example/", "//evil.example/", "/\t/evil.example/",
     "https://evil.example/", "/%0a/evil.example", "////evil.example/phish", "///evil.example",
     "/\r\nSet-Cookie: a=b"],
)  # fmt: skip
def test_a_login_never_sends_its_browser_to_another_site(app: Flask, next_: str) -> None:
    client = app.test_client()
    response = client.post(
        "/login",
        data={
            "username": "vera",
            "password": PASSWORD,
            "csrf_token": csrf_of(client),
            "next": next_,
        },
    )
    assert response.status_code == 302
    location = response.headers["Location"]  # as a browser reads it
    read = location.replace("\\", "/").replace("\t", "").replace("\n", "")
    assert read.startswith("/") and not read.startswith("//")


def log_in(client: FlaskClient, name: str, password: str = PASSWORD) -> None:
    response = client.post(
        "/login", data={"username": name, "password": password, "csrf_token": csrf_of(client)}
    )
    assert response.status_code == 302, response.text


def test_a_copy_of_the_session_cookie_is_void_once_its_user_logs_out(app: Flask) -> None:
    client = app.test_client()
    log_in(client, "vera")
    cookie = client.get_cookie("session")
    assert cookie is not None
    stolen = app.test_client()
    stolen.set_cookie("session", cookie.value)
    assert stolen.get("/dashboard/api/overview.json").status_code == 200
    assert (
        client.post("/logout", data={"csrf_token": csrf_of(client, "/dashboard/")}).status_code
        == 302
    )
    assert stolen.get("/dashboard/api/overview.json").status_code == 302  # to the login page
    log_in(client, "vera")  # a new login is a new session, valid again
    assert client.get("/dashboard/api/overview.json").status_code == 200


def test_a_login_starts_a_new_session_with_a_new_csrf_token(app: Flask) -> None:
    client = app.test_client()
    before = csrf_of(client)
    log_in(client, "vera")
    assert csrf_of(client, "/dashboard/") != before


@pytest.mark.parametrize(
    "name", ["token:generated", "Admin", "cp-lab", "cli", "config", "véra", "a b", "x" * 65, ""]
)
def test_a_user_name_cannot_pass_for_another_or_for_the_system(app: Flask, name: str) -> None:
    from controlplane.errors import InvalidRequest

    with app.app_context(), pytest.raises(InvalidRequest):
        accounts.add_user(_plane(app).factory, name, "operator", PASSWORD, utcnow())


def _plane(app: Flask) -> ControlPlane:
    plane: ControlPlane = app.extensions["control_plane"]
    return plane


def test_a_disabled_user_is_logged_out_and_cannot_log_in_until_enabled(app: Flask) -> None:
    vera, admin = app.test_client(), app.test_client()
    log_in(vera, "vera")
    log_in(admin, "admin", "admin-password")
    token = csrf_of(admin, "/dashboard/admin")
    done = admin.post("/dashboard/admin/users/disable", data={"csrf_token": token, "name": "vera"})
    assert done.status_code == 302
    assert vera.get("/dashboard/api/overview.json").status_code == 302
    again = app.test_client()
    refused = again.post(
        "/login", data={"username": "vera", "password": PASSWORD, "csrf_token": csrf_of(again)}
    )
    assert refused.status_code == 401
    admin.post("/dashboard/admin/users/disable",
               data={"csrf_token": token, "name": "vera", "enable": "yes"})  # fmt: skip
    log_in(app.test_client(), "vera")
    itself = admin.post("/dashboard/admin/users/disable",
                        data={"csrf_token": token, "name": "admin"})  # fmt: skip
    assert itself.status_code == 400


def test_a_viewer_cannot_disable_anyone(app: Flask) -> None:
    vera = app.test_client()
    log_in(vera, "vera")
    token = csrf_of(vera, "/dashboard/")
    response = vera.post(
        "/dashboard/admin/users/disable", data={"csrf_token": token, "name": "admin"}
    )
    assert response.status_code == 403


def test_a_login_goes_back_to_the_game_day_it_was_asked_for(app: Flask) -> None:
    client = app.test_client()
    asked = client.get("/dashboard/gamedays/20261126T172900Z")
    assert asked.status_code == 302
    response = client.post(
        "/login",
        data={"username": "vera", "password": PASSWORD, "csrf_token": csrf_of(client),
              "next": "/dashboard/gamedays/20261126T172900Z"},
    )  # fmt: skip
    assert response.headers["Location"] == "/dashboard/gamedays/20261126T172900Z"


# -- cached health answers ------------------------------------------------------------------------
def test_a_cached_health_answer_is_never_given_to_a_stranger(app: Flask) -> None:
    client = app.test_client()
    token = {"Authorization": "Bearer generated-token"}
    assert client.get("/api/v1/health", headers=token).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "generated-token"}):
        response = client.get("/api/v1/health", headers=headers)
        assert response.status_code == 401 and set(response.json or {}) == {"error"}


# -- silences: types as the document says ---------------------------------------------------------
@pytest.mark.parametrize("duration", ["60", True, "1e3", None])
def test_a_silence_duration_is_a_json_number_not_a_string_or_a_boolean(
    app: Flask, duration: object
) -> None:
    response = app.test_client().post(
        "/api/v1/silences",
        json={"matchers": {"alertname": "x"}, "duration_s": duration, "comment": "maintenance"},
        headers={"Authorization": "Bearer generated-token"},
    )
    assert response.status_code == 400 and "duration_s" in response.json["error"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("matchers", "minutes"),
    [("alertname=x\nalertname=y", "20"), ("alertname=x", "nan"), ("alertname=x", "inf")],
)
def test_a_silence_form_with_a_label_twice_or_no_real_duration_is_refused(
    app: Flask, matchers: str, minutes: str
) -> None:
    client = app.test_client()
    log_in(client, "admin", "admin-password")
    response = client.post(
        "/dashboard/silences",
        data={"csrf_token": csrf_of(client, "/dashboard/silences"), "matchers": matchers,
              "duration_min": minutes, "comment": "maintenance"},
    )  # fmt: skip
    assert response.status_code == 400


# -- ids, numbers and keys written one way --------------------------------------------------------
@pytest.mark.parametrize("written", ["01", "\u0661", "\uff11", "+1", "1.0"])
def test_an_id_is_written_one_way_or_it_names_nothing(app: Flask, written: str) -> None:
    headers = {"Authorization": "Bearer generated-token"}
    response = app.test_client().get(f"/api/v1/incidents/{written}", headers=headers)
    assert response.status_code == 404 and "error" in response.json  # type: ignore[operator]


@pytest.mark.parametrize("limit", ["0050", "5_0", " 5", "\uff15", "+5", "0", "501"])
def test_a_limit_is_a_plain_number_within_its_bounds(app: Flask, limit: str) -> None:
    headers = {"Authorization": "Bearer generated-token"}
    response = app.test_client().get(
        "/api/v1/incidents", query_string={"limit": limit}, headers=headers
    )
    assert response.status_code == 400 and "limit" in response.json["error"]  # type: ignore[index]


def test_a_body_with_a_key_twice_is_refused_not_read_as_its_last(app: Flask) -> None:
    response = app.test_client().post(
        "/api/v1/actions",
        data='{"action": "x", "action": "backup", "target": "svc", "reason": "r"}',
        content_type="application/json",
        headers={"Authorization": "Bearer generated-token"},
    )
    assert response.status_code == 400 and "twice" in response.json["error"]  # type: ignore[index]


def test_a_chunked_body_on_a_reject_is_read_not_skipped(app: Flask) -> None:
    response = app.test_client().post(
        "/api/v1/actions/1/reject",
        input_stream=io.BytesIO(b"not json"),  # no length: sent chunked
        content_type="text/plain",
        headers={"Authorization": "Bearer generated-token", "Transfer-Encoding": "chunked"},
    )
    assert response.status_code == 415


def test_a_bidi_control_in_outside_text_is_shown_not_obeyed(app: Flask) -> None:
    client = app.test_client()
    log_in(client, "admin", "admin-password")
    created = client.post(
        "/dashboard/silences",
        data={"csrf_token": csrf_of(client, "/dashboard/silences"), "matchers": "target=shop-1",
              "duration_min": "5", "comment": "evil\u202e1-pohs"},
    )  # fmt: skip
    assert created.status_code == 302
    page = client.get("/dashboard/silences").text
    assert "\u202e" not in page and "evil&lt;U+202E&gt;1-pohs" in page
