"""The product apart from its lab (issue 20): a control plane served from a targets file alone,
its executor of kind `local` (each process's recipe written in the file, as an operator
writes a unit), heals a killed shop and fails over a killed primary of a lab stack whose
stack.json is gone meanwhile: nothing of the lab's description is read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from lab.process import wait_until
from lab.stack import Stack, stop_described
from lab.targets import controlplane_targets, write_targets
from remediation.executors.processes import (
    instance_processes,
    is_pid_alive,
    kill_tree,
    started_as,
)
from tests.conftest import stack_of_its_own


@pytest.fixture(scope="module")
def apart() -> Iterator[Stack]:
    with stack_of_its_own("shop-apart", products=20, with_controlplane=False) as lab:
        yield lab


def local_executor(description: dict[str, Any]) -> dict[str, Any]:
    """What an operator writes for the processes of one host: each one's command line, user,
    environment, log and data directory; PostgreSQL's tools and passfile."""
    components = {}
    for name, comp in description["components"].items():
        start = comp["start"]
        recipe = {
            "argv": start["argv"],
            "role": comp["role"],
            "env": start["env"],
            "log": comp["log"],
            "user": start["user"],
            "cwd": start["cwd"],
            "data_dir": comp.get("data_dir"),
        }
        components[name] = {k: v for k, v in recipe.items() if v is not None}
    postgres = description["postgres"]
    params = {"components": components, "tools_dir": postgres["bin_dir"],
              "passfile": postgres["passfile"]}  # fmt: skip
    return {"kind": "local", "params": params}


def api_get(url: str, token: str, path: str) -> Any:
    response = requests.get(
        f"{url}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    response.raise_for_status()
    return response.json()


def runs(url: str, token: str, action: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api_get(url, token, f"/actions?action={action}")["actions"]
    return found


def place_order(shop_url: str) -> requests.Response:
    return requests.post(
        f"{shop_url}/orders",
        json={"product_id": 1, "quantity": 1, "customer": "apart", "address": "1 Road"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
        timeout=15,
    )


def ready(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_control_plane_from_a_targets_file_alone_heals_a_killed_shop_and_a_killed_primary(
    apart: Stack, tmp_path: Path
) -> None:
    stack_file = apart.layout.stack_file
    description = json.loads(stack_file.read_text())
    comps = description["components"]
    targets = controlplane_targets(
        apart.layout, shop_admin_token=apart.admin_token, redis_password=apart.redis_password
    )
    targets["executors"] = {"host": local_executor(description)}
    targets["controlplane"]["database_url"] = f"sqlite:///{tmp_path / 'state.db'}"
    path = tmp_path / "targets.toml"
    write_targets(path, targets)
    assert "stack.json" not in path.read_text()
    cp_url = f"http://127.0.0.1:{apart.layout.controlplane_port}"
    token = apart.api_token
    env = {**os.environ, "CP_API_TOKEN": token, "CP_WEBHOOK_TOKEN": apart.webhook_token,
           "CP_INSTANCE_ID": "cp-apart"}  # fmt: skip
    with (tmp_path / "controlplane.log").open("wb") as log:
        plane = subprocess.Popen(
            [sys.executable, "-m", "web.cli", "serve", "--targets", str(path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    hidden = stack_file.with_name("stack.json.away")
    try:
        wait_until(lambda: ready(f"{cp_url}/readyz"), timeout_s=60, what="the control plane")
        shop = comps["shop-0"]["url"]
        acknowledged = []
        for _ in range(5):
            response = place_order(shop)
            assert response.status_code == 201, response.text
            acknowledged.append(response.json()["id"])
        os.rename(stack_file, hidden)  # from here on, nothing describes the stack

        # A shop killed: its whole tree, as a crashed host would lose it.
        killed = comps["shop-0"]["pid"]
        os.killpg(killed, signal.SIGKILL)
        wait_until(lambda: not is_pid_alive(killed), timeout_s=10, what="shop-0 gone")
        wait_until(
            lambda: any(r["state"] == "succeeded" for r in runs(cp_url, token, "restart")),
            timeout_s=90,
            what="a restart by the control plane succeeded",
        )
        wait_until(lambda: ready(f"{shop}/readyz"), timeout_s=60, what="shop-0 ready again")

        # The primary killed: every process of it at once.
        leader = next(n for n in ("pg0", "pg1") if comps[n]["role"] == "primary")
        node = comps[leader]
        assert kill_tree(instance_processes(node["pid"], node["data_dir"])) == set()
        wait_until(
            lambda: any(r["state"] == "succeeded" for r in runs(cp_url, token, "failover")),
            timeout_s=120,
            what="a failover by the control plane succeeded",
        )
        wait_until(lambda: place_order(shop).status_code == 201, timeout_s=60,
                   what="orders taken again")  # fmt: skip
        for order_id in acknowledged:  # none lost
            assert requests.get(f"{shop}/orders/{order_id}", timeout=10).status_code == 200
        assert not hidden.with_name("stack.json").exists()  # nobody wrote one meanwhile
    finally:
        if hidden.exists():
            os.rename(hidden, stack_file)
        plane.send_signal(signal.SIGTERM)
        try:
            plane.wait(timeout=30)
        except subprocess.TimeoutExpired:
            plane.kill()
            plane.wait()
    # The lab's `down` stops what that control plane restarted, unrecorded in stack.json (it
    # leaked a shop instance per run before).
    stop_described(apart.layout.data_dir)
    for name, comp in comps.items():
        assert started_as(comp["start"]["argv"]) == [], f"{name} outlived `down`"
