"""Catalog reads: what each cache level is worth, against the ceiling of the same server.

Starts a fresh lab stack, then, on one shop instance at a time (one gunicorn, the lab's settings,
the same 2 cores), drives `wrk` with 16 keep-alive connections and measures, alternating within
each repeat so that every figure has its ceiling beside it:
  1. ceiling: GET /healthz, the most trivial route on the same server (Flask, gunicorn, the
     request bookkeeping and metrics), so the difference to it is the catalog's own cost;
  2. in-process hit: GET /products/<id> over 100 hot products on the lab's shop-0
     (local LRU+TTL level, 2 s TTL: nearly every read is a local hit);
  3. Redis hit: the same on an instance whose local level holds one product
     (SHOP_LOCAL_CACHE_SIZE=1) over all 1000 products, Redis warmed first;
  4. database read: the same with Redis unreachable and skipped (SHOP_REDIS_URL to a closed
     port, SHOP_REDIS_RETRY_AFTER_S=3600): every read is a SELECT on the primary.
The cache's own counters (/metrics, shop_cache_requests_total) are read before and after each
run, so each row says which level really answered.
Usage: python bench/catalog.py [--connections 16] [--duration-s 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.orders import CpuMeter, parse_wrk
from lab.bench_goals import Figure, save
from lab.layout import StackLayout, find_free_base_port
from lab.process import ServerProcess
from lab.stack import Stack

PRODUCTS = 1000
HOT_PRODUCTS = 100

# wrk script: GET /products/<id>, the id drawn from 1..PRODUCTS (env).
WRK_PRODUCTS_LUA = """
local products = tonumber(os.getenv("PRODUCTS") or "100")
function init(args) math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16)) end
function request()
  return wrk.format("GET", "/products/" .. math.random(1, products))
