"""The `ssh` and `systemd` executors on real hosts: network namespaces of the multi-host lab,
each with Debian's sshd, reached with a key and a checked host key; services are units of the
lab's fake systemctl (systemd cannot run in a namespace here), each in a real cgroup.

Faults as the world makes them: a partition drops packets both ways (nftables), a hung host is
every process of it stopped, its sshd included."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.hosts.lab import HostsLab
from lab.hosts.net import HostNet
from lab.process import wait_until
from remediation.base import ActionError
from remediation.executors.base import Cancel, Cancelled, ExecutorError
from remediation.executors.registry import ExecutorConfigError, build_executor
from remediation.executors.runners import HostHung, HostUnreachable, StepOverran
from remediation.executors.systemd import SystemdExecutor
from remediation.pg_ops import fence as pg_fence
from tests.conftest import lab_tmpdir

# A service like PostgreSQL: its main process starts a child in a session of its own (a
# backend calls setsid()), which no process group or tree holds.
SERVICE = textwrap.dedent(
    """\
    import subprocess, sys, time
    subprocess.Popen(["sleep", "3600"], start_new_session=True)
    print("serving", flush=True)
    time.sleep(3600)
    """
)
# A server tool: forks a child that would go on writing, then waits.
SLOW_TOOL = textwrap.dedent(
    """\
    #!/bin/sh
    id -un
    sleep 3600 &
    sleep 3600
    """
)


@pytest.fixture(scope="module")
def hosts() -> Iterator[HostsLab]:
    lab = HostsLab(lab_tmpdir("shop-hosts"), HostNet.new(("db-1", "db-2")))
    lab.up()
    service = lab.data_dir / "service.py"
    service.write_text(SERVICE)
    tools = lab.data_dir / "tools"
    tools.mkdir()
    (tools / "slowtool").write_text(SLOW_TOOL)
    (tools / "slowtool").chmod(0o755)
    data = lab.data_dir / "nodes" / "svc"
    data.mkdir(parents=True)
    os.chown(data.parent, 0, 0)
    for host in ("db-1", "db-2"):
        lab.add_unit(
            host,
            "svc.service",
            {
                "argv": [sys.executable, str(service)],
                "log": str(lab.data_dir / f"svc-{host}.log"),
                "kill_signal": "SIGTERM",
                "timeout_stop_s": 3,
            },
        )
    try:
        yield lab
    finally:
        left = lab.down()
        assert left == [], f"the lab left {left}"


def executor(lab: HostsLab, host: str = "db-1", **extra: object) -> SystemdExecutor:
    params = lab.executor_params(
        {
            "svc": {
                "unit": "svc.service",
                "host": host,
                "user": "postgres",
                "data_dir": str(lab.data_dir / "nodes" / "svc"),
                "log": str(lab.data_dir / f"svc-{host}.log"),
            }
        },
        tools_dir=str(lab.data_dir / "tools"),
        **extra,
    )
    built = build_executor("hosts", "ssh", params)
    assert isinstance(built, SystemdExecutor)
    return built


def unit_pids(lab: HostsLab, host: str) -> list[int]:
    group = Path("/sys/fs/cgroup/systemd") / lab.cgroup_base(host).lstrip("/") / "svc.service"
    procs = group / "cgroup.procs"
    if not procs.exists():
        procs = Path("/sys/fs/cgroup/unified") / lab.cgroup_base(host).lstrip("/") / "svc.service"
        procs = procs / "cgroup.procs"
    return [int(x) for x in procs.read_text().split()] if procs.exists() else []


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_a_unit_on_another_host_is_restarted_then_fenced_with_nothing_left_in_its_cgroup(
    hosts: HostsLab,
) -> None:
    ex = executor(hosts)
    try:
        pid = ex.restart("svc")
        assert ex.is_running("svc")
        wait_until(lambda: len(unit_pids(hosts, "db-1")) >= 2, timeout_s=10, what="its child")
        pids = unit_pids(hosts, "db-1")
        assert pid in pids
        assert ex.fence("svc") is True
        assert not ex.is_running("svc")
        assert unit_pids(hosts, "db-1") == []
        assert not any(alive(p) for p in pids), "a process of the unit outlived its fence"
        assert "serving" in ex.log_tail("svc")
    finally:
        ex.close()


def test_a_hung_unit_is_fenced_its_stopped_processes_included(hosts: HostsLab) -> None:
    ex = executor(hosts)
    try:
        ex.restart("svc")
        wait_until(lambda: len(unit_pids(hosts, "db-1")) >= 2, timeout_s=10, what="its child")
        pids = unit_pids(hosts, "db-1")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        assert ex.fence("svc") is True
        assert not any(alive(p) for p in pids)
        assert ex.fence("svc") is False  # nothing ran: nothing to fence, and no error
    finally:
        ex.close()


def test_a_clean_stop_leaves_nothing_of_the_unit(hosts: HostsLab) -> None:
    ex = executor(hosts)
    try:
        ex.restart("svc")
        wait_until(lambda: len(unit_pids(hosts, "db-1")) >= 2, timeout_s=10, what="its child")
        pids = unit_pids(hosts, "db-1")
        ex.stop("svc")
        assert not ex.is_running("svc")
        assert not any(alive(p) for p in pids)
    finally:
        ex.close()


def test_a_partitioned_host_is_never_taken_for_a_fenced_one(hosts: HostsLab) -> None:
    ex = executor(hosts, "db-2", step_timeout_s=3, connect_timeout_s=1)
    try:
        ex.restart("svc")
        wait_until(lambda: len(unit_pids(hosts, "db-2")) >= 2, timeout_s=10, what="its child")
        pids = unit_pids(hosts, "db-2")
        hosts.net.partition("db-2")
        try:
            started = time.monotonic()
            with pytest.raises((HostHung, HostUnreachable)):
                ex.fence("svc")  # on the connection it had: no answer within the step
            with pytest.raises(HostUnreachable):
                ex.fence("svc")  # a new connection: none
            assert time.monotonic() - started < 3 + 1 + 3, "the fence waited past its timeouts"

            class View:
                name = "svc"

            with pytest.raises(ActionError, match="cannot fence svc"):
                pg_fence(ex, View())  # type: ignore[arg-type]
            assert all(alive(p) for p in pids), "nothing reached the host: all of it runs"
        finally:
            hosts.net.heal("db-2")
        assert ex.fence("svc") is True  # the link back: the fence reaches it
        assert not any(alive(p) for p in pids)
    finally:
        ex.close()


def test_a_host_that_hangs_mid_step_fails_the_step_within_its_timeout_and_it_is_not_repeated(
    hosts: HostsLab,
) -> None:
    ex = executor(hosts, "db-2", step_timeout_s=2)
    marks = hosts.data_dir / "marks"
    marks.write_text("")
    try:
        ex.is_running("svc")  # connected
        errors: list[Exception] = []

        def step() -> None:
            try:
                ex._step("svc", f"echo ran >> {marks}; sleep 5")
            except ExecutorError as exc:
                errors.append(exc)

        started = time.monotonic()
        worker = threading.Thread(target=step)
        worker.start()
        wait_until(lambda: marks.read_text() != "", timeout_s=5, what="the step running")
        stopped = hosts.net.hang("db-2")
        assert stopped, "the host has processes (its sshd at least)"
        worker.join(timeout=10)
        took = time.monotonic() - started
        hosts.net.resume("db-2")
        assert errors and isinstance(errors[0], HostHung), errors
        assert took < 2 + 1.5, f"the step took {took:.1f} s past its 2 s timeout"
        time.sleep(5.5)  # the step's own sleep, resumed, ends
        assert marks.read_text() == "ran\n", "the step was run again"
    finally:
        hosts.net.resume("db-2")
        ex.close()


def test_a_fence_of_a_unit_systemd_does_not_know_fails_and_never_passes_for_done(
    hosts: HostsLab,
) -> None:
    params = hosts.executor_params({"svc": {"unit": "nosuch.service", "host": "db-1"}})
    ex = build_executor("hosts", "ssh", params)
    try:
        with pytest.raises(ExecutorError, match="not-found") as raised:
            ex.fence("svc")
        assert not isinstance(raised.value, HostHung | HostUnreachable)
    finally:
        ex.close()  # type: ignore[attr-defined]


def test_a_step_that_answered_then_went_silent_is_not_taken_for_an_unreached_host(
    hosts: HostsLab,
) -> None:
    ex = executor(hosts, "db-2", step_timeout_s=1)
    try:
        with pytest.raises(StepOverran):
            ex._step("svc", "echo started; sleep 5")
    finally:
        ex.close()


def test_a_new_connection_to_a_host_whose_every_process_is_stopped_is_unreached(
    hosts: HostsLab,
) -> None:
    """Its kernel accepts the TCP connection, its sshd never says a word: that is a host not
    reached (which a failover may promote past), not a configuration error (which blocks it),
    whatever paramiko's error says next."""
    ex = executor(hosts, "db-2", step_timeout_s=1, connect_timeout_s=1)
    hosts.net.hang("db-2")
    try:
        with pytest.raises(HostUnreachable):
            ex.fence("svc")
    finally:
        hosts.net.resume("db-2")
        ex.close()


