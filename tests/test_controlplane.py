"""The control plane on the real lab stack: probes open incidents, remediations run once,
guarded and audited, and Alertmanager's webhooks are taken safely."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from lab.process import wait_until
from lab.stack import Stack
from remediation.executors.processes import instance_processes, is_pid_alive


class Api:
    def __init__(self, stack: Stack) -> None:
        self.url = stack.describe()["components"]["controlplane"]["url"]
        self.headers = {"Authorization": f"Bearer {stack.api_token}"}
        self.hook = {"Authorization": f"Bearer {stack.webhook_token}"}

    def get(self, path: str) -> Any:
        response = requests.get(f"{self.url}/api/v1{path}", headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> requests.Response:
        return requests.post(
            f"{self.url}/api/v1{path}", json=body, headers=self.headers, timeout=10
        )

    def alert(self, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.post(
            f"{self.url}/api/v1/alerts",
            json=body,
            headers=self.hook if headers is None else headers,
            timeout=10,
        )

    def incident(self, fingerprint: str, state: str | None = None) -> dict[str, Any] | None:
        query = f"?state={state}&limit=500" if state else "?limit=500"
        found = [
            i
            for i in self.get(f"/incidents{query}")["incidents"]
            if i["fingerprint"] == fingerprint
        ]
        return found[0] if found else None

    def cycles(self) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            if family.name == "cp_cycle_duration_seconds":
                return next(s.value for s in family.samples if s.name.endswith("_count"))
        return 0.0

    def wait_cycles(self, n: int) -> None:
        start = self.cycles()
        wait_until(lambda: self.cycles() >= start + n, timeout_s=30, what=f"{n} more cycles")


@pytest.fixture(scope="session")
def api(stack: Stack) -> Api:
    return Api(stack)


def webhook(alertname: str, status: str, fingerprint: str, **labels: str) -> dict[str, Any]:
    """The shape of ../shared/alertmanager-webhook-sample.json."""
    alert = {
        "status": status,
        "labels": {"alertname": alertname, "severity": "warning", **labels},
        "annotations": {"summary": f"{alertname} for a test"},
        "startsAt": datetime.now(UTC).isoformat(),
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://127.0.0.1/graph",
        "fingerprint": fingerprint,
    }
    return {
        "receiver": "controlplane",
        "status": status,
        "alerts": [alert],
        "groupLabels": {"alertname": alertname},
        "commonLabels": alert["labels"],
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://127.0.0.1",
        "version": "4",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
    }


def component_pid(stack: Stack, name: str) -> int:
    pid: int = json.loads(stack.layout.stack_file.read_text())["components"][name]["pid"]
    return pid


def kill_shop(stack: Stack, name: str) -> None:
    pid = component_pid(stack, name)
    os.killpg(pid, signal.SIGKILL)  # the gunicorn master and its worker: a crashed instance


def test_the_sample_webhook_payload_is_accepted(api: Api) -> None:
    # The real payload Alertmanager sent, kept in ../shared/ beside the checkout.
    path = Path(__file__).resolve().parents[2] / "shared" / "alertmanager-webhook-sample.json"
    if path.exists():
        sample = json.loads(path.read_text())
    else:  # a checkout without shared/ beside it: the same shape, built here
        sample = webhook("PostgresPrimaryDown", "resolved", "a3ef0fdca11f07ac")
    sample["status"] = "resolved"
    for alert in sample["alerts"]:
        alert["status"] = "resolved"  # resolved: accepted, and it can trigger nothing
    response = api.alert(sample)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": len(sample["alerts"])}


def test_killing_a_shop_opens_an_incident_restarts_it_and_verifies_it(
    stack: Stack, api: Api
) -> None:
    before = component_pid(stack, "shop-1")
    kill_shop(stack, "shop-1")
    wait_until(
        lambda: (i := api.incident("probe:shop-1-ready")) is not None and i["recovered_at"],
        timeout_s=60,
        interval_s=0.2,
        what="shop-1 incident verified recovered",
    )
    incident = api.incident("probe:shop-1-ready")
    assert incident is not None
    detail = api.get(f"/incidents/{incident['id']}")
    [run] = [r for r in detail["actions"] if r["action"] == "restart"]
    assert run["state"] == "succeeded"
    assert run["requested_by"] == "policy:restart-dead-shop"
    verbs = [a["verb"] for a in api.get(f"/actions/{run['id']}")["audit"]]
    assert verbs[:3] == ["request", "start", "precheck"]
    assert "execute #1" in verbs and "verify" in verbs and verbs[-1] == "finish"
    assert component_pid(stack, "shop-1") != before
    assert (
        requests.get(f"{stack.describe()['shop']['instances'][1]}/readyz", timeout=5).status_code
        == 200
    )
    kinds = [e["kind"] for e in detail["timeline"]]
    assert kinds[0] == "opened" and "recovered" in kinds
    wait_until(
        lambda: api.incident("probe:shop-1-ready", "resolved") is not None,
        timeout_s=30,
        what="the incident resolved after the probe passed again",
    )


def test_a_hung_shop_instance_is_restarted_whole_and_ready_again(stack: Stack, api: Api) -> None:
    shop = stack.describe()["shop"]["instances"][1]
    wait_until(
        lambda: requests.get(f"{shop}/readyz", timeout=2).status_code == 200,
        timeout_s=60,
        what="shop-1 ready before the hang",
    )
    restarts = len(api.get("/actions?action=restart&limit=500")["actions"])
    # The gunicorn master and its worker, stopped: alive to the kernel, deaf to everyone.
    hung = sorted(p.pid for p in instance_processes(component_pid(stack, "shop-1")))
    assert len(hung) >= 2
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: requests.get(f"{shop}/readyz", timeout=1).status_code == 200,
            timeout_s=90,
            interval_s=0.2,
            what="shop-1 ready again after its hang",
        )
    finally:
        for pid in hung:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # Healed by a restart that took the whole stopped tree, not by the test's SIGCONT.
    assert [pid for pid in hung if is_pid_alive(pid)] == []

    def new_restarts() -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = api.get("/actions?action=restart&limit=500")["actions"]
        return runs[: len(runs) - restarts]  # newest first

    wait_until(
        lambda: any(r["state"] == "succeeded" for r in new_restarts()),
        timeout_s=60,
        what="the restart verified",
    )
    assert {r["target"] for r in new_restarts()} == {"shop-1"}


def test_the_webhook_refuses_a_missing_token_and_malformed_bodies(api: Api) -> None:
    body = webhook("ShopCatalogStale", "firing", f"t-{uuid.uuid4().hex[:12]}")
    assert api.alert(body, headers={}).status_code == 401
    assert api.alert(body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    for bad in (
        [],
        {"version": "4"},
        {**body, "version": "3"},
        {**body, "alerts": [{"status": "firing"}]},
        {**body, "alerts": []},
    ):
        response = api.alert(bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]
    assert api.incident(f"alert:{body['alerts'][0]['fingerprint']}") is None


def test_50_concurrent_deliveries_of_one_alert_make_one_incident_and_one_action(
    api: Api,
) -> None:
    fingerprint = f"dup-{uuid.uuid4().hex[:12]}"
    body = webhook("ShopCatalogStale", "firing", fingerprint)
    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(lambda _: api.alert(body).status_code, range(50)))
    assert statuses == [200] * 50
    wait_until(
        lambda: (i := api.incident(f"alert:{fingerprint}")) is not None and i["action_started_at"],
        timeout_s=30,
        what="the action started",
    )
    api.wait_cycles(3)
    incidents = [
        i
        for i in api.get("/incidents?limit=500")["incidents"]
        if i["fingerprint"] == f"alert:{fingerprint}"
    ]
    assert len(incidents) == 1
    runs = api.get(f"/incidents/{incidents[0]['id']}")["actions"]
    assert [r["action"] for r in runs] == ["cache_flush"]
    api.alert(webhook("ShopCatalogStale", "resolved", fingerprint))
    wait_until(
        lambda: api.incident(f"alert:{fingerprint}", "resolved") is not None,
        timeout_s=30,
        what="the incident resolved by the resolved alert",
    )


def test_a_resolved_alert_never_triggers_an_action(api: Api) -> None:
    fingerprint = f"res-{uuid.uuid4().hex[:12]}"
    assert api.alert(webhook("ShopCatalogStale", "resolved", fingerprint)).status_code == 200
    api.wait_cycles(3)
    assert api.incident(f"alert:{fingerprint}") is None


def test_a_silenced_alert_opens_an_incident_but_runs_nothing(api: Api) -> None:
    fingerprint = f"sil-{uuid.uuid4().hex[:12]}"
    silence = api.post(
        "/silences",
        {"matchers": {"silence_me": fingerprint}, "duration_s": 300, "comment": "maintenance"},
    )
    assert silence.status_code == 201
    api.alert(webhook("ShopCatalogStale", "firing", fingerprint, silence_me=fingerprint))
    wait_until(
        lambda: api.incident(f"alert:{fingerprint}") is not None,
        timeout_s=30,
        what="the incident opened",
    )
    api.wait_cycles(3)
    incident = api.incident(f"alert:{fingerprint}")
    assert incident is not None
    assert api.get(f"/incidents/{incident['id']}")["actions"] == []
    requests.delete(
        f"{api.url}/api/v1/silences/{silence.json()['id']}", headers=api.headers, timeout=5
    )
    api.alert(webhook("ShopCatalogStale", "resolved", fingerprint))


def test_a_real_prometheus_alert_reaches_the_control_plane_through_alertmanager(
    stack: Stack, api: Api
) -> None:
    # Hold every action on shop-0 so that it stays down long enough for the rule to fire.
    silence = api.post("/silences", {"matchers": {"target": "shop-0"}, "duration_s": 120})
    kill_shop(stack, "shop-0")
    try:
        wait_until(
            lambda: any(
                i["kind"] == "ShopInstanceDown" and i["target"] == "shop-0"
                for i in api.get("/incidents?state=open")["incidents"]
            ),
            timeout_s=60,
            interval_s=0.5,
            what="ShopInstanceDown from Alertmanager",
        )
        [alerted] = [
            i
            for i in api.get("/incidents?state=open")["incidents"]
            if i["kind"] == "ShopInstanceDown"
        ]
        assert alerted["source"] == "alert"
        assert alerted["labels"]["instance"].endswith(str(stack.layout.shop_port(0)))
        assert api.get(f"/incidents/{alerted['id']}")["actions"] == []  # silenced
    finally:
        requests.delete(
            f"{api.url}/api/v1/silences/{silence.json()['id']}", headers=api.headers, timeout=5
        )
    wait_until(
        lambda: (
            requests.get(
                f"{stack.describe()['shop']['instances'][0]}/readyz", timeout=2
            ).status_code
            == 200
        ),
        timeout_s=60,
        what="shop-0 restarted once the silence ended",
    )
    restarts = [
        r
        for r in api.get("/incidents?limit=500")["incidents"]
        if r["target"] == "shop-0" and r["action_started_at"]
    ]
    runs = [
        a
        for i in restarts
        for a in api.get(f"/incidents/{i['id']}")["actions"]
        if a["action"] == "restart" and a["created_at"] >= alerted["opened_at"]
    ]
    assert len(runs) == 1, runs  # two incidents (probe and alert), one restart
    wait_until(
        lambda: api.incident(alerted["fingerprint"], "resolved") is not None,
        timeout_s=60,
        what="Alertmanager resolved the alert",
    )


def test_an_operator_request_is_an_intent_answered_202_and_run_by_the_loop(api: Api) -> None:
    response = api.post(
        "/actions", {"action": "cache_flush", "target": "redis", "reason": "operator: stale prices"}
    )
    assert response.status_code == 202
    run_id = response.json()["id"]
    wait_until(
        lambda: api.get(f"/actions/{run_id}")["state"] == "succeeded",
        timeout_s=30,
        what="the requested flush done",
    )
    assert api.get(f"/actions/{run_id}")["requested_by"] == "token:generated"
    bad = api.post("/actions", {"action": "reboot-the-world", "target": "redis", "reason": "x"})
    assert bad.status_code == 400 and "unknown action" in bad.json()["error"]
    unauthorized = requests.get(f"{api.url}/api/v1/health", timeout=5)
    assert unauthorized.status_code == 401


def test_health_and_readiness_report_every_service(api: Api) -> None:
    health = api.get("/health")
    assert {"shop-0", "shop-1", "pg0", "pg1", "redis", "shop-db"} <= set(health["services"])
    assert health["services"]["pg0"]["probes"]["pg0-postgres"]["health"] == "up"
    ready = requests.get(f"{api.url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["checks"]["leader"] is True


def test_a_control_plane_killed_mid_action_never_reruns_it_and_heals_by_its_next_try(
    stack: Stack, api: Api
) -> None:
    # Start from a settled shop-1: no open incident (a new one must open for this kill).
    wait_until(
        lambda: api.incident("probe:shop-1-ready", "open") is None,
        timeout_s=60,
        what="no open shop-1 incident",
    )
    killed_at = datetime.now(UTC)
    kill_shop(stack, "shop-1")

    def running() -> dict[str, Any] | None:
        # The probe's incident or the ShopInstanceDown alert's, whichever opened first: the
        # other is held ("restart on shop-1 already requested"), so look at the run itself.
        for run in api.get("/actions?action=restart&limit=50")["actions"]:
            if (
                run["target"] == "shop-1"
                and datetime.fromisoformat(run["created_at"]) >= killed_at
                and run["state"] == "running"
            ):
                return run
        return None

    # Within the policy's cooldown of an earlier restart of shop-1, this one waits for it.
    wait_until(
        lambda: running() is not None, timeout_s=90, interval_s=0.02, what="the restart running"
    )
    started = running()
    assert started is not None and started["incident_id"] is not None
    incident_id = started["incident_id"]
    os.killpg(component_pid(stack, "controlplane"), signal.SIGKILL)  # mid-action
    # Nobody here starts it again: its supervisor does (lab/supervisor.py).

    def interrupted() -> dict[str, Any]:
        found: list[dict[str, Any]] = api.get(f"/incidents/{incident_id}")["actions"]
        return next(r for r in found if r["id"] == started["id"])

    wait_until(
        lambda: interrupted()["state"] == "abandoned",
        timeout_s=30,
        what="the interrupted run marked abandoned",
    )
    abandoned = interrupted()
    assert abandoned["id"] == started["id"] and abandoned["retry"]  # never run again itself
    verbs = [a["verb"] for a in api.get(f"/actions/{abandoned['id']}")["audit"]]
    assert verbs[-1] == "abandon" and verbs.count("start") == 1
    # A restart may start over: the same incident's next try, a run of its own, after the
    # backoff, heals shop-1; nobody restarts it by hand.
    shop = stack.describe()["shop"]["instances"][1]

    def shop_ready() -> bool:
        return requests.get(f"{shop}/readyz", timeout=2).status_code == 200

    def since_kill() -> list[dict[str, Any]]:
        return [
            r
            for r in api.get("/actions?action=restart&limit=50")["actions"]
            if r["target"] == "shop-1" and datetime.fromisoformat(r["created_at"]) >= killed_at
        ]

    def healed() -> bool:
        # By the next try's success, or by what the interrupted run had already started
        # (its restart was under way: the new control plane adopts the process, and the
        # incident resolves once the probe passes).
        resolved = api.get(f"/incidents/{incident_id}")["state"] == "resolved"
        return shop_ready() and (resolved or any(r["state"] == "succeeded" for r in since_kill()))

    wait_until(healed, timeout_s=60, what="shop-1 healed by the control plane")
    later = since_kill()
    tries = sorted(r["try_number"] for r in later if r["incident_id"] == incident_id)
    assert tries == list(range(1, len(tries) + 1)), later  # each try once, in order
    assert sum(r["state"] == "succeeded" for r in later if r["incident_id"] == incident_id) <= 1
