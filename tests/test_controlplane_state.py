"""The control plane's safety on its state store (PostgreSQL, from the lab): one leader among
two, no action run twice after a crash, notifications, and configuration errors."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Message

from controlplane import store
from controlplane.config import Settings
from controlplane.errors import ConfigError
from controlplane.metrics import Metrics
from controlplane.models import ActionRun, ActionState, AuditEntry, Incident, IncidentState
from controlplane.notify import Notifier
from controlplane.runtime import ControlPlane
from lab.layout import find_free_base_port
from lab.process import wait_until
from lab.stack import Stack
from remediation.executors.none import NoExecutor


@pytest.fixture
def state_url(stack: Stack) -> Iterator[str]:
    """A fresh PostgreSQL database on the lab's primary for each test."""
    name = f"cp_{uuid.uuid4().hex[:10]}"
    with stack.connect("pg0") as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield (
        f"postgresql+psycopg://postgres@127.0.0.1:{stack.layout.pg_port(0)}/{name}"
        f"?passfile={stack.pg_auth.passfile}"
    )
    with stack.connect("pg0") as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def settings(url: str, instance: str, **extra: Any) -> Settings:
    return Settings(database_url=url, instance_id=instance, lease_ttl_s=10, **extra)


def test_two_control_planes_on_one_state_store_elect_one_leader(state_url: str) -> None:
    now = datetime.now(UTC)
    clock = {"now": now}
    first = ControlPlane(settings(state_url, "cp-a"), clock=lambda: clock["now"])
    second = ControlPlane(settings(state_url, "cp-b"), clock=lambda: clock["now"])
    try:
        first.loop.run_cycle(now)
        said = second.loop.run_cycle(now)
        assert first.loop.is_leader and not second.loop.is_leader
        assert said.startswith("standby")
        # The leader renews; the other stays standby while the lease is fresh.
        first.loop.run_cycle(now + timedelta(seconds=5))
        assert second.loop.run_cycle(now + timedelta(seconds=12)).startswith("standby")
        # The leader stops renewing (it died): after the lease expires the other takes over.
        second.loop.run_cycle(now + timedelta(seconds=30))
        assert second.loop.is_leader
        assert first.loop.run_cycle(now + timedelta(seconds=31)).startswith("standby")
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("action", ["restart", "failover"])
def test_a_run_left_running_by_a_dead_control_plane_is_abandoned_not_run_again(
    state_url: str, action: str
) -> None:
    now = datetime.now(UTC)
    seed = ControlPlane(settings(state_url, "cp-dead"))
    with store.transaction(seed.factory) as s:
        incident = store.open_incident(
            s,
            fingerprint="probe:x",
            kind="x",
            source="probe",
            target="shop-0",
            severity="critical",
            summary="x",
            labels={},
            detected_at=now,
            opened_at=now,
        )
        assert incident is not None
        run = store.create_action_run(
            s,
            incident_id=incident.id,
            action=action,
            target="shop-0",
            mode="auto",
            state=ActionState.RUNNING,
            requested_by="policy:p",
            reason="r",
            params={},
            created_at=now,
            started_at=now,
            owner="cp-dead",
            attempts=1,  # it had begun to execute: half done, for a failover
        )
        assert run is not None
        run_id, incident_id = run.id, incident.id
    seed.stop()

    executor = NoExecutor()  # any restart would fail loudly; none must be attempted
    survivor = ControlPlane(settings(state_url, "cp-new"), executor=executor)
    try:
        survivor.loop.run_cycle(now + timedelta(seconds=1))
        survivor.loop.run_cycle(now + timedelta(seconds=2))
        with store.transaction(survivor.factory) as s:
            run = s.get(ActionRun, run_id)
            assert run is not None and run.state == ActionState.ABANDONED
            verbs = [a.verb for a in store.audit_of_run(s, run_id)]
            timeline = [e.kind for e in store.incident_timeline(s, incident_id)]
            runs = store.runs_of_incidents(s, [incident_id])
            closed = s.get(Incident, incident_id)
            assert closed is not None
            state = closed.state
        assert verbs == ["abandon"]
        assert len(runs) == 1 and state == IncidentState.OPEN
        if action == "restart":
            # A restart may start over: its incident's next try, a run of its own, after
            # the backoff; the incident stays open and nobody is paged for it yet.
            assert runs[0].retry and "escalated" not in timeline
            assert closed.escalated_at is None
        else:
            # A failover left half done is a human's to look at: escalated, never retried.
            assert not runs[0].retry and "escalated" in timeline
            assert closed.escalated_at is not None
        with store.transaction(survivor.factory) as s:
            again = dict(
                incident_id=incident_id,
                action=action,
                target="shop-0",
                mode="auto",
                state=ActionState.SKIPPED,
                requested_by="x",
                reason="x",
                params={},
                created_at=now,
            )
            # The same try is never written twice (the database refuses it); the next is.
            assert store.create_action_run(s, **again) is None
            assert store.create_action_run(s, **again, try_number=2) is not None
    finally:
        survivor.stop()