end
"""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    instance: str  # which server answers
    path: str  # "/healthz", or "/products" for random product ids
    products: int = 0


CASES = (
    Case("ceiling: GET /healthz", "default", "/healthz"),
    Case("in-process hit", "default", "/products", HOT_PRODUCTS),
    Case("ceiling: GET /healthz (redis-level instance)", "redis", "/healthz"),
    Case("Redis hit", "redis", "/products", PRODUCTS),
    Case("ceiling: GET /healthz (db-level instance)", "db", "/healthz"),
    Case("database read", "db", "/products", PRODUCTS),
)


def cache_counts(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for match in re.finditer(
        r'^shop_cache_requests_total\{level="(\w+)",result="(\w+)"\} (\S+)$', text, re.M
    ):
        counts[f"{match[1]}_{match[2]}"] = float(match[3])
    return counts


def run_wrk(url: str, case: Case, connections: int, duration_s: int, lua: Path) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: run `apt-get install -y wrk` (or `make bench`)")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s", "--latency"]
    if case.path == "/products":
        argv += ["-s", str(lua), url]
    else:
        argv.append(url + case.path)
    env = {**os.environ, "PRODUCTS": str(case.products)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    figures = parse_wrk(done.stdout)
    figures["rps"] = (figures["requests"] - figures["non_2xx"]) / duration_s
    return figures


def level_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Which level answered the product reads of one run, as shares of all reads."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    reads = delta.get("local_hit", 0.0) + delta.get("local_miss", 0.0)
    if not reads:
        return {}
    local = delta.get("local_hit", 0.0)
    redis_hit = delta.get("redis_hit", 0.0)
    return {
        "local": local / reads,
        "redis": redis_hit / reads,
        "database": (reads - local - redis_hit) / reads,
    }


def start_instance(stack: Stack, index: int, extra_env: dict[str, str]) -> tuple[str, int]:
    port = find_free_base_port()
    proc: ServerProcess = stack.shop_server(index, port=port, extra_env=extra_env)
    stack.processes[f"shop-{index}"] = proc
    stack.roles[f"shop-{index}"] = "shop"
    proc.start().wait_ready()
    assert proc.pid is not None
    return f"http://127.0.0.1:{port}", proc.pid


def measure(connections: int, duration_s: int, repeats: int) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-catalog-", dir="/tmp"))
    data_dir.chmod(0o755)
    stack = Stack(
        StackLayout(data_dir, find_free_base_port()),
        products=PRODUCTS,
        stock=1_000_000,
        with_controlplane=False,
    )
    lua = data_dir / "products.lua"
    lua.write_text(WRK_PRODUCTS_LUA)
    runs: list[dict[str, Any]] = []
    try:
        stack.start()
        default_url = stack.describe()["shop"]["instances"][0]
        default_pid = stack.processes["shop-0"].pid
        assert default_pid is not None
        # A closed port: find_free_base_port() answers one nobody listens on.
        dead_redis = f"redis://127.0.0.1:{find_free_base_port()}/0"
        long_ttl = {"SHOP_REDIS_CACHE_TTL_S": "3600"}
        redis_url, redis_pid = start_instance(stack, 70, {**long_ttl, "SHOP_LOCAL_CACHE_SIZE": "1"})
        db_url, db_pid = start_instance(
            stack,
            71,
            {
                "SHOP_LOCAL_CACHE_SIZE": "1",
                "SHOP_REDIS_URL": dead_redis,
                "SHOP_REDIS_RETRY_AFTER_S": "3600",
            },
        )
        instances = {
            "default": (default_url, default_pid),
            "redis": (redis_url, redis_pid),
            "db": (db_url, db_pid),
        }
        # Warm Redis with every product, then the hot set locally.
        for product_id in range(1, PRODUCTS + 1):
            requests.get(f"{redis_url}/products/{product_id}", timeout=5).raise_for_status()
        print(f"stack up; {connections} connections, {duration_s}s per run", file=sys.stderr)
        for repeat in range(repeats):
            figures: dict[str, Any] = {}
            for case in CASES:
                url, pid = instances[case.instance]
                meter = CpuMeter({"shop": [pid]})
                before = cache_counts(url)
                load = functools.partial(run_wrk, url, case, connections, duration_s, lua)
                result, cpu = meter.measure(load)
                result["levels"] = level_shares(before, cache_counts(url))
                result["shop_cpu_ms"] = 1000 * cpu["shop"] / max(result["requests"], 1)
                result["machine_busy_pct"] = 100 * cpu["machine_busy"] / cpu["machine_total"]
                figures[case.name] = result
            runs.append(figures)
            print(f"=== repeat {repeat + 1}\n{report_run(figures)}", file=sys.stderr)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"connections": connections, "duration_s": duration_s, "runs": runs}


def report_run(figures: dict[str, Any]) -> str:
    lines = [
        f"{'what':<46}{'reads/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'CPU ms':>8}{'busy%':>7}"
        "  answered by (local/redis/db)"
    ]
    for name, f in figures.items():
        levels = f["levels"]
        shares = (
            "/".join(f"{100 * levels[k]:.0f}%" for k in ("local", "redis", "database"))
            if levels
            else "-"
        )
        lines.append(
            f"{name:<46}{f['rps']:>9.0f}{f['p50_ms']:>8.1f}{f['p99_ms']:>8.1f}"
            f"{f['shop_cpu_ms']:>8.3f}{f['machine_busy_pct']:>7.0f}  {shares}"
            + (f"  non-2xx {f['non_2xx']}" if f["non_2xx"] else "")
        )
    for read, ceiling in zip(CASES[1::2], CASES[0::2], strict=True):
        ratio = figures[read.name]["rps"] / figures[ceiling.name]["rps"]
        lines.append(f"{read.name} / its ceiling = {ratio:.2f}")
    return "\n".join(lines)


def report(figures: dict[str, Any]) -> str:
    runs = figures["runs"]
    lines = [f"=== repeat {n + 1} of {len(runs)}\n{report_run(r)}" for n, r in enumerate(runs)]
    lines.append(
        f"=== medians over {len(runs)} repeats ({figures['connections']} connections, "
        f"{figures['duration_s']} s each)"
    )
    lines.append(f"{'what':<46}{'reads/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'ratio':>8}")
    for read, ceiling in zip(CASES[1::2], CASES[0::2], strict=True):
        ratio = statistics.median(r[read.name]["rps"] / r[ceiling.name]["rps"] for r in runs)
        for case in (ceiling, read):
            lines.append(
                f"{case.name:<46}"
                f"{statistics.median(r[case.name]['rps'] for r in runs):>9.0f}"
                f"{statistics.median(r[case.name]['p50_ms'] for r in runs):>8.1f}"
                f"{statistics.median(r[case.name]['p99_ms'] for r in runs):>8.1f}"
                + (f"{ratio:>8.2f}" if case is read else "")
            )
    hit = statistics.median(r[CASES[1].name]["rps"] / r[CASES[0].name]["rps"] for r in runs)
    lines.append(f"in-process hit / ceiling = {hit:.2f} (goal: bench/goals.toml)")
    return "\n".join(lines)


def headline(figures: dict[str, Any]) -> list[Figure]:
    runs = figures["runs"]
    hit = statistics.median(r[CASES[1].name]["rps"] / r[CASES[0].name]["rps"] for r in runs)
    rows = [Figure("catalog.hit_vs_ceiling", hit, "x", "in-process hit / its ceiling")]
    for read in CASES[1::2]:
        rps = statistics.median(r[read.name]["rps"] for r in runs)
        name = read.name.lower().replace("-", "_").replace(" ", "_")
        rows.append(Figure(f"catalog.{name}_per_s", rps, "/s", f"{read.name}: reads/s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    figures = measure(args.connections, args.duration_s, args.repeats)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    save(args.figures, headline(figures))


if __name__ == "__main__":
    main()
