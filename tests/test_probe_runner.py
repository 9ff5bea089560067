"""The probe runner against real servers on loopback ports: every probe on its interval, a hung
run holding up no other, a health change waking the loop, `probe_now`, never two runs of one
probe at once, and the asyncio probes judging as the blocking ones do."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from controlplane import store
from controlplane.config import Settings
from controlplane.models import Incident, IncidentState, ProbeRun
from controlplane.runtime import ControlPlane
from probes.base import Health, Params, Probe, ProbeResult, opened
from probes.http import HttpProbe
from probes.registry import PROBES, build_probe
from probes.tcp import TcpProbe

# The fleet listens on a loopback address of its own: a port it takes may have been another
# test's or lab's, still probed at 127.0.0.1, and those connections must not count as ours.
HOST = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
BODIES = {
    "/ok": (200, "ok"),
    "/fail": (503, "unavailable"),
    "/degraded": (200, '{"status":"degraded"}'),
}


class Fleet:
    """Real servers on loopback ports, served by one event loop in a thread of the test: HTTP
    (`/ok`, `/fail`, `/degraded`, `/chunked`, optionally slow), plain TCP listeners that accept
    and close, and silent ones that accept and never answer. Counts connections per port and
    the most ever open at once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.servers: dict[int, asyncio.Server] = {}
        self.connections: Counter[int] = Counter()
        self.open_now: Counter[int] = Counter()
        self.most_open: Counter[int] = Counter()
        self.clients: dict[int, set[asyncio.StreamWriter]] = {}
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet", daemon=True)
        self.thread.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def http(self, count: int, delay_s: float = 0.0) -> list[int]:
        return [self._call(self._serve(self._answer_http, delay_s)) for _ in range(count)]

    def tcp(self, count: int) -> list[int]:
        return [self._call(self._serve(self._close_at_once, 0.0)) for _ in range(count)]

    def silent(self, count: int) -> list[int]:
        return [self._call(self._serve(self._never_answer, 0.0)) for _ in range(count)]

    def close(self, port: int) -> None:
        """Stop listening on `port`: a new connection is refused."""
        self._call(self._close(port))

    def stop(self) -> None:
        self._call(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _shutdown(self) -> None:
        for port in list(self.servers):
            await self._close(port)
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _close(self, port: int) -> None:
        server = self.servers.pop(port)
        server.close()
        for writer in self.clients.pop(port, set()):
            writer.close()
        await server.wait_closed()

    async def _serve(self, handle: Callable[..., Any], delay_s: float) -> int:
        async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            port = writer.get_extra_info("sockname")[1]
            self.connections[port] += 1
            self.open_now[port] += 1
            self.most_open[port] = max(self.most_open[port], self.open_now[port])
            self.clients.setdefault(port, set()).add(writer)
            try:
                await handle(reader, writer, delay_s)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                self.open_now[port] -= 1
                self.clients.get(port, set()).discard(writer)
                writer.close()

        server = await asyncio.start_server(counted, HOST, 0)
        port: int = server.sockets[0].getsockname()[1]
        self.servers[port] = server
        return port

    @staticmethod
    async def _answer_http(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        if delay_s:
            await asyncio.sleep(delay_s)
        if path == "/chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"2\r\nok\r\n0\r\n\r\n"
            )
        else:
            status, body = BODIES.get(path, (404, "no such page"))
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
        await writer.drain()

    @staticmethod
    async def _close_at_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
    ) -> None:
        return None

    @staticmethod
    async def _never_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
    ) -> None:
        await reader.read()  # until the prober gives up and closes


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    servers = Fleet()
    yield servers
    servers.stop()


class StuckParams(Params):
    pass


class StuckProbe(Probe):
    """A blocking kind (no `check_async`) that ignores its timeout until released: a bug."""

    kind = "stuck"
    Params = StuckParams
    release = threading.Event()
    calls = 0

    def check(self) -> ProbeResult:
        StuckProbe.calls += 1
        StuckProbe.release.wait(30)
        return ProbeResult(Health.UP, "released at last")


def probe(name: str, kind: str, params: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "service": "fleet", "params": params, **spec}


def http_probe(name: str, port: int, path: str = "/ok", **spec: Any) -> dict[str, Any]:
    return probe(name, "http", {"url": f"http://{HOST}:{port}{path}"}, **spec)


def tcp_probe(name: str, port: int, **spec: Any) -> dict[str, Any]:
    return probe(name, "tcp", {"host": HOST, "port": port}, **spec)


def control_plane(tmp_path: Path, probes: list[dict[str, Any]], **settings: Any) -> ControlPlane:
    return ControlPlane(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'state.db'}",
            services=[{"name": "fleet"}],
            probes=probes,
            **settings,
        )
    )


def runs_by_probe(cp: ControlPlane) -> dict[str, int]:
    with store.read(cp.factory) as s:
        rows = s.execute(select(ProbeRun.probe, func.count()).group_by(ProbeRun.probe))
        return {name: count for name, count in rows}