def test_only_one_of_many_workers_claims_a_pending_run(state_url: str) -> None:
    now = datetime.now(UTC)
    cp = ControlPlane(settings(state_url, "cp-claim"))
    try:
        with store.transaction(cp.factory) as s:
            run = store.create_action_run(
                s,
                incident_id=None,
                action="restart",
                target="shop-0",
                mode="auto",
                state=ActionState.PENDING,
                requested_by="x",
                reason="x",
                params={},
                created_at=now,
            )
            assert run is not None
            run_id = run.id
        wins: list[bool] = []

        def claim() -> None:
            with store.transaction(cp.factory) as s:
                wins.append(
                    store.change_run_state(
                        s, run_id, ActionState.PENDING, ActionState.RUNNING, owner="w"
                    )
                )

        threads = [threading.Thread(target=claim) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 1
    finally:
        cp.stop()


class Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Mailbox:
    """A real SMTP server (aiosmtpd) on a free loopback port, and the messages it took."""

    port: int
    messages: list[Any]


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(find_free_base_port(), [])

    class Inbox(Message):  # type: ignore[misc]
        def handle_message(self, message: Any) -> None:
            box.messages.append(message)

    smtp = Controller(Inbox(), hostname="127.0.0.1", port=box.port)
    smtp.start()
    yield box
    smtp.stop()


def test_an_opened_incident_is_notified_by_webhook_and_email(
    state_url: str, mailbox: Mailbox
) -> None:
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    Hook.received.clear()
    cp = ControlPlane(
        settings(
            state_url,
            "cp-notify",
            notify_webhook_url=f"http://127.0.0.1:{hook.server_port}/hook",
            smtp_host="127.0.0.1",
            smtp_port=mailbox.port,
            smtp_to="oncall@example.invalid",
            services=[{"name": "gone"}],
            probes=[
                {
                    "name": "gone-tcp",
                    "kind": "tcp",
                    "service": "gone",
                    "interval_s": 1,
                    "timeout_s": 0.5,
                    "failures_to_open": 1,
                    "params": {"port": 9},
                }
            ],
        )
    )
    try:
        cp.run_probe(cp.settings.probes[0])
        cp.loop.run_cycle()
        wait_until(
            lambda: bool(Hook.received) and bool(mailbox.messages),
            timeout_s=10,
            what="both notifications",
        )
        assert Hook.received[0]["event"] == "open"
        assert Hook.received[0]["target"] == "gone"
        subject = " ".join(str(mailbox.messages[0]["Subject"]).split())  # unfold the header
        assert subject.startswith("[open] gone-tcp")
        with store.transaction(cp.factory) as s:
            [incident] = store.open_incidents(s)
            assert incident.kind == "gone-tcp"
    finally:
        cp.stop()
        hook.shutdown()
        hook.server_close()


def test_a_summary_from_outside_with_a_newline_is_still_mailed_on_one_subject_line(
    state_url: str, mailbox: Mailbox
) -> None:
    config = settings(
        state_url,
        "cp-notify",
        smtp_host="127.0.0.1",
        smtp_port=mailbox.port,
        smtp_to="oncall@example.invalid",
    )
    notifier = Notifier(config, Metrics())
    try:
        hostile = "Forged\nBcc: attacker@example.invalid\n\ud800"
        [sent] = notifier.notify("open", hostile, {"summary": hostile})
        sent.result(timeout=10)
        wait_until(lambda: bool(mailbox.messages), timeout_s=10, what="the e-mail")
        [mail] = mailbox.messages
        assert mail["Bcc"] is None  # no header forged
        assert str(mail["Subject"]).startswith("[open] Forged\\nBcc: attacker")
    finally:
        notifier.shutdown()


def test_bad_targets_fail_at_start_naming_the_key(tmp_path: Path) -> None:
    targets = tmp_path / "targets.toml"
    targets.write_text(
        '[[services]]\nname = "a"\n[[probes]]\nname = "p"\nkind = "http"\nservice = "b"\n'
    )
    with pytest.raises(ConfigError, match=r"probes\[0\]\.service"):
        Settings.load(environ={}, targets_file=targets)
    targets.write_text(
        '[[services]]\nname = "a"\n[[probes]]\nname = "p"\nkind = "http"\n'
        'service = "a"\ninterval_s = 1\ntimeout_s = 5\n'
    )
    with pytest.raises(ConfigError, match=r"probes\[0\]"):
        Settings.load(environ={}, targets_file=targets)
    with pytest.raises(ConfigError, match=r"listen_port"):
        Settings.load(environ={"CP_LISTEN_PORT": "ninety"})


def test_an_unknown_probe_param_fails_the_control_plane_at_start(tmp_path: Path) -> None:
    bad = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        services=[{"name": "a"}],
        probes=[{"name": "p", "kind": "http", "service": "a", "params": {"urll": "x"}}],
    )
    with pytest.raises(ConfigError, match=r"probes\[0\].*params\.url"):
        ControlPlane(bad)


