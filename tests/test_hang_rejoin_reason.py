"""A standby that cannot be started again (here: its port taken) is no redundancy, and the
rejoin that keeps failing escalates quickly with the server's own reason, not with what a
doomed fallback (single-user crash recovery, which cannot run a standby) said."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.chaos.base import kill_component
from lab.layout import HOST
from lab.process import wait_until
from lab.stack import Stack
from tests.conftest import stack_of_its_own
from tests.test_controlplane import Api
from tests.test_failover import runs_of, view, wait_redundant


@pytest.fixture(scope="module")
def lab() -> Iterator[Stack]:
    with stack_of_its_own("shop-hang-rejoin", products=50) as stack:
        yield stack


def hold_port(port: int, timeout_s: float = 10) -> socket.socket:
    """Listen on `port` (as another program would) as soon as it is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket()
        # As servers do: the killed server's connections in TIME_WAIT do not hold the port, a
        # listening socket does (the server's own bind, with the same option, is refused).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen(1)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def finished(api: Api) -> list[dict[str, Any]]:
    return [r for r in runs_of(api, "rejoin") if r["state"] not in ("pending", "running")]


def test_a_standby_that_cannot_start_escalates_the_rejoin_with_the_servers_own_reason(
    lab: Stack,
) -> None:
    api = Api(lab)
    primary = wait_redundant(lab)
    standby = "pg1" if primary == "pg0" else "pg0"
    before = {r["id"] for r in finished(api)}
    kill_component(view(lab), standby)
    sock = hold_port(lab.layout.pg_port(int(standby[-1])))
    try:
        # Five attempts, 1 + 2 + 4 + 8 s apart: each fails at once, not after a wait for a
        # server that exited at its start to stream.
        wait_until(
            lambda: any(r["id"] not in before and r["state"] != "skipped" for r in finished(api)),
            timeout_s=90,
            what="the rejoin given up",
        )
        [run] = [r for r in finished(api) if r["id"] not in before and r["state"] != "skipped"]
        error = str(run["output"].get("error"))
        assert run["state"] == "failed"
        assert f"{standby} stopped right after its start" in error, error
        assert "Address already in use" in error, error
        assert "single-user" not in error, error
    finally:
        sock.close()
