"""Overload: a flood of alerts never stops the loop nor a restart, a run whose worker died is
never left `running`, and reads never wait for the state store's write lock."""

from __future__ import annotations

import json
import math
import multiprocessing
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from controlplane import services, store
from controlplane.config import Settings
from controlplane.models import ActionRun, ActionState
from controlplane.runtime import (
    LOOPBACK,
    STATUS_TTL_S,
    ControlPlane,
    CoreAddress,
    WebControlPlane,
)
from lab.process import wait_until
from lab.stack import Stack
from remediation.executors.none import NoExecutor
from tests.conftest import stack_of_its_own
from tests.test_controlplane import Api, kill_shop, webhook
from web.alerts import IntakeLimit, SharedIntakeLimit

FLOOD = 3000
BATCH = 1000  # the webhook takes at most 1000 alerts a post


# -- in process ---------------------------------------------------------------------------------
def build(tmp_path: Path) -> ControlPlane:
    settings = Settings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'state.db'}",
            "instance_id": "cp-test",
            "services": [{"name": "svc", "component": "svc"}],
        }
    )
    return ControlPlane(settings, executor=NoExecutor())


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    built = build(tmp_path)
    yield built
    built.stop()


def within(call: Callable[[], Any], timeout_s: float) -> Any:
    """`call`'s answer, or a failure if it did not come within `timeout_s` (it waits on a lock)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result(timeout=timeout_s)


def running_run(cp: ControlPlane, started_s_ago: float) -> int:
    now = datetime.now(UTC)
    with store.transaction(cp.factory) as s:
        run = store.create_action_run(
            s,
            action="restart",
            target="svc",
            mode="auto",
            state=ActionState.RUNNING,
            owner=cp.settings.instance_id,
            requested_by="tests",
            reason="a worker that will die",
            params={},
            created_at=now - timedelta(seconds=started_s_ago),
            started_at=now - timedelta(seconds=started_s_ago),
        )
        assert run is not None
        return run.id


def state_of(cp: ControlPlane, run_id: int) -> ActionState:
    with store.read(cp.factory) as s:
        run = s.get(ActionRun, run_id)
        assert run is not None
        return ActionState(run.state)


def test_reads_go_on_while_a_writer_holds_the_lock(cp: ControlPlane, tmp_path: Path) -> None:
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None, timeout=0.1)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held
    try:
        _, checks = within(lambda: services.readiness(cp), timeout_s=5)
        assert checks["state_store"] is True
        assert within(lambda: services.health_summary(cp), timeout_s=5)["services"]["svc"]
        assert within(lambda: services.list_incidents(cp, None, 10), timeout_s=5) == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_run_whose_worker_died_is_abandoned_and_its_target_freed(cp: ControlPlane) -> None:
    stranded = running_run(cp, started_s_ago=60)  # ours, `running`, and no worker runs it
    cp.loop.run_cycle()
    assert state_of(cp, stranded) is ActionState.ABANDONED
    audit = services.get_action(cp, stranded)["audit"]
    assert [a["verb"] for a in audit] == ["abandon"]
    # The one-running-action-per-target lock is free again.
    fresh = running_run(cp, started_s_ago=0)
    assert state_of(cp, fresh) is ActionState.RUNNING


def test_a_run_in_flight_or_just_claimed_is_not_abandoned(cp: ControlPlane) -> None:
    in_flight = running_run(cp, started_s_ago=60)
    cp.engine.in_flight.add(in_flight)
    try:
        cp.loop.run_cycle()
        assert state_of(cp, in_flight) is ActionState.RUNNING
    finally:
        cp.engine.in_flight.discard(in_flight)
    cp.loop.run_cycle()
    assert state_of(cp, in_flight) is ActionState.ABANDONED
    just_claimed = running_run(cp, started_s_ago=0)  # its worker starts in a moment
    cp.loop.run_cycle()
    assert state_of(cp, just_claimed) is ActionState.RUNNING


def test_a_finish_waits_out_a_held_write_lock(cp: ControlPlane, tmp_path: Path) -> None:
    run_id = running_run(cp, started_s_ago=0)
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    finisher = threading.Thread(
        target=cp.engine._finish, args=(run_id, ActionState.SUCCEEDED, {}, "test")
    )
    finisher.start()
    finisher.join(timeout=0.5)
    assert finisher.is_alive()  # it waits for the lock rather than failing
    holder.execute("ROLLBACK")
    holder.close()
    finisher.join(timeout=30)
    assert state_of(cp, run_id) is ActionState.SUCCEEDED


# -- on a real stack ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flooded() -> Iterator[Stack]:
    """A stack of its own: thousands of incidents would crowd the shared stack's lists."""
    with stack_of_its_own("overload", products=20) as lab:
        yield lab


