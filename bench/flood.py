"""The control plane under overload, on a fresh lab stack, each figure beside its quiet one:

  a. 20,000 firing then resolved alerts posted by 32 clients (as Alertmanager would, with the
     webhook token) while a shop instance is killed: the shop is still restarted. Decision
     cycle p99 (goal < 1 s) and kill -> verified recovered (goal: within 1.5x of quiet).
  b. 200 web clients for 30 s on /healthz, /readyz and /api/v1/health: API p99 (goal
     < 100 ms) and probe runs/s (goal: within 10 % of quiet).

Loopback only; every load loop is bounded in time. Usage: python bench/flood.py [--alerts N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from lab.bench_goals import Figure, save
from lab.layout import StackLayout, find_free_base_port
from lab.process import wait_until
from lab.stack import Stack

POST_BATCH = 500  # alerts per webhook post (the intake takes up to 1000)
PHASE_DEADLINE_S = 600


class Cp:
    def __init__(self, stack: Stack) -> None:
        self.url = stack.describe()["components"]["controlplane"]["url"]
        self.api = {"Authorization": f"Bearer {stack.api_token}"}
        self.hook = {"Authorization": f"Bearer {stack.webhook_token}"}
        self.stack = stack

    def metrics(self) -> dict[str, Any]:
        """Cycle histogram buckets (le -> count) and probe runs counted so far."""
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        buckets: dict[float, float] = {}
        probes = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "cp_cycle_duration_seconds_bucket":
                    buckets[float(s.labels["le"])] = s.value
                elif s.name == "cp_probe_duration_seconds_count":
                    probes += s.value
        return {"buckets": buckets, "probes": probes, "at": time.monotonic()}

    def restarts(self, target: str, since: float) -> list[dict[str, Any]]:
        r = requests.get(
            f"{self.url}/api/v1/actions?action=restart&limit=50", headers=self.api, timeout=10
        )
        r.raise_for_status()
        return [
            run
            for run in r.json()["actions"]
            if run["target"] == target
            and run["state"] == "succeeded"
            and datetime.fromisoformat(run["created_at"]).timestamp() >= since
        ]

    def kill(self, name: str) -> float:
        pid = json.loads(self.stack.layout.stack_file.read_text())["components"][name]["pid"]
        killed_at = time.time()
        os.killpg(pid, signal.SIGKILL)
        return killed_at

    def recovered_after(self, name: str, killed_at: float) -> float:
        wait_until(
            lambda: bool(self.restarts(name, killed_at)),
            timeout_s=PHASE_DEADLINE_S,
            interval_s=0.2,
            what=f"{name} restarted",
        )
        [run, *_] = self.restarts(name, killed_at)
        return datetime.fromisoformat(run["finished_at"]).timestamp() - killed_at


def p99_of(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, int]:
    """The cycle histogram's p99 over the window (a bucket's upper bound) and its count."""
    delta = {le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]}
    total = delta.get(float("inf"), 0.0)
    for le in sorted(delta):
        if total and delta[le] >= 0.99 * total:
            return le, int(total)
    return float("nan"), int(total)


def rate(before: dict[str, Any], after: dict[str, Any]) -> float:
    return float((after["probes"] - before["probes"]) / (after["at"] - before["at"]))


def post_alerts(cp: Cp, count: int, status: str, prefix: str, clients: int) -> dict[str, int]:
    now = datetime.now(UTC).isoformat()

    def post(start: int) -> int:
        alerts = [
            {
                "status": status,
                "fingerprint": f"{prefix}-{i}",
                "labels": {"alertname": "BenchFlood", "severity": "info", "service": f"f{i % 97}"},
                "annotations": {"summary": "bench flood"},
                "startsAt": now,
                "endsAt": "0001-01-01T00:00:00Z",
            }
            for i in range(start, min(start + POST_BATCH, count))
        ]
        body = {"version": "4", "status": status, "receiver": "controlplane", "alerts": alerts}
        try:
            return requests.post(
                f"{cp.url}/api/v1/alerts", json=body, headers=cp.hook, timeout=60
            ).status_code
        except requests.RequestException:
            return 0

    with ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(post, range(0, count, POST_BATCH)))
    return {str(c): codes.count(c) for c in set(codes)}


def flood_phase(cp: Cp, alerts: int) -> dict[str, Any]:
    quiet_before = cp.metrics()
    quiet_recovery = cp.recovered_after("shop-0", cp.kill("shop-0"))
    quiet_after = cp.metrics()
    prefix = f"flood{uuid.uuid4().hex[:6]}"
    before = cp.metrics()
    killed_at = cp.kill("shop-1")
    started = time.monotonic()
    firing = post_alerts(cp, alerts, "firing", prefix, clients=32)
    firing_s = time.monotonic() - started
    flood_recovery = cp.recovered_after("shop-1", killed_at)
    resolved = post_alerts(cp, alerts, "resolved", prefix, clients=32)
    wait_until(  # the loop works through the flood: a cycle with nothing left over
        lambda: cp_backlog_clear(cp, prefix),
        timeout_s=PHASE_DEADLINE_S,
        interval_s=1,
        what="the flood's incidents resolved",
    )
    after = cp.metrics()
    quiet_p99, quiet_n = p99_of(quiet_before, quiet_after)
    flood_p99, flood_n = p99_of(before, after)
    return {
        "quiet": {"cycle_p99_s": quiet_p99, "cycles": quiet_n, "recovered_s": quiet_recovery},
        "flood": {
            "alerts": alerts,
            "firing_posts": firing,
            "resolved_posts": resolved,
            "firing_post_s": firing_s,
            "cycle_p99_s": flood_p99,
            "cycles": flood_n,
            "recovered_s": flood_recovery,
            "window_s": after["at"] - before["at"],
        },
    }


def cp_backlog_clear(cp: Cp, prefix: str) -> bool:
    r = requests.get(f"{cp.url}/api/v1/incidents?state=open&limit=500", headers=cp.api, timeout=10)
    return not any(i["fingerprint"].startswith(f"alert:{prefix}") for i in r.json()["incidents"])


def web_load(cp: Cp, clients: int, duration_s: float, every_s: float = 0) -> dict[str, Any]:
    """`every_s` = 0: each client sends its next request as soon as the last is answered (a
    stress test: the latency is the queue); else one request every `every_s` seconds each,
    as dashboards and health checkers poll, their phases spread over the period."""
    paths = itertools.cycle(["/healthz", "/readyz", "/api/v1/health"])
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}  # what each error was: "503 /readyz", "ReadTimeout /healthz"
    deadline = time.monotonic() + duration_s

    def client(n: int) -> None:
        nonlocal errors
        session = requests.Session()
        if every_s:  # spread over the period, as independent pollers are, not all at once
            time.sleep(every_s * n / clients)
        while time.monotonic() < deadline:
            with lock:
                path = next(paths)
            started = time.monotonic()
            try:
                code = session.get(f"{cp.url}{path}", headers=cp.api, timeout=10).status_code
                kind = f"{code} {path}"
            except requests.RequestException as exc:
                code, kind = 0, f"{type(exc).__name__} {path}"
            took = time.monotonic() - started
            with lock:
                latencies.append(took)
                if code != 200:
                    errors += 1
                    kinds[kind] = kinds.get(kind, 0) + 1
            if every_s:
                time.sleep(max(0.0, every_s - took))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "error_kinds": kinds,
        "p50_s": latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_s": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }


def measured(call: Callable[[], Any], cp: Cp) -> tuple[Any, float]:
    before = cp.metrics()
    result = call()
    return result, rate(before, cp.metrics())


def web_phase(cp: Cp, clients: int, duration_s: float, every_s: float) -> dict[str, Any]:
    _, quiet_rate = measured(lambda: time.sleep(duration_s), cp)  # bounded: the quiet window
    load, loaded_rate = measured(lambda: web_load(cp, clients, duration_s, every_s), cp)
    return {"quiet_probe_runs_per_s": quiet_rate, "loaded_probe_runs_per_s": loaded_rate, **load}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--alerts", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=30)
    parser.add_argument("--every-s", type=float, default=0, help="each web client's pace")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the stack's data and logs")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-flood-", dir="/tmp"))
    data_dir.chmod(0o755)
    stack = Stack(StackLayout(data_dir, find_free_base_port()), products=50)
    try:
        stack.start()
        cp = Cp(stack)
        time.sleep(5)  # bounded: every probe reports before the first fault
        web = web_phase(cp, args.clients, args.duration_s, args.every_s)
        print(f"web: {json.dumps(web)}", file=sys.stderr)
        flood = flood_phase(cp, args.alerts)
    finally:
        stack.stop()
        if args.keep:
            print(f"kept: {data_dir}", file=sys.stderr)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    q, f = flood["quiet"], flood["flood"]
    print(
        f"a. {f['alerts']} alerts by 32 clients (posts: firing {f['firing_posts']}, resolved "
        f"{f['resolved_posts']}; firing posted in {f['firing_post_s']:.1f}s)\n"
        f"   cycle p99 <= {f['cycle_p99_s']}s over {f['cycles']} cycles (quiet: <= "
        f"{q['cycle_p99_s']}s over {q['cycles']}; goal < 1 s)\n"
        f"   kill -> verified recovered {f['recovered_s']:.2f}s (quiet {q['recovered_s']:.2f}s,"
        f" x{f['recovered_s'] / q['recovered_s']:.2f}; goal <= x1.5)"
    )
    pace = f"one request every {args.every_s:g}s each" if args.every_s else "closed loop"
    print(
        f"b. {args.clients} clients ({pace}) for {args.duration_s:.0f}s on /healthz, /readyz, "
        f"/api/v1/health: {web['requests']} requests, {web['errors']} errors, p50 "
        f"{web['p50_s'] * 1000:.0f} ms, p99 {web['p99_s'] * 1000:.0f} ms (goal < 100 ms)\n"
        f"   probe runs/s {web['loaded_probe_runs_per_s']:.2f} under load vs "
        f"{web['quiet_probe_runs_per_s']:.2f} quiet (goal: within 10 %)"
    )
    if args.json:
        args.json.write_text(json.dumps({"flood": flood, "web": web}))
    save(args.figures, headline(flood, web, pace))


def headline(flood: dict[str, Any], web: dict[str, Any], pace: str) -> list[Figure]:
    q, f = flood["quiet"], flood["flood"]
    return [
        Figure("flood.cycle_p99_s", f["cycle_p99_s"], "s",
               "loop cycle p99 in a flood (histogram bucket)"),
        Figure("flood.recovered_vs_quiet", f["recovered_s"] / q["recovered_s"], "x",
               "kill -> recovered, flood / quiet"),
        Figure("flood.probe_rate_vs_quiet",
               web["loaded_probe_runs_per_s"] / web["quiet_probe_runs_per_s"], "x",
               f"probe runs/s, web load ({pace}) / quiet"),
        Figure("flood.api_p99_ms", web["p99_s"] * 1000, "ms",
               f"API p99 under 200 web clients ({pace})"),
        Figure("flood.api_errors", web["errors"], "", f"API errors under 200 web clients ({pace})"),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