def test_a_host_key_other_than_the_known_one_is_refused(hosts: HostsLab) -> None:
    other = hosts.data_dir / "other_known_hosts"
    # db-2's key under db-1's address: what a host taken over (or a lab rebuilt) would offer.
    db2 = (hosts.ssh_dir / "host_db-2.pub").read_text().strip()
    other.write_text(f"{hosts.address('db-1')} {db2}\n")
    ex = executor(hosts, known_hosts=str(other))
    try:
        with pytest.raises(ExecutorError, match="host key") as raised:
            ex.is_running("svc")
        assert not isinstance(raised.value, HostUnreachable)
    finally:
        ex.close()
    other.write_text("")
    ex = executor(hosts, known_hosts=str(other))
    try:
        with pytest.raises(ExecutorError, match="not in"):
            ex.is_running("svc")
    finally:
        ex.close()


def test_a_tool_runs_as_the_units_user_and_a_cancel_kills_it_and_what_it_forked(
    hosts: HostsLab,
) -> None:
    ex = executor(hosts)
    cancel = Cancel()
    try:
        timer = threading.Timer(1.0, cancel.cancel, args=("an operator's failover",))
        timer.start()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            ex.run_tool("svc", "slowtool", [], cancel=cancel, timeout_s=30)
        assert time.monotonic() - started < 5
        wait_until(
            lambda: (
                not any(
                    "sleep 3600"
                    in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    and Path(f"/proc/{p}").stat().st_uid == hosts_uid("postgres")
                    for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                    if Path(f"/proc/{p}/cmdline").exists()
                )
            ),
            timeout_s=5,
            what="the tool and its child gone",
        )
        with pytest.raises(ExecutorError, match="no tool"):
            ex.run_tool("svc", "../bin/sh", [])
    finally:
        ex.close()


