"""Order throughput through the shop vs. pgbench running the same statements on the same cluster.

Starts a fresh lab stack (primary + synchronous standby), then for the same number of clients
and the same duration measures, in one run:
  1. the shop: POST /orders over HTTP to both instances (2PC over two databases), driven by
     wrk (a C load generator, as pgbench is a C client), one wrk per instance; the count of
     201s is checked against the rows in the orders table;
  2. pgbench, the 2PC sequence the shop sends (idempotency SELECT; guarded UPDATE; INSERT
     movement; PREPARE; INSERT order; PREPARE; decision row; COMMIT PREPARED twice);
  3. pgbench, the same work as one local transaction (for reference).
Prints tps, p50/p99 latency and the ratios. The shop's percentiles are the worse of the two
instances' (wrk reports each; they cannot be merged exactly).
Usage: python bench/orders.py [--clients 16] [--duration-s 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import text

from lab import postgres as pg
from lab.layout import StackLayout, find_free_base_port
from lab.stack import Stack
from shop.db import make_engine
from shop.schema import create_schema, seed_products

PRODUCTS = 1000
STOCK = 10_000_000

BENCH_DIR = Path(__file__).parent
SCRIPTS = {"2pc": BENCH_DIR / "pgbench_2pc.sql", "local": BENCH_DIR / "pgbench_local.sql"}


def percentile(values: list[float], q: float) -> float:
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return cuts[min(int(q * 1000) - 1, len(cuts) - 1)]


def run_pgbench(
    stack: Stack, name: str, clients: int, duration_s: int, workdir: Path
) -> dict[str, float]:
    script_path = workdir / f"{name}.sql"
    script_path.write_text(SCRIPTS[name].read_text().replace("RUN:", f"{name}:"))
    argv = [
        stack.binaries.pg("pgbench"), "-h", "127.0.0.1", "-p", str(stack.layout.pg_port(0)),
        "-U", pg.SUPERUSER, "-n", "-M", "simple", "-c", str(clients), "-j", "2",
        "-T", str(duration_s), "-f", str(script_path), "--log",
        f"--log-prefix={workdir / ('log_' + name)}", "bench",
    ]  # fmt: skip
    env = {**os.environ, "PGPASSFILE": str(stack.pg_auth.passfile)}
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pgbench {name} failed:\n{done.stdout}\n{done.stderr}")
    latencies_ms = [
        int(line.split()[2]) / 1000
        for log in workdir.glob(f"log_{name}*")
        for line in log.read_text().splitlines()
    ]
    tps = next(
        float(line.split("=")[1].split()[0])
        for line in done.stdout.splitlines()
        if line.startswith("tps =")
    )
    return {
        "tps": tps,
        "p50_ms": percentile(latencies_ms, 0.5),
        "p99_ms": percentile(latencies_ms, 0.99),
        "transactions": len(latencies_ms),
    }


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match[1]) * UNITS_MS[match[2]]


def parse_wrk(output: str) -> dict[str, float]:
    requests_done = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {
        "requests": requests_done,
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": socket_errors[1] if socket_errors else "",
        "p50_ms": wrk_ms(re.search(r"\s50%\s+(\S+)", output)[1]),  # type: ignore[index]
        "p99_ms": wrk_ms(re.search(r"\s99%\s+(\S+)", output)[1]),  # type: ignore[index]
    }


def run_wrk(urls: list[str], clients: int, duration_s: int) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: run `apt-get install -y wrk` (or `make bench`)")
    script = BENCH_DIR / "orders.lua"
    per_instance = max(1, clients // len(urls))
    procs = [
        subprocess.Popen(
            [
                wrk,
                "-t1",
                f"-c{per_instance}",
                f"-d{duration_s}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PRODUCTS": str(PRODUCTS), "KEY_TAG": f"{os.getpid()}-{n}"},
        )
        for n, url in enumerate(urls)
    ]
    runs = [parse_wrk(proc.communicate(timeout=duration_s + 60)[0]) for proc in procs]
    ok = sum(r["requests"] - r["non_2xx"] for r in runs)
    return {
        "tps": ok / duration_s,
        "p50_ms": max(r["p50_ms"] for r in runs),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "acknowledged": ok,
        "errors": {
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket": [r["socket_errors"] for r in runs if r["socket_errors"]],
        },
    }


def count_orders(stack: Stack) -> int:
    with stack.connect("pg0", "orders") as conn:
        row = conn.execute("SELECT count(*) FROM orders").fetchone()
    return int(row[0]) if row else 0


def prepare_bench_database(stack: Stack) -> None:
    """A `bench` database with both table sets, so one pgbench session runs the whole order."""
    with stack.connect("pg0") as conn:
        conn.execute("DROP DATABASE IF EXISTS bench")
        conn.execute("CREATE DATABASE bench")
    url = (
        f"postgresql+psycopg://{pg.SUPERUSER}@/bench?host=127.0.0.1:{stack.layout.pg_port(0)}"
        f"&passfile={stack.pg_auth.passfile}"
    )
    engine = make_engine(url, stack.shop_settings(), role="bench", with_deadline=False)
    try:
        create_schema(engine, engine)
        seed_products(engine, count=PRODUCTS, stock=STOCK)
        with engine.begin() as conn:
            conn.execute(text("CHECKPOINT"))
    finally:
        engine.dispose()


def measure(clients: int, duration_s: int) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-orders-", dir="/tmp"))
    data_dir.chmod(0o755)
    # The shop alone: no control plane probing beside it (bench/controlplane.py measures that).
    stack = Stack(
        StackLayout(data_dir, find_free_base_port()),
        products=PRODUCTS,
        stock=STOCK,
        with_controlplane=False,
    )
    try:
        stack.start()
        prepare_bench_database(stack)
        workdir = data_dir / "pgbench"
        workdir.mkdir()
        print(f"stack up; {clients} clients, {duration_s}s per run", file=sys.stderr)
        before = count_orders(stack)
        shop = run_wrk(stack.describe()["shop"]["instances"], clients, duration_s)
        shop["orders_in_database"] = count_orders(stack) - before
        two_pc = run_pgbench(stack, "2pc", clients, duration_s, workdir)
        local = run_pgbench(stack, "local", clients, duration_s, workdir)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "clients": clients,
        "duration_s": duration_s,
        "shop": shop,
        "pgbench_2pc": two_pc,
        "pgbench_local": local,
    }


def report(figures: dict[str, Any]) -> str:
    rows = [
        ("shop POST /orders (HTTP, 2PC)", figures["shop"]),
        ("pgbench, the 2PC sequence", figures["pgbench_2pc"]),
        ("pgbench, one local transaction", figures["pgbench_local"]),
    ]
    lines = [f"{'what':<34}{'tps':>8}{'p50 ms':>9}{'p99 ms':>9}"]
    lines += [f"{n:<34}{f['tps']:>8.0f}{f['p50_ms']:>9.1f}{f['p99_ms']:>9.1f}" for n, f in rows]
    shop, two_pc, local = (f["tps"] for _, f in rows)
    lines.append(f"shop / pgbench 2PC  = {shop / two_pc:.2f}   (goal >= 0.50)")
    lines.append(f"pgbench 2PC / local = {two_pc / local:.2f}")
    shop_fig = figures["shop"]
    lines.append(f"shop errors: {shop_fig['errors']}")
    lines.append(
        f"shop acknowledged {shop_fig['acknowledged']} orders; "
        f"the orders table gained {shop_fig['orders_in_database']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = measure(args.clients, args.duration_s)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
