"""Who heals the healer, in the lab: the control plane killed from outside any tool is started
again by its supervisor (what systemd's Restart=always is on a host), Prometheus tells a human
(Alertmanager's second receiver, never the control plane itself), and `shoplab status`
shows what is dead as dead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from lab.cli import main
from lab.monitoring import OPERATOR_PATH
from lab.observe import notifications
from lab.process import wait_until
from lab.stack import Stack
from remediation.executors.processes import is_pid_alive
from tests.conftest import stack_of_its_own


@pytest.fixture(scope="module")
def supervised() -> Iterator[Stack]:
    with stack_of_its_own("shop-supervision", products=10) as lab:
        yield lab


def recorded_pid(stack: Stack, component: str) -> int:
    pid: int = json.loads(stack.layout.stack_file.read_text())["components"][component]["pid"]
    return pid


def is_ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def operator_alerts(stack: Stack, since: datetime) -> list[dict[str, Any]]:
    """What Alertmanager sent the operator's receiver since `since`: each alert's name and
    status."""
    return [
        {"alertname": alert["labels"]["alertname"], "status": alert["status"]}
        for record in notifications(stack.layout.data_dir)
        if record["path"] == OPERATOR_PATH
        and datetime.fromisoformat(record["received_at"]) >= since
        for alert in record["body"]["alerts"]
    ]


def test_a_control_plane_killed_from_outside_serves_again_and_a_human_is_told(
    supervised: Stack,
) -> None:
    described = supervised.describe()
    url = described["components"]["controlplane"]["url"]
    prometheus = described["components"]["prometheus"]["url"]

    def scraped_up() -> bool:
        query = {"query": 'up{job="controlplane"} == 1'}
        found = requests.get(f"{prometheus}/api/v1/query", params=query, timeout=5).json()
        return bool(found["data"]["result"])

    wait_until(scraped_up, timeout_s=30, what="the control plane scraped up")
    killed = recorded_pid(supervised, "controlplane")
    killed_at = datetime.now(UTC)
    os.killpg(killed, signal.SIGKILL)  # from outside any tool: nothing of the lab is told

    wait_until(
        lambda: recorded_pid(supervised, "controlplane") != killed and is_ready(url),
        timeout_s=60,
        what="the control plane serving again",
    )
    assert not is_pid_alive(killed)
    wait_until(
        lambda: (
            {"alertname": "ControlPlaneInterrupted", "status": "firing"}
            in operator_alerts(supervised, killed_at)
        ),
        timeout_s=90,
        what="the operator told",
    )
    # ... and never the control plane itself: no incident of its own death.
    token = described["secrets"]["controlplane_api_token"]
    incidents = requests.get(
        f"{url}/api/v1/incidents?limit=500",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()["incidents"]
    assert not [i for i in incidents if i["kind"].startswith("ControlPlane")], incidents


def test_status_shows_a_dead_component_and_a_dead_supervisor_as_dead(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = int(dead.stdout)
    alive = {"role": "shop", "pid": os.getpid(), "argv0": sys.executable}
    (tmp_path / "stack.json").write_text(
        json.dumps(
            {
                "lab": True,
                "components": {
                    "shop-0": alive,
                    "controlplane": {"role": "controlplane", "pid": gone, "argv0": sys.executable},
                },
                "supervisors": {"controlplane": {"pid": gone, "argv0": sys.executable}},
            }
        )
    )
    result = CliRunner().invoke(main, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["components"]["shop-0"]["running"] is True
    assert status["components"]["controlplane"]["running"] is False
    assert status["supervisors"]["controlplane"]["running"] is False
    assert status["dead"] == ["controlplane", "supervisor of controlplane"]
