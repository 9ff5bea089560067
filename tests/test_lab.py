"""The lab: a real stack comes up replicated and scraped, is described, and stops cleanly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_api_client import PrometheusConnect

from lab.binaries import find_binaries, find_postgres_bin
from lab.errors import MissingBinaryError, PortInUseError
from lab.layout import HOST, StackLayout, ephemeral_ports, find_free_base_port
from lab.monitoring import check_rules, rules_path
from lab.postgres import replication_state
from lab.process import is_port_free, wait_until
from lab.stack import Stack
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import is_pid_alive, spawn, wait_for_exit
from tests.conftest import lab_tmpdir, order


def test_the_standby_streams_synchronously(stack: Stack) -> None:
    state = replication_state(stack.layout.pg_port(0), stack.pg_auth.passfile)
    assert state == [{"application_name": "pg1", "state": "streaming", "sync_state": "sync"}]


def test_an_acknowledged_order_reaches_the_standby(
    stack: Stack, shops: list[str], new_product: Callable[..., int]
) -> None:
    response = order(shops[0], str(uuid.uuid4()), new_product(stock=1))
    assert response.status_code == 201
    order_id = response.json()["id"]

    def on_standby() -> bool:
        with stack.connect("pg1", "orders") as conn:
            return (
                conn.execute("SELECT 1 FROM orders WHERE id = %s", (order_id,)).fetchone()
                is not None
            )

    wait_until(on_standby, timeout_s=10, what="the order replayed on the standby")


def test_prometheus_scrapes_every_shop_instance(stack: Stack, shops: list[str]) -> None:
    prom = PrometheusConnect(url=stack.describe()["components"]["prometheus"]["url"])
    expected = {url.removeprefix("http://") for url in shops}

    def all_up() -> bool:
        result = prom.custom_query('up{job="shop"}')
        return {r["metric"]["instance"] for r in result if r["value"][1] == "1"} == expected

    wait_until(all_up, timeout_s=20, interval_s=0.5, what="every shop scraped with up == 1")


def test_the_shipped_alert_rules_pass_promtool() -> None:
    check_rules(find_binaries(), rules_path())


def test_stack_json_describes_every_component_for_its_owner_only(stack: Stack) -> None:
    path = stack.layout.stack_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    description = json.loads(path.read_text())
    components = description["components"]
    assert {c["role"] for c in components.values()} == {
        "controlplane",
        "primary",
        "standby",
        "cache",
        "alertmanager",
        "prometheus",
        "shop",
        "receiver",
    }
    for name, comp in components.items():
        assert not is_port_free(HOST, comp["port"]), name

    def every_pid_alive() -> bool:
        # Re-read: a restart the control plane is finishing records its new pid last.
        described = json.loads(path.read_text())["components"]
        return all(is_pid_alive(c["pid"]) for c in described.values())

    wait_until(every_pid_alive, timeout_s=30, what="every described pid alive")


def test_a_taken_port_is_reported_with_its_role(tmp_path: Path) -> None:
    base = find_free_base_port()
    with socket.socket() as squatter:
        squatter.bind((HOST, base + 2))
        squatter.listen()
        with pytest.raises(PortInUseError, match=rf"redis \({base + 2}\)"):
            StackLayout(tmp_path, base).check_ports_free()


def test_a_stack_never_takes_ports_the_kernel_may_give_an_outgoing_connection() -> None:
    # A server down for a moment (restarted, restored) on such a port can find it taken by a
    # client's connect() and fail to start.
    ephemeral = ephemeral_ports()
    for _ in range(200):
        base = find_free_base_port()
        block = range(base, base + 20)
        assert block.stop <= ephemeral.start or block.start >= ephemeral.stop, (base, ephemeral)


def test_the_ephemeral_range_is_read_from_the_kernels_setting(tmp_path: Path) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t50000\n")
    assert ephemeral_ports(setting) == range(40000, 50001)
    assert ephemeral_ports(tmp_path / "absent") == range(32768, 61000)


def test_a_missing_postgres_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(MissingBinaryError, match="apt-get install -y postgresql"):
        find_postgres_bin(tmp_path)


def test_up_detach_then_down_leaves_nothing_running() -> None:
    data_dir = lab_tmpdir("shop-cli-")
    base = find_free_base_port()
    cli = [str(Path(sys.executable).parent / "shoplab")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], capture_output=True, text=True, timeout=180, check=False
        )

    try:
        up = run("up", "--data-dir", str(data_dir), "--base-port", str(base), "--shops", "1",
                 "--products", "10", "--detach")  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert "shop-0" in up.stdout
        description = json.loads((data_dir / "stack.json").read_text())
        pids = {name: c["pid"] for name, c in description["components"].items()}
        # ... and what stands in for systemd: the control plane's supervisor.
        pids["supervisor"] = description["supervisors"]["controlplane"]["pid"]
        assert all(is_pid_alive(pid) for pid in pids.values())

        again = run("up", "--data-dir", str(data_dir), "--base-port", str(base), "--detach")
        assert again.returncode != 0
        assert "already running" in again.stderr

        down = run("down", "--data-dir", str(data_dir))
        assert down.returncode == 0, down.stderr
        assert all(not is_pid_alive(pid) for pid in pids.values())
        assert all(is_port_free(HOST, c["port"]) for c in description["components"].values())
        assert os.path.isdir(data_dir / "logs")
    finally:
        if (data_dir / "stack.json").exists():
            run("down", "--data-dir", str(data_dir))  # never leave a stack behind
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_server_started_but_never_recorded_is_adopted_rather_than_left_running(
    tmp_path: Path,
) -> None:
    # What a control plane killed between starting a server and recording its pid leaves.
    argv = [sys.executable, "-c", "import time; time.sleep(120)", f"server-{uuid.uuid4()}"]
    orphan = spawn(argv, log_path=tmp_path / "orphan.log")
    gone = spawn([sys.executable, "-c", "pass"], log_path=tmp_path / "gone.log")
    gone.wait()
    stack_file = tmp_path / "stack.json"
    stack_file.write_text(
        json.dumps(
            {
                "components": {
                    "svc": {
                        "role": "shop",
                        "pid": gone.pid,
                        "argv0": argv[0],
                        "start": {"argv": argv, "env": {}, "cwd": None, "user": None},
                    }
                }
            }
        )
    )
    executor = LabExecutor(stack_file)
    try:
        assert executor.is_running("svc")
        assert json.loads(stack_file.read_text())["components"]["svc"]["pid"] == orphan.pid
        executor.stop("svc", timeout_s=5)  # and so the usual stop reaches it
        assert wait_for_exit(orphan.pid, timeout_s=5)
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