def test_the_sqlite_state_store_is_migrated_and_keeps_probe_history_bounded(
    tmp_path: Path,
) -> None:
    cp = ControlPlane(
        Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", probe_history_keep=10)
    )
    now = datetime.now(UTC)
    try:
        with store.transaction(cp.factory) as s:
            store.record_probe_runs(
                s,
                [
                    {"probe": "p", "kind": "tcp", "target": "t", "health": "up", "latency_ms": 1,
                     "summary": "ok", "details": {}, "at": now + timedelta(seconds=n)}
                    for n in range(25)
                ],
            )  # fmt: skip
        cp.prune()
        with store.transaction(cp.factory) as s:
            kept = store.recent_probe_runs(s, "p", 100)
            assert len(kept) == 10
            assert kept[0].at == now + timedelta(seconds=24)
            assert s.query(Incident).count() == 0 and s.query(AuditEntry).count() == 0
    finally:
        cp.stop()


def test_one_action_at_a_time_per_target(state_url: str) -> None:
    now = datetime.now(UTC)
    cp = ControlPlane(settings(state_url, "cp-lock"))
    try:
        with store.transaction(cp.factory) as s:
            ids = []
            for action in ("restart", "cache_flush"):
                run = store.create_action_run(
                    s,
                    incident_id=None,
                    action=action,
                    target="shop-0",
                    mode="auto",
                    state=ActionState.PENDING,
                    requested_by="x",
                    reason="x",
                    params={},
                    created_at=now,
                )
                assert run is not None
                ids.append(run.id)
        with store.transaction(cp.factory) as s:
            assert store.claim_run(s, ids[0], "w1", now)
        with store.transaction(cp.factory) as s:
            assert not store.claim_run(s, ids[1], "w2", now)  # the target is busy
            assert s.get(ActionRun, ids[1]).state == ActionState.PENDING  # type: ignore[union-attr]
        with store.transaction(cp.factory) as s:
            store.change_run_state(s, ids[0], ActionState.RUNNING, ActionState.SUCCEEDED)
        with store.transaction(cp.factory) as s:
            assert store.claim_run(s, ids[1], "w2", now)  # free again
    finally:
        cp.stop()


def test_notifications_to_a_hanging_receiver_queue_boundedly_and_the_rest_drop_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    # A receiver that takes the connection and never answers (each send waits its 5 s).
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(100)
        config = Settings.model_validate({
            "database_url": "sqlite://",
            "notify_webhook_url": f"http://127.0.0.1:{hung.getsockname()[1]}/hook",
        })  # fmt: skip
        metrics = Metrics()
        notifier = Notifier(config, metrics, max_pending=5)
        try:
            accepted = [f for i in range(50) for f in notifier.notify("open", f"i{i}", {})]
            assert len(accepted) <= 5 and notifier.pending <= 5
            dropped = metrics.registry.get_sample_value(
                "cp_notifications_total", {"channel": "webhook", "result": "dropped"}
            )
            assert dropped is not None and dropped >= 45
            assert any("notification open dropped" in r.getMessage() for r in caplog.records)
        finally:
            hung.close()  # the waiting sends fail at once now
            notifier.shutdown()
    assert notifier.pending == 0
