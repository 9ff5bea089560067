"""A fence fences, a stop stops: hung (SIGSTOPped) servers, orphaned backends, `down`; and a
shop does not wait on a hung database for as long as it hangs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lab.binaries import find_binaries
from lab.layout import HOST, StackLayout, find_free_base_port
from lab.monitoring import http_ok
from lab.postgres import PgAuth, PgNode, chown_to, is_accepting, pg_os_user
from lab.process import is_port_free, wait_until
from lab.stack import Stack, stop_described
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import (
    Proc,
    instance_processes,
    is_alive,
    kill_tree,
    read_proc,
    signal_all,
    spawn,
)
from tests.conftest import lab_tmpdir, stack_of_its_own

SHARED_MEMORY_IN_USE = "pre-existing shared memory block"


@pytest.fixture(scope="module")
def lab() -> Iterator[Stack]:
    """A stack of its own (its PostgreSQL is fenced), without a control plane: it would heal
    what these tests break before they could look."""
    with stack_of_its_own("shop-fencing", products=10, with_controlplane=False) as stack:
        yield stack


@pytest.fixture
def executor(lab: Stack) -> LabExecutor:
    return LabExecutor(lab.layout.stack_file)


def recorded_pid(lab: Stack, name: str) -> int:
    pid: int = json.loads(lab.layout.stack_file.read_text())["components"][name]["pid"]
    return pid


def is_stopped(proc: Proc) -> bool:
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("T", "t")


def hang(pid: int | None, data_dir: str | None = None) -> set[Proc]:
    """SIGSTOP every process of a server (found as the executor finds them), and wait until
    each is stopped."""
    procs = instance_processes(pid, data_dir)
    signal_all(procs, signal.SIGSTOP)
    wait_until(lambda: all(is_stopped(p) for p in procs), timeout_s=10, what="all stopped")
    return procs


def start_again(executor: LabExecutor, lab: Stack, name: str, port: int) -> str:
    """Restart it through the executor; returns what it logged meanwhile."""
    log = Path(json.loads(lab.layout.stack_file.read_text())["components"][name]["log"])
    offset = log.stat().st_size
    executor.restart(name)
    wait_until(
        lambda: is_accepting(port, lab.pg_auth.passfile),
        timeout_s=60,
        what=f"{name} accepting again",
    )
    with log.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def test_a_postgres_whose_every_process_is_stopped_is_fenced_and_starts_again(
    lab: Stack, executor: LabExecutor
) -> None:
    data_dir = executor.data_dir("pg0")
    port = lab.layout.pg_port(0)
    session = lab.connect("pg0")  # one more backend, serving a client
    try:
        session.execute("SELECT 1")
        stopped = hang(recorded_pid(lab, "pg0"), data_dir)
        assert len(stopped) > 1

        assert executor.fence("pg0")

        assert not any(is_alive(proc) for proc in stopped)
        assert instance_processes(None, data_dir) == set()
    finally:
        session.close()
    logged = start_again(executor, lab, "pg0", port)
    assert SHARED_MEMORY_IN_USE not in logged


def test_a_fence_finds_the_backends_a_sigkilled_postmaster_left_behind(
    lab: Stack, executor: LabExecutor
) -> None:
    data_dir = executor.data_dir("pg0")
    port = lab.layout.pg_port(0)
    session = lab.connect("pg0")
    try:
        session.execute("SELECT 1")
        postmaster = recorded_pid(lab, "pg0")
        # Stopped first, so that the backends cannot notice their postmaster's death and exit.
        everything = hang(postmaster, data_dir)
        main = next(proc for proc in everything if proc.pid == postmaster)
        signal_all([main], signal.SIGKILL)
        wait_until(lambda: not is_alive(main), timeout_s=10, what="the postmaster gone")
        orphans = instance_processes(None, data_dir)
        assert orphans and main not in orphans
        assert not executor.is_running("pg0")

        assert executor.fence("pg0")

        assert instance_processes(None, data_dir) == set()
        assert not any(is_alive(proc) for proc in everything)
    finally:
        session.close()
    logged = start_again(executor, lab, "pg0", port)
    assert SHARED_MEMORY_IN_USE not in logged


def test_a_shop_instance_whose_master_and_worker_are_stopped_is_restarted_ready_again(
    lab: Stack, executor: LabExecutor
) -> None:
    url = f"http://{HOST}:{lab.layout.shop_port(0)}/readyz"
    wait_until(lambda: http_ok(url), timeout_s=30, what="shop-0 ready")  # pg0 was restarted
    old = recorded_pid(lab, "shop-0")
    hung = hang(old)
    assert len(hung) > 1  # the gunicorn master and its worker
    assert not http_ok(url)

    started = time.monotonic()
    new = executor.restart("shop-0")
    wait_until(lambda: http_ok(url), timeout_s=60, what="shop-0 ready again")
    took_s = time.monotonic() - started

    print(f"\na hung shop instance was ready again {took_s:.2f}s after the restart call")
    assert new != old
    assert not any(is_alive(proc) for proc in hung)


def test_down_kills_a_postgres_running_under_the_data_dir_that_stack_json_does_not_record() -> None:
    data_dir = lab_tmpdir("shop-down-")
    layout = StackLayout(data_dir, find_free_base_port(), shop_count=1)
    user = pg_os_user()
    for path in (layout.pg_root, layout.wal_archive):
        path.mkdir(parents=True, exist_ok=True)
        chown_to(path, user)
    auth = PgAuth.generate(layout.pgpass)
    auth.write_passfile(user)
    node = PgNode(
        "pg0",
        layout.pg_port(0),
        layout.pg_data(0),
        layout.logs / "pg0.log",
        find_binaries(),
        user,
        layout.pgpass,
    )
    # A recorded component whose child, in a session of its own, ignores SIGTERM (as a
    # PostgreSQL backend would outlive its postmaster).
    child = (
        "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(300)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(300)"
    )
    recorded = spawn([sys.executable, "-c", parent], log_path=layout.logs / "svc.log")
    server = node.server()
    its_child: set[Proc] = set()
    try:
        node.init_primary(layout.wal_archive, auth.superuser_password)
        server.start().wait_ready()  # as an action starting it would: never recorded
        assert server.pid is not None
        unrecorded = instance_processes(server.pid, node.data_dir)
        wait_until(
            lambda: len(instance_processes(recorded.pid)) == 2,
            timeout_s=10,
            what="the recorded component's child",
        )
        layout.stack_file.write_text(
            json.dumps(
                {
                    "data_dir": str(data_dir),
                    "components": {
                        "svc": {"role": "shop", "pid": recorded.pid, "argv0": sys.executable}
                    },
                }
            )
        )
        its_child = instance_processes(recorded.pid) - {read_proc(recorded.pid)}

        assert stop_described(data_dir, timeout_s=5) == ["svc"]

        assert recorded.poll() is not None
        assert not any(is_alive(proc) for proc in unrecorded | its_child)
        assert instance_processes(None, node.data_dir) == set()
        assert is_port_free(HOST, node.port)
    finally:  # never leave a server behind, whatever failed
        kill_tree(
            instance_processes(recorded.pid)
            | instance_processes(server.pid, node.data_dir)
            | its_child
        )
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_shop_answers_within_its_deadlines_while_its_primary_hangs_and_serves_once_it_wakes(
    lab: Stack,
) -> None:
    # No control plane here: nothing fails over. Without client-side deadlines, an order would
    # wait on the pooled connections to the stopped primary for as long as it hangs.
    shop = lab.describe()["shop"]["instances"][0]

    def place() -> requests.Response:
        return requests.post(
            f"{shop}/orders",
            json={"product_id": 1, "quantity": 1, "customer": "hang", "address": "1 Road"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
            timeout=60,
        )

    assert place().status_code == 201  # the pool holds connections to the primary now
    procs = hang(recorded_pid(lab, "pg0"), lab.describe()["components"]["pg0"]["data_dir"])
    try:
        # The primary is woken only after the shop has answered: an answer at all (not the
        # client's own 60 s timeout) shows that the shop gave up on the hung node by itself.
        during = place()
    finally:
        signal_all(procs, signal.SIGCONT)
    assert during.status_code == 503
    assert "error" in during.json()
    wait_until(lambda: place().status_code == 201, timeout_s=30, what="orders again once awake")


def test_a_server_the_executor_starts_is_not_in_the_starters_process_tree(tmp_path: Path) -> None:
    from remediation.executors.processes import (
        descendants,
        is_pid_alive,
        process_table,
        spawn_detached,
    )

    # As a service manager's would be: killing the control plane with its whole tree (a dying
    # host, a chaos fault) must not take the Redis or PostgreSQL it restarted with it.
    pid = spawn_detached(["sleep", "30"], log_path=tmp_path / "sleep.log")
    try:
        # It returns once the server runs its program: by then setsid() has put it in a
        # session of its own.
        table = process_table()
        assert pid in table and table[pid].ppid != os.getpid()
        assert pid not in {p.pid for p in descendants([os.getpid()], table)}
        assert table[pid].session == pid  # a session of its own: no terminal signal reaches it
    finally:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not is_pid_alive(pid), timeout_s=5, what="the sleep gone")
    with pytest.raises(OSError, match="no program"):
        spawn_detached(["/nonexistent/server"], log_path=tmp_path / "x.log")


def test_a_started_server_runs_its_program_when_its_start_returns(tmp_path: Path) -> None:
    # "Does it run?" asked right after a restart (a full restore's recovery watch) heard no
    # while the launcher's child was still `sh` or `setsid`: 44 of 50 starts, measured.
    from remediation.executors.processes import runs_program, spawn_detached

    pids = []
    try:
        for i in range(30):
            pid = spawn_detached(["sleep", "30"], log_path=tmp_path / f"sleep-{i}.log")
            pids.append(pid)
            assert runs_program(pid, "sleep"), i
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