def runs_of(cp: ControlPlane, name: str) -> list[ProbeRun]:
    """Oldest first."""
    with store.read(cp.factory) as s:
        return list(reversed(store.recent_probe_runs(s, name, 10_000)))


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def probe_up_gauges(cp: ControlPlane) -> dict[str, float]:
    text = generate_latest(cp.metrics.registry).decode()
    return {
        s.labels["probe"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "cp_probe_up"
        for s in family.samples
    }


def test_a_thousand_probes_each_run_once_per_interval(tmp_path: Path, fleet: Fleet) -> None:
    # What is correct, on any machine: each probe runs once per interval, every run is
    # recorded, and a healthy target reads UP. 200 runs/s (the scale benchmark's design point)
    # and each run's timeout a whole interval, so a slow machine takes longer but never turns a
    # healthy target DOWN; how fast the runner is belongs to `make bench-scale`.
    interval_s = 5.0
    http_ports, tcp_ports = fleet.http(500), fleet.tcp(500)
    spec = {"interval_s": interval_s, "timeout_s": interval_s}
    probes = [http_probe(f"h{i}", port, **spec) for i, port in enumerate(http_ports)]
    probes += [tcp_probe(f"t{i}", port, **spec) for i, port in enumerate(tcp_ports)]
    ports = {p["name"]: port for p, port in zip(probes, http_ports + tcp_ports, strict=True)}
    cp = control_plane(tmp_path, probes)
    started = time.monotonic()
    cp.start()
    try:
        wait_for(
            lambda: len(counts := runs_by_probe(cp)) == 1000 and min(counts.values()) >= 3,
            timeout_s=240,
            what="every probe run three times",
        )
    finally:
        cp.stop()
    elapsed_s = time.monotonic() - started
    counts = runs_by_probe(cp)
    assert len(counts) == 1000 and min(counts.values()) >= 3
    # Once per interval, no more (the first run comes at once, the last may be cut short).
    assert max(counts.values()) <= elapsed_s / interval_s + 1
    # Every run the servers saw was recorded, bar one cut short by the stop (a TCP server
    # may take its last connection from the backlog a moment after the prober closed it).
    wait_for(
        lambda: all(fleet.connections[port] >= counts[name] for name, port in ports.items()),
        timeout_s=60,
        what="the servers took every connection",
    )
    for name, port in ports.items():
        assert fleet.connections[port] <= counts[name] + 1, name
    with store.read(cp.factory) as s:
        healths = set(s.scalars(select(ProbeRun.health).distinct()))
    assert healths == {Health.UP}
    assert set(probe_up_gauges(cp).values()) == {1.0}


def test_a_probe_run_that_hangs_past_its_timeout_does_not_hold_up_the_others(
    tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PROBES, "stuck", f"{__name__}:StuckProbe")
    StuckProbe.calls = 0
    StuckProbe.release.clear()
    quick = {"interval_s": 0.5, "timeout_s": 0.3}
    # The healthy ones get a whole interval to answer: on a slow machine a loopback answer
    # may take longer than 0.3 s, and this test is about the stuck one not holding them up.
    healthy = {"interval_s": 1.0, "timeout_s": 1.0}
    probes = [
        http_probe("silent", fleet.silent(1)[0], **quick),
        probe("stuck", "stuck", {}, **quick),
    ]
    probes += [http_probe(f"h{i}", port, **healthy) for i, port in enumerate(fleet.http(10))]
    probes += [tcp_probe(f"t{i}", port, **healthy) for i, port in enumerate(fleet.tcp(10))]
    cp = control_plane(tmp_path, probes)
    cp.start()
    try:
        wait_for(
            lambda: (
                len(counts := runs_by_probe(cp)) == 22
                and min(n for name, n in counts.items() if name != "stuck") >= 5
            ),
            timeout_s=120,
            what="the others run five times each",
        )
        silent, stuck = runs_of(cp, "silent"), runs_of(cp, "stuck")
        # The async probe gave up at its own timeout, each time; the next run came on time.
        assert {r.health for r in silent} == {Health.DOWN}
        assert all("no answer within 0.3 s" in r.summary for r in silent)
        # The blocking one was reported DOWN once it ran past its timeout, and never started
        # again beside itself while its thread was stuck.
        assert [r.health for r in stuck] == [Health.DOWN]
        assert "still running" in stuck[0].summary
        assert StuckProbe.calls == 1
        others = [n for n in runs_by_probe(cp) if n[0] in "ht"]
        assert all(r.health == Health.UP for n in others for r in runs_of(cp, n))
    finally:
        StuckProbe.release.set()
        cp.stop()


def test_a_probes_health_change_still_wakes_the_loop(tmp_path: Path, fleet: Fleet) -> None:
    (port,) = fleet.tcp(1)
    # The loop ticks once an hour on its own: only a wake can make it decide sooner.
    cp = control_plane(
        tmp_path,
        [tcp_probe("cache-port", port, interval_s=0.5, timeout_s=0.3, failures_to_open=1)],
        loop_interval_s=3600,
    )
    cp.start()
    try:
        wait_for(lambda: runs_by_probe(cp).get("cache-port", 0) >= 1, 10, "a first run")
        assert runs_of(cp, "cache-port")[-1].health == Health.UP
        fleet.close(port)

        def opened() -> bool:
            with store.read(cp.factory) as s:
                found = s.scalars(
                    select(Incident).where(
                        Incident.fingerprint == "probe:cache-port",
                        Incident.state == IncidentState.OPEN,
                    )
                ).first()
            return found is not None

        wait_for(opened, timeout_s=15, what="the incident opened by a woken loop")
    finally:
        cp.stop()


def test_probe_now_runs_a_probe_at_once(tmp_path: Path, fleet: Fleet) -> None:
    (port,) = fleet.http(1)
    # Its next tick is an hour away: only probe_now can run it again sooner.
    cp = control_plane(tmp_path, [http_probe("shop-ready", port, interval_s=3600)])
    cp.probe_now("shop-ready")  # before start: nothing to do, and no error
    cp.start()
    try:
        wait_for(lambda: runs_by_probe(cp).get("shop-ready", 0) == 1, 10, "the first run")
        watcher = threading.Thread(target=cp.probe_now, args=("shop-ready",), name="watcher")
        watcher.start()
        watcher.join()
        wait_for(lambda: runs_by_probe(cp).get("shop-ready", 0) == 2, 10, "a run at once")
        assert fleet.connections[port] == 2
        cp.probe_now("no-such-probe")  # ignored
    finally:
        cp.stop()


def test_runs_of_one_probe_never_overlap_however_often_it_is_asked_for(
    tmp_path: Path, fleet: Fleet
) -> None:
    (port,) = fleet.http(1, delay_s=0.2)
    # A timeout well beyond the server's 0.2 s: on a slow machine the run still answers UP.
    cp = control_plane(tmp_path, [http_probe("slow-shop", port, interval_s=2.0, timeout_s=2.0)])
    cp.start()
    try:
        for _ in range(40):
            cp.probe_now("slow-shop")
            time.sleep(0.02)
        wait_for(lambda: runs_by_probe(cp).get("slow-shop", 0) >= 4, 60, "a few runs")
    finally:
        cp.stop()
    assert fleet.most_open[port] == 1
    assert {r.health for r in runs_of(cp, "slow-shop")} == {Health.UP}


def test_run_probe_still_records_one_run_at_once(tmp_path: Path, fleet: Fleet) -> None:
    (port,) = fleet.http(1)
    cp = control_plane(tmp_path, [http_probe("shop-ready", port)])
    try:
        result = cp.run_probe(cp.settings.probes[0])
        assert result.health is Health.UP
        (run,) = runs_of(cp, "shop-ready")
        assert (run.health, run.summary) == (Health.UP, "HTTP 200")
        assert cp.last_health["shop-ready"] is Health.UP
    finally:
        cp.stop()


@pytest.mark.parametrize("path", ["/ok", "/fail", "/degraded", "/chunked", "/missing"])
def test_the_asyncio_http_probe_judges_as_the_blocking_one(fleet: Fleet, path: str) -> None:
    (port,) = fleet.http(1)
    params = {
        "url": f"http://{HOST}:{port}{path}",
        "body_contains": "o",
        "degraded_body_contains": '"status":"degraded"',
    }
    http = build_probe("http", "shop-ready", params, 2.0)
    assert isinstance(http, HttpProbe)
    blocking = http.run()
    in_loop = asyncio.run(http.check_async())
    assert (in_loop.health, in_loop.summary, dict(in_loop.details)) == (
        blocking.health,
        blocking.summary,
        dict(blocking.details),
    )


def test_the_asyncio_probes_report_a_refused_port_and_a_silent_one_as_down(
    fleet: Fleet,
) -> None:
    with socket.socket() as bound:  # bound, not listening: a connection is refused
        bound.bind((HOST, 0))
        refused = bound.getsockname()[1]
        (silent,) = fleet.silent(1)
        for port in (refused, silent):
            http = build_probe("http", "h", {"url": f"http://{HOST}:{port}/"}, 0.3)
            assert isinstance(http, HttpProbe)
            assert asyncio.run(http.check_async()).health is Health.DOWN
        tcp = build_probe("tcp", "t", {"host": HOST, "port": refused}, 0.3)
        assert isinstance(tcp, TcpProbe)
        result = asyncio.run(tcp.check_async())
        assert result.health is Health.DOWN and "ConnectionRefusedError" in result.summary


def test_a_connection_that_opens_as_its_caller_is_cancelled_is_closed_not_leaked() -> None:
    """The race behind an "unclosed transport" warning: the connection opens in the same moment
    the probe's timeout cancels it, and asyncio delivers the cancellation, not the connection.
    (The connection here is a fake object: the race itself cannot be timed with a real one.)"""
    closed: list[str] = []

    async def scenario() -> None:
        connecting: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        caller = asyncio.ensure_future(opened(connecting, closed.append))
        await asyncio.sleep(0)  # the caller now waits for the connection
        connecting.set_result("fake connection")
        caller.cancel()  # in the same moment: its timeout
        with pytest.raises(asyncio.CancelledError):
            await caller

    asyncio.run(scenario())
    assert closed == ["fake connection"]
