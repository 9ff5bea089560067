"""The web layer against an outsider and a careless user, in process: the webhook intake's
buckets (bounded, and not stopped by a worker killed mid-count), where a login may send its
browser next, and cached health answers that must not outlive or cross their askers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from controlplane import accounts
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.runtime import ControlPlane, NoExecutor
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
    yield create_app(settings, control_plane=plane)
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
     "https://evil.example/", "/%0a/evil.example"],
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
