"""The dashboard under its users: 50 concurrent clients, each logged in with a session of its
own (from a loopback address of its own), on the overview page, its live JSON, the charts'
JSON, an incident page and the health API, while the control plane probes as usual. p50/p99
per endpoint, and probe runs/s against the same window without the clients (goals:
bench/goals.toml).

    .venv/bin/python bench/dashboard.py [--clients 50] [--duration-s 30] [--every-s 1]
        [--figures PATH]   # the headline figures for `python -m lab.bench_goals`

`--every-s 0` sends each client's next request as soon as the last is answered (a stress test:
the latency is then the queue); the default is one request a second per client, as an
operator's open page polls.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flood import Cp, rate
from lab.bench_goals import Figure, save
from lab.layout import StackLayout, find_free_base_port
from lab.process import wait_until
from lab.stack import Stack
from tests.conftest import lab_tmpdir


def logged_in(url: str, password: str, session: requests.Session) -> requests.Session:
    page = session.get(f"{url}/login", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token, "no CSRF token on the login page"
    done = session.post(
        f"{url}/login",
        data={"username": "admin", "password": password, "csrf_token": token.group(1)},
        timeout=10,
        allow_redirects=False,
    )
    assert done.status_code in (302, 303), done.text[:300]
    return session


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration-s", type=float, default=30)
    parser.add_argument("--every-s", type=float, default=1.0)
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    return parser


ENDPOINTS = {  # figure id -> what each client asks for, in turn
    "overview": "/dashboard/",
    "overview_json": "/dashboard/api/overview.json",
    "charts_json": "/dashboard/api/charts.json?range=1h",
    "incident": "/dashboard/incidents/{incident}",
    "health_api": "/api/v1/health",
}


def headline(
    took: dict[str, list[float]],
    errors: dict[str, int],
    loaded: float,
    quiet: float,
    clients: int,
) -> list[Figure]:
    """Each endpoint's p99 and p50 (none when it was never answered), the requests not
    answered 200, and probing's rate with the clients beside it without them."""
    figures = []
    for name, values in took.items():
        p99_ms = percentile(values, 0.99) * 1000 if values else float("nan")
        p50_ms = statistics.median(values) * 1000 if values else float("nan")
        figures += [
            Figure(f"dashboard.{name}.p99_ms", p99_ms, "ms", f"{name} p99, {clients} clients"),
            Figure(f"dashboard.{name}.p50_ms", p50_ms, "ms", f"{name} p50, {clients} clients"),
        ]
    failed = sum(errors.values())
    figures.append(Figure("dashboard.errors", failed, "", f"errors, {clients} clients"))
    ratio = loaded / quiet if quiet else float("nan")
    figures.append(
        Figure("dashboard.probe_rate_vs_quiet", ratio, "x", "probe runs/s, clients / quiet")
    )
    return figures


class FromAddress(HTTPAdapter):
    """Connections from one loopback address of its own: each client logs in from its own
    address, as operators at their own desks do (logins are rate-limited per address)."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def client_session(url: str, password: str, n: int) -> requests.Session:
    """Client n's own session: its own login, from a loopback address of its own."""
    session = requests.Session()
    adapter = FromAddress(f"127.0.{1 + n // 250}.{1 + n % 250}")
    session.mount("http://", adapter)
    return logged_in(url, password, session)


def main() -> None:
    args = arguments().parse_args()
    data_dir = lab_tmpdir("shop-bench-dashboard-")
    stack = Stack(StackLayout(data_dir, find_free_base_port(), shop_count=2), products=50)
    try:
        stack.start()
        cp = Cp(stack)
        url = cp.url
        # An incident to look at: a shop killed and healed before the clients come.
        killed_at = cp.kill("shop-1")
        cp.recovered_after("shop-1", killed_at)
        api = {"Authorization": f"Bearer {stack.api_token}"}
        incidents = requests.get(f"{url}/api/v1/incidents", headers=api, timeout=10).json()
        incident = incidents["incidents"][0]["id"]
        paths = {name: path.format(incident=incident) for name, path in ENDPOINTS.items()}
        sessions = [client_session(url, stack.admin_password, n) for n in range(args.clients)]
        wait_until(lambda: cp.metrics()["probes"] > 0, timeout_s=30, what="probes counted")
        quiet_before = cp.metrics()
        time.sleep(args.duration_s)  # bounded: the quiet window
        quiet = rate(quiet_before, cp.metrics())
        took: dict[str, list[float]] = {name: [] for name in paths}
        errors: dict[str, int] = dict.fromkeys(paths, 0)
        lock = threading.Lock()
        deadline = time.monotonic() + args.duration_s

        def client(n: int) -> None:
            names = list(paths)
            i = n
            # Pages are opened at different moments: the polls do not all land at once.
            time.sleep(random.Random(n).uniform(0, args.every_s))
            while time.monotonic() < deadline:
                name = names[i % len(names)]
                i += 1
                started = time.monotonic()
                headers = api if name == "health_api" else {}
                try:
                    ok = (
                        sessions[n].get(f"{url}{paths[name]}", headers=headers, timeout=10)
                    ).status_code == 200
                except requests.RequestException:
                    ok = False
                seconds = time.monotonic() - started
                with lock:
                    took[name].append(seconds)
                    errors[name] += not ok
                if args.every_s:
                    time.sleep(max(0.0, args.every_s - seconds))

        loaded_before = cp.metrics()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.duration_s + 30)
        loaded = rate(loaded_before, cp.metrics())
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    pace = f"one request every {args.every_s:g}s each" if args.every_s else "closed loop"
    print(f"{args.clients} logged-in clients ({pace}), {args.duration_s:g}s:")
    print("| endpoint | requests | errors | p50 | p99 |")
    print("|---|---|---|---|---|")
    for name, values in took.items():
        p50_ms, p99_ms = statistics.median(values) * 1000, percentile(values, 0.99) * 1000
        print(f"| {name} | {len(values)} | {errors[name]} | {p50_ms:.1f} ms | {p99_ms:.1f} ms |")
    print(f"probe runs/s: {loaded:.2f} with the clients, {quiet:.2f} without")
    save(args.figures, headline(took, errors, loaded, quiet, args.clients))


if __name__ == "__main__":
    main()