def hosts_uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def test_files_put_on_a_host_belong_to_the_units_user(hosts: HostsLab) -> None:
    ex = executor(hosts)
    data = hosts.data_dir / "nodes" / "svc"
    os.chown(data.parent, hosts_uid("postgres"), 0)
    try:
        ex.stop("svc")
        (data / "old").write_text("x")
        ex.reset_data_dir("svc")
        assert list(data.iterdir()) == []
        ex.put_files("svc", str(data), files={"standby.signal": "", "conf": "a = 'b'\n"})
        assert (data / "conf").read_text() == "a = 'b'\n"
        assert (data / "conf").stat().st_uid == hosts_uid("postgres")
        with pytest.raises(ExecutorError, match="a file name"):
            ex.put_files("svc", str(data), files={"../escape": ""})
        ex.restart("svc")
        with pytest.raises(ExecutorError, match="runs: stop it"):
            ex.reset_data_dir("svc")
        assert (data / "conf").exists()
    finally:
        ex.stop("svc")
        ex.close()


def test_steps_on_one_host_share_one_connection(hosts: HostsLab) -> None:
    log = hosts.host_dir("db-1") / "sshd.log"
    before = log.read_text().count("Accepted publickey")
    ex = executor(hosts)
    try:
        for _ in range(20):
            ex.is_running("svc")
    finally:
        ex.close()
    wait_until(lambda: "Accepted publickey" in log.read_text(), timeout_s=2, what="the log")
    assert log.read_text().count("Accepted publickey") - before == 1


