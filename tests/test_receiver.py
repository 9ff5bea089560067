"""The lab's webhook recorder: every JSON POST a line of DIR/notifications.jsonl (0600), bounded
in size; and in a stack, what the control plane tells a human arrives there."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from lab.layout import StackLayout, find_free_base_port
from lab.observe import notifications
from lab.process import ServerProcess, wait_until
from lab.receiver import CONTROLPLANE_PATH, MAX_BODY_BYTES, receiver_server, receiver_url
from lab.stack import Stack
from tests.test_controlplane import webhook


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[StackLayout, ServerProcess]]:
    layout = StackLayout(tmp_path, find_free_base_port())
    server = receiver_server(layout).start().wait_ready()
    try:
        yield layout, server
    finally:
        server.stop()


def test_the_receiver_records_every_json_post_with_its_path_and_time(
    receiver: tuple[StackLayout, ServerProcess],
) -> None:
    layout, _ = receiver
    before = datetime.now(UTC)
    for path, body in (("/alertmanager", {"alerts": [1]}), ("/anything/else", ["a", None])):
        response = requests.post(receiver_url(layout, path), json=body, timeout=5)
        assert response.status_code == 200, response.text
    got = notifications(layout.data_dir)
    assert [(r["path"], r["body"]) for r in got] == [
        ("/alertmanager", {"alerts": [1]}),
        ("/anything/else", ["a", None]),
    ]
    assert all(datetime.fromisoformat(r["received_at"]) >= before for r in got)
    assert stat.S_IMODE(layout.notifications.stat().st_mode) == 0o600


def test_the_receiver_refuses_a_body_too_large_or_not_json_and_records_neither(
    receiver: tuple[StackLayout, ServerProcess],
) -> None:
    layout, _ = receiver
    url = receiver_url(layout, CONTROLPLANE_PATH)
    too_large = requests.post(url, data=b"[" + b"0," * MAX_BODY_BYTES + b"0]", timeout=5)
    assert too_large.status_code == 413
    not_json = requests.post(url, data=b"{half", timeout=5)
    assert not_json.status_code == 400
    assert notifications(layout.data_dir) == []
    assert requests.post(url, json={"still": "alive"}, timeout=5).status_code == 200
    assert [r["body"] for r in notifications(layout.data_dir)] == [{"still": "alive"}]


def test_an_incident_the_control_plane_opens_is_told_to_the_lab_receiver(stack: Stack) -> None:
    description = stack.describe()
    assert description["components"]["receiver"]["port"] == stack.layout.receiver_port
    url = description["components"]["controlplane"]["url"]
    name = f"LabReceiverTest{uuid.uuid4().hex[:8]}"
    fingerprint = uuid.uuid4().hex[:16]
    hook = {"Authorization": f"Bearer {stack.webhook_token}"}

    def post(status: str) -> None:
        response = requests.post(
            f"{url}/api/v1/alerts",
            json=webhook(name, status, fingerprint),
            headers=hook,
            timeout=10,
        )
        assert response.status_code == 200, response.text

    def told(event: str) -> list[dict[str, object]]:
        return [
            r["body"]
            for r in notifications(stack.layout.data_dir)
            if r["path"] == CONTROLPLANE_PATH
            and r["body"].get("event") == event
            and name in str(r["body"])
        ]

    post("firing")
    wait_until(lambda: bool(told("open")), timeout_s=30, what="the opening notified")
    [opened] = told("open")
    assert opened["subject"] == f"{name} for a test"
    incident = opened["incident"]
    post("resolved")

    def resolve_told() -> bool:
        # Alertmanager's own receiver writes to the same file, on a path of its own.
        return any(
            r["path"] == CONTROLPLANE_PATH
            and r["body"].get("event") == "resolve"
            and r["body"].get("incident") == incident
            for r in notifications(stack.layout.data_dir)
        )

    wait_until(resolve_told, timeout_s=30, what="the resolution notified")
