"""`GET /api/v1/health/database/primary`, what load balancers read (Patroni's `/primary`), in
process: 200 only for a leader that answered as writable in the latest look, never for one
silent within its grace, and with `?node=` only for that node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from controlplane.config import Settings
from controlplane.probe_runner import FinishedRun
from controlplane.runtime import ControlPlane
from probes.base import Health, ProbeResult
from remediation.executors.none import NoExecutor
from web import create_app

PRIMARY = "/api/v1/health/database/primary"


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    settings = Settings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'state.db'}",
            "instance_id": "cp-test",
            "services": [{"name": "cluster"}],
            "probes": [
                {"name": "primary", "kind": "pg_primary", "service": "cluster",
                 "interval_s": 1, "timeout_s": 0.5,
                 "params": {"nodes": {"pg0": "dbname=x", "pg1": "dbname=y"}}}
            ],
        }
    )  # fmt: skip
    plane = ControlPlane(settings, executor=NoExecutor())
    yield plane
    plane.stop()


@pytest.fixture
def app(cp: ControlPlane) -> Flask:
    return create_app(control_plane=cp)


def seen(cp: ControlPlane, health: Health, summary: str, details: dict[str, Any]) -> None:
    [spec] = cp.settings.probes
    cp.recorder.record([FinishedRun(spec, ProbeResult(health, summary, 1.0, details), cp.clock())])


def answered(pg0: str, pg1: str = "standby") -> dict[str, Any]:
    return {"pg0": {"state": pg0, "timeline": 1}, "pg1": {"state": pg1, "timeline": 1}}


def test_a_leader_that_answered_as_writable_is_the_primary(app: Flask, cp: ControlPlane) -> None:
    seen(cp, Health.UP, "pg0 leads (timeline 1)", {"leader": "pg0", "nodes": answered("primary")})
    response = app.test_client().get(PRIMARY)
    assert response.status_code == 200 and response.json["primary"] == "pg0"  # type: ignore[index]


def test_a_leader_silent_within_its_grace_takes_no_write_and_is_not_the_primary(
    app: Flask, cp: ControlPlane
) -> None:
    seen(cp, Health.UP, "pg0 unanswered for 2.0s (grace 5s)",
         {"leader": "pg0", "nodes": answered("unanswered")})  # fmt: skip
    response = app.test_client().get(PRIMARY)
    assert response.status_code == 503
    assert response.json == {  # type: ignore[comparison-overlap]
        "primary": None,
        "reason": "pg0 unanswered for 2.0s (grace 5s)",
        "at": response.json["at"],  # type: ignore[index]
    }


def test_a_backend_asking_about_itself_is_the_primary_only_if_it_leads(
    app: Flask, cp: ControlPlane
) -> None:
    seen(cp, Health.UP, "pg0 leads (timeline 1)", {"leader": "pg0", "nodes": answered("primary")})
    client = app.test_client()
    assert client.get(f"{PRIMARY}?node=pg0").status_code == 200
    standby = client.get(f"{PRIMARY}?node=pg1")
    assert standby.status_code == 503
    assert standby.json["reason"] == "pg1 is not the primary (pg0 is)"  # type: ignore[index]
    assert client.get(f"{PRIMARY}?node=").status_code == 400