def test_a_unit_that_restarts_always_is_started_again_by_its_host(hosts: HostsLab) -> None:
    hosts.add_unit(
        "db-1",
        "always.service",
        {
            "argv": [sys.executable, str(hosts.data_dir / "service.py")],
            "log": str(hosts.data_dir / "always.log"),
            "restart": "always",
        },
    )
    hosts.systemctl("db-1", "start", "always.service")
    first = int(hosts.systemctl("db-1", "show", "-p", "MainPID", "--value", "always.service"))
    os.kill(first, signal.SIGKILL)

    def again() -> bool:
        out = hosts.systemctl("db-1", "show", "-p", "MainPID", "--value", "always.service")
        return int(out) not in (0, first)

    wait_until(again, timeout_s=10, what="always.service started again")
    hosts.systemctl("db-1", "stop", "always.service")
    time.sleep(0.5)
    assert hosts.systemctl("db-1", "is-active", "always.service").strip() == "inactive"


def test_the_ssh_executor_refuses_a_component_without_a_host_and_a_host_without_known_keys(
    tmp_path: Path,
) -> None:
    key = str(tmp_path / "key")
    with pytest.raises(ExecutorConfigError, match="each names its host"):
        build_executor(
            "x",
            "ssh",
            {"components": {"a": {"unit": "a.service"}}, "known_hosts": key},
        )
    with pytest.raises(ExecutorConfigError, match="no host 'h2'"):
        build_executor(
            "x",
            "ssh",
            {
                "components": {"a": {"unit": "a.service", "host": "h2"}},
                "hosts": {"h1": {"address": "10.0.0.1", "user": "root", "key_file": key}},
                "known_hosts": key,
            },
        )
    with pytest.raises(ExecutorConfigError, match="known_hosts"):
        build_executor(
            "x",
            "systemd",
            {
                "components": {"a": {"unit": "a.service", "host": "h1"}},
                "hosts": {"h1": {"address": "10.0.0.1", "user": "root", "key_file": key}},
            },
        )
    with pytest.raises(ExecutorConfigError, match="unit"):
        build_executor("x", "systemd", {"components": {"a": {"unit": "a; rm -rf /"}}})
    with pytest.raises(ExecutorConfigError, match="unit"):  # an option, not a unit
        build_executor("x", "systemd", {"components": {"a": {"unit": "-Hroot@evil.service"}}})
    with pytest.raises(ExecutorConfigError, match="component or host name"):
        build_executor(
            "x", "systemd", {"components": {'x"; touch /tmp/p; "': {"unit": "a.service"}}}
        )


def test_the_multi_host_lab_leaves_no_namespace_link_cgroup_or_process() -> None:
    lab = HostsLab(lab_tmpdir("shop-hosts-down"), HostNet.new(("db-1", "app-1")))
    lab.up()
    service = lab.data_dir / "service.py"
    service.write_text(SERVICE)
    lab.add_unit(
        "app-1",
        "svc.service",
        {"argv": [sys.executable, str(service)], "log": str(lab.data_dir / "svc.log")},
    )
    lab.systemctl("app-1", "start", "svc.service")
    wait_until(lambda: len(unit_pids(lab, "app-1")) >= 2, timeout_s=10, what="its child")
    pids = unit_pids(lab, "app-1") + lab.net.pids("db-1")
    lab.net.hang("db-1")  # a hung host too
    lab.net.partition("app-1")
    assert lab.down() == []
    wait_until(lambda: not any(alive(p) for p in pids), timeout_s=5, what="every process gone")
    assert lab.leftovers() == []
