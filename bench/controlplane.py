"""Control plane timings on a fresh lab stack, reported as medians over trials:

  1. kill -9 of a shop instance -> incident opened
     kill -9 of a shop instance -> verified recovered
  2. Alertmanager-style webhook received -> action started
  3. webhook intake rate with deduplication: concurrent deliveries of many alerts, each
     repeated; alerts/s accepted, and one incident per distinct alert.
  4. kill -9 of the control plane's process group, from outside any tool -> serving again
     (its /readyz 200), started by its supervisor (lab/supervisor.py); the max over trials.
The goals are in bench/goals.toml (`make bench` judges the figures against them).

Usage: python bench/controlplane.py [--kills 6] [--webhooks 10] [--cp-kills 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from lab.bench_goals import Figure, save
from lab.layout import StackLayout, find_free_base_port
from lab.process import wait_until
from lab.stack import Stack
from lab.supervisor import RECENT_S

RESTART_COOLDOWN_S = 20  # the lab's restart policy: one restart per target per 20 s


class Api:
    def __init__(self, stack: Stack) -> None:
        self.url = f"{stack.describe()['components']['controlplane']['url']}/api/v1"
        self.api = {"Authorization": f"Bearer {stack.api_token}"}
        self.hook = {"Authorization": f"Bearer {stack.webhook_token}"}
        self.session = requests.Session()

    def incidents(self) -> list[dict[str, Any]]:
        r = self.session.get(f"{self.url}/incidents?limit=500", headers=self.api, timeout=10)
        r.raise_for_status()
        found: list[dict[str, Any]] = r.json()["incidents"]
        return found

    def running(self, action: str) -> bool:
        r = self.session.get(f"{self.url}/actions?action={action}", headers=self.api, timeout=10)
        r.raise_for_status()
        return any(a["state"] in ("pending", "running") for a in r.json()["actions"])

    def alert(self, fingerprint: str, status: str = "firing", **labels: str) -> int:
        body = {
            "version": "4",
            "status": status,
            "receiver": "controlplane",
            "alerts": [
                {
                    "status": status,
                    "fingerprint": fingerprint,
                    "labels": {"alertname": "ShopCatalogStale", **labels},
                    "annotations": {"summary": "bench"},
                    "startsAt": datetime.now(UTC).isoformat(),
                    "endsAt": "0001-01-01T00:00:00Z",
                }
            ],
        }
        return self.session.post(
            f"{self.url}/alerts", json=body, headers=self.hook, timeout=10
        ).status_code


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def kill_trials(stack: Stack, api: Api, kills: int) -> dict[str, list[float]]:
    opened, recovered = [], []
    last_kill: dict[str, float] = {}
    for n in range(kills):
        name = f"shop-{n % 2}"
        wait_s = RESTART_COOLDOWN_S + 1 - (time.time() - last_kill.get(name, 0))
        if wait_s > 0:
            time.sleep(wait_s)  # bounded: respect the policy's cooldown between trials
        pid = json.loads(stack.layout.stack_file.read_text())["components"][name]["pid"]
        killed_at = time.time()
        os.killpg(pid, signal.SIGKILL)
        last_kill[name] = killed_at

        def recovered_incident(name: str = name, since: float = killed_at) -> dict[str, Any] | None:
            for i in api.incidents():
                if (
                    i["fingerprint"] == f"probe:{name}-ready"
                    and at(i["opened_at"]) >= since
                    and i["recovered_at"]
                ):
                    return i
            return None

        wait_until(
            lambda: recovered_incident() is not None,
            timeout_s=60,
            interval_s=0.1,
            what=f"{name} recovered",
        )
        incident = recovered_incident()
        assert incident is not None
        opened.append(at(incident["opened_at"]) - killed_at)
        recovered.append(at(incident["recovered_at"]) - killed_at)
        print(
            f"kill {n + 1}: {name} opened after {opened[-1]:.2f}s, "
            f"verified recovered after {recovered[-1]:.2f}s",
            file=sys.stderr,
        )
    return {"opened_s": opened, "recovered_s": recovered}


def supervised_trials(stack: Stack, count: int) -> list[float]:
    """kill -9 of the control plane's process group -> serving again, per trial. Each kill
    comes after the supervisor's crash-loop window (RECENT_S since its last start): one death,
    not a crash loop, whose starts back off by design."""
    url = stack.describe()["components"]["controlplane"]["url"]

    def ready() -> bool:
        return requests.get(f"{url}/readyz", timeout=1).status_code == 200

    def pid() -> int:
        found: int = json.loads(stack.layout.stack_file.read_text())["components"]["controlplane"][
            "pid"
        ]
        return found

    back: list[float] = []
    for n in range(count):
        wait_until(ready, timeout_s=60, what="the control plane ready")
        time.sleep(RECENT_S + 1)  # bounded: outside the supervisor's crash-loop back-off
        killed = pid()
        killed_at = time.monotonic()
        os.killpg(killed, signal.SIGKILL)
        wait_until(
            lambda killed=killed: pid() != killed and ready(),
            timeout_s=60,
            interval_s=0.02,
            what="the control plane serving again",
        )
        back.append(time.monotonic() - killed_at)
        print(f"control plane kill {n + 1}: serving again after {back[-1]:.2f}s", file=sys.stderr)
    return back


def webhook_trials(api: Api, count: int) -> list[float]:
    delays = []
    for _ in range(count):
        fingerprint = f"bench-{uuid.uuid4().hex[:12]}"
        sent_at = time.time()
        assert api.alert(fingerprint) == 200

        def started(fp: str = f"alert:{fingerprint}") -> dict[str, Any] | None:
            found = [i for i in api.incidents() if i["fingerprint"] == fp]
            return found[0] if found and found[0]["action_started_at"] else None

        wait_until(
            lambda: started() is not None, timeout_s=30, interval_s=0.05, what="the action started"
        )
        incident = started()
        assert incident is not None
        delays.append(at(incident["action_started_at"]) - sent_at)
        api.alert(fingerprint, status="resolved")
        # One action per target at a time: the next trial's must not wait for this one's.
        wait_until(lambda: not api.running("cache_flush"), timeout_s=60, what="the flush done")
    return delays


def intake_rate(api: Api, distinct: int, repeats: int, clients: int) -> dict[str, Any]:
    fingerprints = [f"rate-{uuid.uuid4().hex[:12]}" for _ in range(distinct)]
    deliveries = [fp for fp in fingerprints for _ in range(repeats)]
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda fp: api.alert(fp, service="rate"), deliveries))
    elapsed = time.monotonic() - started
    wanted = {f"alert:{fp}" for fp in fingerprints}
    wait_until(
        lambda: len(wanted & {i["fingerprint"] for i in api.incidents()}) == distinct,
        timeout_s=60,
        what="every distinct alert an incident",
    )
    incidents = [i for i in api.incidents() if i["fingerprint"] in wanted]
    for fp in fingerprints:
        api.alert(fp, status="resolved", service="rate")
    return {
        "deliveries": len(deliveries),
        "alerts_per_s": len(deliveries) / elapsed,
        "non_200": sum(1 for s in statuses if s != 200),
        "incidents": len(incidents),
        "distinct": distinct,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--webhooks", type=int, default=10)
    parser.add_argument("--cp-kills", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-cp-", dir="/tmp"))
    data_dir.chmod(0o755)
    # The webhook trials' alerts all reach the cache-flush policy (its target is the policy's,
    # never an alert's label): without its cooldown and its runs-per-hour limit, a trial is
    # never held by the ones before.
    stack = Stack(
        StackLayout(data_dir, find_free_base_port()),
        products=100,
        policy_overrides={"flush-shop-cache": {"cooldown_s": 0, "max_runs": 1000}},
    )
    try:
        stack.start()
        api = Api(stack)
        time.sleep(3)  # bounded: let every probe report once before the first fault
        kills = kill_trials(stack, api, args.kills)
        hooks = webhook_trials(api, args.webhooks)
        rate = intake_rate(api, distinct=50, repeats=20, clients=32)
        supervised = supervised_trials(stack, args.cp_kills)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    med = statistics.median
    print(
        f"kill -9 shop -> incident opened:     median {med(kills['opened_s']):.2f}s "
        f"(max {max(kills['opened_s']):.2f}s, {args.kills} trials)"
    )
    print(
        f"kill -9 shop -> verified recovered:  median {med(kills['recovered_s']):.2f}s "
        f"(max {max(kills['recovered_s']):.2f}s)"
    )
    print(
        f"webhook -> action started:           median {med(hooks):.3f}s "
        f"(max {max(hooks):.3f}s, {args.webhooks} trials)"
    )
    print(
        f"webhook intake: {rate['alerts_per_s']:.0f} alerts/s ({rate['deliveries']} deliveries"
        f" of {rate['distinct']} alerts by 32 clients; {rate['non_200']} not 200; "
        f"{rate['incidents']} incidents for {rate['distinct']} alerts)"
    )
    print(
        f"kill -9 control plane -> serving:    max {max(supervised):.2f}s "
        f"(median {med(supervised):.2f}s, {args.cp_kills} trials)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"kills": kills, "webhook_s": hooks, "intake": rate, "supervised_s": supervised}
            )
        )
    save(args.figures, headline(kills, hooks, rate, supervised))


def headline(
    kills: dict[str, list[float]],
    hooks: list[float],
    rate: dict[str, Any],
    supervised: list[float],
) -> list[Figure]:
    med = statistics.median
    return [
        Figure("controlplane.kill_to_incident_s", med(kills["opened_s"]), "s",
               "shop kill -> incident opened, median"),
        Figure("controlplane.kill_to_recovered_s", med(kills["recovered_s"]), "s",
               "shop kill -> verified recovered, median"),
        Figure("controlplane.webhook_to_action_s", med(hooks), "s",
               "webhook -> action started, median"),
        Figure("controlplane.intake_per_s", rate["alerts_per_s"], "/s", "webhook intake"),
        Figure("controlplane.incidents_per_alert", rate["incidents"] / rate["distinct"], "",
               "incidents per distinct alert"),
        Figure("controlplane.killed_to_serving_max_s", max(supervised), "s",
               "control plane kill -9 -> serving again (its supervisor), max"),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