def flood(api: Api, prefix: str, status: str) -> list[int]:
    """FLOOD alerts in posts of BATCH, three posts at once, as Alertmanager would send them."""

    def post(batch: int) -> int:
        alerts = [
            webhook("FloodTest", status, f"{prefix}-{batch}-{i}", service=f"flood-{i % 50}")[
                "alerts"
            ][0]
            for i in range(BATCH)
        ]
        body = webhook("FloodTest", status, "unused") | {"alerts": alerts}
        response = requests.post(
            f"{api.url}/api/v1/alerts", json=body, headers=api.hook, timeout=120
        )
        return response.status_code

    with ThreadPoolExecutor(FLOOD // BATCH) as pool:
        return list(pool.map(post, range(FLOOD // BATCH)))


def restarted(api: Api, target: str) -> bool:
    """A restart of `target` succeeded (by its run: the flood pushes its incident off the
    incident list's first page)."""
    runs = api.get("/actions?action=restart&limit=50")["actions"]
    return any(r["target"] == target and r["state"] == "succeeded" for r in runs)


def open_flood_incidents(api: Api, prefix: str) -> int:
    found = api.get("/incidents?state=open&limit=500")["incidents"]
    return sum(1 for i in found if i["fingerprint"].startswith(f"alert:{prefix}-"))


def test_reads_on_the_stack_go_on_while_a_writer_holds_the_lock(flooded: Stack) -> None:
    api = Api(flooded)
    wait_until(
        lambda: requests.get(f"{api.url}/readyz", timeout=5).status_code == 200,
        timeout_s=60,
        what="the control plane ready before the lock is taken",
    )
    holder = sqlite3.connect(flooded.layout.data_dir / "controlplane" / "state.db", timeout=30)
    holder.isolation_level = None
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert requests.get(f"{api.url}/readyz", timeout=5).status_code == 200
        assert requests.get(f"{api.url}/healthz", timeout=5).status_code == 200
        assert api.get("/health")["services"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_flood_of_alerts_neither_stops_the_loop_nor_a_restart(flooded: Stack) -> None:
    api = Api(flooded)
    prefix = f"flood{uuid.uuid4().hex[:6]}"
    wait_until(
        lambda: requests.get(f"{api.url}/readyz", timeout=5).status_code == 200,
        timeout_s=60,
        what="the control plane ready",
    )
    before = api.cycles()
    with ThreadPoolExecutor(1) as pool:
        posting = pool.submit(flood, api, prefix, "firing")
        kill_shop(flooded, "shop-1")
        # The loop keeps cycling while the flood comes in.
        api.wait_cycles(3)
        assert posting.result(timeout=180) == [200] * (FLOOD // BATCH)
    # Looked up among the restart runs: 3,000 flood incidents push shop-1's off any page.
    wait_until(
        lambda: any(
            r["target"] == "shop-1" and r["state"] == "succeeded"
            for r in api.get("/actions?action=restart&limit=50")["actions"]
        ),
        timeout_s=120,
        interval_s=0.5,
        what="shop-1 restarted and verified during the flood",
    )
    wait_until(
        lambda: open_flood_incidents(api, prefix) >= 500,  # the list's page: at least that many
        timeout_s=120,
        interval_s=0.5,
        what="the flood's incidents opened",
    )
    assert flood(api, prefix, "resolved") == [200] * (FLOOD // BATCH)
    wait_until(
        lambda: open_flood_incidents(api, prefix) == 0,
        timeout_s=180,
        interval_s=0.5,
        what="the flood's incidents resolved",
    )
    assert api.cycles() > before + 3
    assert requests.get(f"{api.url}/readyz", timeout=5).status_code == 200


def test_the_intake_takes_a_burst_then_refuses_with_the_wait_until_its_bucket_refills() -> None:
    limit = IntakeLimit(per_minute=60, burst=100)  # one alert a second once the burst is spent
    assert limit.take("am", 100, now=0.0) == 0
    assert limit.take("am", 10, now=0.0) == pytest.approx(10.0)
    assert limit.take("elsewhere", 50, now=0.0) == 0  # each source its own bucket
    assert limit.take("am", 10, now=10.0) == 0
    assert limit.take("am", 101, now=1000.0) == math.inf  # never fits: a 400, not a 429


def test_every_web_worker_process_takes_from_one_shared_bucket_per_source() -> None:
    limit = SharedIntakeLimit(per_minute=60, burst=100)
    context = multiprocessing.get_context("fork")  # as gunicorn forks its workers
    workers = [context.Process(target=limit.take, args=("am", 40, 0.0)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert limit.take("am", 30, now=0.0) == pytest.approx(10.0)  # 20 left of 100, not 60
    assert limit.take("elsewhere", 100, now=0.0) == 0  # each source its own bucket
    assert limit.take("am", 20, now=0.0) == 0
    assert limit.take("am", 10, now=10.0) == 0  # refilled at one a second
    assert limit.take("am", 101, now=1000.0) == math.inf  # never fits: a 400, not a 429


def test_the_shared_intake_still_limits_each_source_when_there_are_more_sources_than_slots() -> (
    None
):
    limit = SharedIntakeLimit(per_minute=60, burst=10)
    for n in range(2 * SharedIntakeLimit.SLOTS):
        assert limit.take(f"10.0.{n // 256}.{n % 256}", 10, now=0.0) == 0
        assert limit.take(f"10.0.{n // 256}.{n % 256}", 1, now=0.0) == pytest.approx(1.0)


# -- a web worker's view of a slow leader process -----------------------------------------------
class _Leader(BaseHTTPRequestHandler):
    """A fake of the leader process's status endpoint whose answers can be made late."""

    delay_s = 0.0
    last_cycle_at = ""

    def do_GET(self) -> None:
        time.sleep(type(self).delay_s)
        body = json.dumps(
            {"scheduler_running": True, "is_leader": True, "last_cycle_at": self.last_cycle_at}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_leader_slow_to_answer_a_worker_is_ready_until_its_loop_is_truly_stale(
    cp: ControlPlane,
) -> None:
    now = [datetime.now(UTC)]
    _Leader.delay_s, _Leader.last_cycle_at = 0.0, now[0].isoformat()
    leader = ThreadingHTTPServer((LOOPBACK, 0), _Leader)
    threading.Thread(target=leader.serve_forever, daemon=True).start()
    core = CoreAddress(wake_port=9, status_url=f"http://{LOOPBACK}:{leader.server_port}")
    web = WebControlPlane(cp.settings, core, clock=lambda: now[0])
    try:
        assert services.readiness(web)[0]
        _Leader.delay_s = 1.5  # past the worker's 1 s: it does not answer in time
        time.sleep(STATUS_TTL_S)
        ready, checks = services.readiness(web)
        assert ready, checks  # a late answer is not an outage
        now[0] += timedelta(seconds=60)  # but a loop last seen a minute ago is
        ready, checks = services.readiness(web)
        assert not ready and checks["loop_recent"] is False
    finally:
        leader.shutdown()
        leader.server_close()
        web.stop()


def test_a_worker_whose_leader_process_is_gone_is_not_ready_at_once(cp: ControlPlane) -> None:
    now = datetime.now(UTC)
    _Leader.delay_s, _Leader.last_cycle_at = 0.0, now.isoformat()
    leader = ThreadingHTTPServer((LOOPBACK, 0), _Leader)
    threading.Thread(target=leader.serve_forever, daemon=True).start()
    core = CoreAddress(wake_port=9, status_url=f"http://{LOOPBACK}:{leader.server_port}")
    web = WebControlPlane(cp.settings, core, clock=lambda: now)
    try:
        assert services.readiness(web)[0]
        leader.shutdown()
        leader.server_close()  # nothing listens on its port any more: refused
        time.sleep(STATUS_TTL_S)
        ready, checks = services.readiness(web)
        assert not ready and checks["scheduler"] is False
    finally:
        web.stop()


def test_a_short_wait_for_the_write_lock_is_that_transaction_s_alone(
    cp: ControlPlane, tmp_path: Path
) -> None:
    engine = store.make_engine(cp.settings.database_url)  # one pooled connection, reused
    factory = store.session_factory(engine)
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with (
            pytest.raises(OperationalError) as refused,
            store.transaction(factory, lock_wait_s=0.05) as s,
        ):
            s.execute(text("SELECT 1"))
        assert store.is_locked(refused.value)
        threading.Timer(0.5, holder.rollback).start()  # held past the short wait, then freed
        with store.transaction(factory) as s:  # the same connection, waiting as long as ever
            s.execute(text("SELECT 1"))
        assert engine.pool.checkedin() == 1
    finally:
        holder.close()
        engine.dispose()
