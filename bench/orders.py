"""Order throughput through the shop vs. pgbench running the same statements on the same cluster.

Starts a fresh lab stack (primary + synchronous standby), then for the same number of clients
and the same duration measures, in one run:
  1. the shop: POST /orders over HTTP to both instances (2PC over two databases), driven by
     wrk (a C load generator, as pgbench is a C client), one wrk per instance; the count of
     201s is checked against the rows in the orders table;
  2. pgbench, the shop's 2PC statements one per round trip (BEGIN; guarded UPDATE with its
     movement row; PREPARE; BEGIN; INSERT order; PREPARE; decision row; COMMIT PREPARED
     twice: bench/pgbench_2pc.sql), for context;
  3. pgbench, the same statements in the four round trips the shop sends them in
     (bench/pgbench_2pc_batched.sql; the shop overlaps the last two, pgbench cannot): the
     limit the goal is stated against (bench/goals.toml), so that what the batching gains on
     the database's side is not counted as the shop's;
  4. pgbench, the same work as one local transaction (for reference).
Prints tps, p50/p99 latency and the ratios. The shop's percentiles are the worse of the two
instances' (wrk reports each; they cannot be merged exactly). With --repeats N the four runs
are repeated N times on the same stack and the medians reported.

CPU per order/transaction: the user+system time of each process tree (the shops' gunicorn
masters and workers; both PostgreSQL nodes, every backend, walsender/walreceiver; Redis; the
load generator) read from /proc/<pid>/stat before and after each run, divided by the count.
A process that exited during the run (a pgbench backend) is in its parent's cutime/cstime.
Usage: python bench/orders.py [--clients 16] [--duration-s 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import text

from lab import postgres as pg
from lab.bench_goals import Figure, save
from lab.layout import StackLayout, find_free_base_port
from lab.stack import Stack
from shop.db import make_engine
from shop.schema import create_schema, seed_products

PRODUCTS = 1000
STOCK = 10_000_000

BENCH_DIR = Path(__file__).parent
SCRIPTS = {
    "2pc": BENCH_DIR / "pgbench_2pc.sql",
    "2pc_batched": BENCH_DIR / "pgbench_2pc_batched.sql",
    "local": BENCH_DIR / "pgbench_local.sql",
}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and of its children it has reaped)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue  # gone meanwhile
        fields = raw[raw.rindex(b")") + 2 :].split()
        # state ppid ... utime(11) stime(12) cutime(13) cstime(14), counted from `state`
        ticks = sum(int(f) for f in fields[11:15])
        table[int(entry.name)] = (int(fields[1]), ticks / CLOCK_TICKS)
    return table


def tree_cpu_s(roots: Iterable[int], table: dict[int, tuple[int, float]]) -> float:
    """CPU seconds of the roots and every descendant (live ones, and reaped ones via cutime)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, [r for r in roots if r in table], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid][1]
        todo.extend(children.get(pid, []))
    return total


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds spent by each group of process trees (and by our own children, the load
    generators) between `start()` and `stop()`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    def _sample(self) -> dict[str, float]:
        table = proc_table()
        sample = {name: tree_cpu_s(pids, table) for name, pids in self.groups.items()}
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample["client"] = usage.ru_utime + usage.ru_stime
        sample["machine_busy"], sample["machine_total"] = machine_busy_s()
        return sample

    def measure(self, run: Callable[[], T]) -> tuple[T, dict[str, float]]:
        before = self._sample()
        result = run()
        after = self._sample()
        return result, {name: after[name] - before[name] for name in after}


def stack_cpu_groups(stack: Stack) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {"shop": [], "postgres": [], "redis": []}
    role_group = {"shop": "shop", "primary": "postgres", "standby": "postgres", "cache": "redis"}
    for name, proc in stack.processes.items():
        group = role_group.get(stack.roles.get(name, ""))
        if group is not None and proc.pid is not None:
            groups[group].append(proc.pid)
    return groups


def cpu_per_unit(cpu: dict[str, float], count: float) -> dict[str, float]:
    """Milliseconds of CPU per order (or transaction), and how busy the machine was."""
    per = {
        f"{name}_ms": 1000 * cpu[name] / count if count else float("nan")
        for name in ("shop", "postgres", "redis", "client")
    }
    per["machine_busy_pct"] = 100 * cpu["machine_busy"] / max(cpu["machine_total"], 1e-9)
    return per


def percentile(values: list[float], q: float) -> float:
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return cuts[min(int(q * 1000) - 1, len(cuts) - 1)]


def run_pgbench(
    stack: Stack, name: str, clients: int, duration_s: int, workdir: Path
) -> dict[str, Any]:
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


def parse_wrk(output: str) -> dict[str, Any]:
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


def run_wrk(urls: list[str], clients: int, duration_s: int, tag: str = "") -> dict[str, Any]:
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
            env={**os.environ, "PRODUCTS": str(PRODUCTS), "KEY_TAG": f"{os.getpid()}-{tag}{n}"},
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


def measure(clients: int, duration_s: int, repeats: int = 1) -> dict[str, Any]:
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
        meter = CpuMeter(stack_cpu_groups(stack))
        urls = stack.describe()["shop"]["instances"]
        runs = []
        for repeat in range(repeats):
            before = count_orders(stack)
            load = functools.partial(run_wrk, urls, clients, duration_s, f"r{repeat}-")
            shop, cpu = meter.measure(load)
            shop["orders_in_database"] = count_orders(stack) - before
            shop["cpu"] = cpu_per_unit(cpu, shop["acknowledged"])
            figures = {"shop": shop}
            for name in SCRIPTS:
                sub = workdir / f"{repeat}-{name}"
                sub.mkdir()
                run = functools.partial(run_pgbench, stack, name, clients, duration_s, sub)
                done, cpu = meter.measure(run)
                done["cpu"] = cpu_per_unit(cpu, done["transactions"])
                figures[f"pgbench_{name}"] = done
            runs.append(figures)
            print(report_run(figures), file=sys.stderr)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"clients": clients, "duration_s": duration_s, "runs": runs}


ROWS = (
    ("shop", "shop POST /orders (HTTP, 2PC)"),
    ("pgbench_2pc", "pgbench, the 2PC sequence"),
    ("pgbench_2pc_batched", "pgbench, 2PC in the shop's 4 trips"),
    ("pgbench_local", "pgbench, one local transaction"),
)


def report_run(figures: dict[str, Any]) -> str:
    lines = [
        f"{'what':<32}{'tps':>7}{'p50 ms':>8}{'p99 ms':>8}"
        f"   CPU ms per order: {'shop':>5}{'pg':>6}{'redis':>6}{'client':>7}{'busy%':>7}"
    ]
    for key, name in ROWS:
        f, c = figures[key], figures[key]["cpu"]
        lines.append(
            f"{name:<32}{f['tps']:>7.0f}{f['p50_ms']:>8.1f}{f['p99_ms']:>8.1f}"
            f"{'':>21}{c['shop_ms']:>5.2f}{c['postgres_ms']:>6.2f}{c['redis_ms']:>6.2f}"
            f"{c['client_ms']:>7.2f}{c['machine_busy_pct']:>7.0f}"
        )
    shop, two_pc, batched, local = (figures[key]["tps"] for key, _ in ROWS)
    lines.append(f"shop / pgbench 2PC in the shop's round trips = {shop / batched:.2f}")
    lines.append(f"shop / pgbench 2PC one statement per round trip = {shop / two_pc:.2f}")
    lines.append(f"pgbench 2PC / local = {two_pc / local:.2f}")
    shop_fig = figures["shop"]
    lines.append(f"shop errors: {shop_fig['errors']}")
    lines.append(
        f"shop acknowledged {shop_fig['acknowledged']} orders; "
        f"the orders table gained {shop_fig['orders_in_database']}"
    )
    return "\n".join(lines)


def report(figures: dict[str, Any]) -> str:
    runs = figures["runs"]
    lines = [f"=== run {n + 1} of {len(runs)}\n{report_run(run)}" for n, run in enumerate(runs)]

    def median(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(run) for run in runs)

    ratio = median(lambda r: r["shop"]["tps"] / r["pgbench_2pc_batched"]["tps"])
    lines.append(
        f"=== medians over {len(runs)} runs ({figures['clients']} clients, "
        f"{figures['duration_s']} s each): shop {median(lambda r: r['shop']['tps']):.0f} tps, "
        f"p99 {median(lambda r: r['shop']['p99_ms']):.1f} ms; pgbench 2PC "
        f"{median(lambda r: r['pgbench_2pc_batched']['tps']):.0f} tps in the shop's round trips; "
        f"shop / pgbench = {ratio:.2f} (goal: bench/goals.toml); CPU ms per order: shop "
        f"{median(lambda r: r['shop']['cpu']['shop_ms']):.2f}, PostgreSQL "
        f"{median(lambda r: r['shop']['cpu']['postgres_ms']):.2f} (pgbench 2PC: PostgreSQL "
        f"{median(lambda r: r['pgbench_2pc_batched']['cpu']['postgres_ms']):.2f} per transaction)"
    )
    return "\n".join(lines)


def headline(figures: dict[str, Any]) -> list[Figure]:
    """Medians over the repeats. The ratio is against pgbench sending the shop's statements in
    the shop's own round trips (4, as `shop/sqlbatch.py`); the 9-trip ratio is context."""
    runs = figures["runs"]

    def median(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(run) for run in runs)

    clients = figures["clients"]
    return [
        Figure("orders.vs_pgbench_own_trips",
               median(lambda r: r["shop"]["tps"] / r["pgbench_2pc_batched"]["tps"]), "x",
               "shop / pgbench 2PC in the shop's 4 round trips"),
        Figure("orders.vs_pgbench_9_trips",
               median(lambda r: r["shop"]["tps"] / r["pgbench_2pc"]["tps"]), "x",
               "shop / pgbench 2PC one statement per round trip (9 trips)"),
        Figure("orders.p99_ms", median(lambda r: r["shop"]["p99_ms"]), "ms",
               f"shop p99 at {clients} clients"),
        Figure("orders.per_s", median(lambda r: r["shop"]["tps"]), "/s", "shop orders/s"),
        Figure("orders.pgbench_own_trips_per_s",
               median(lambda r: r["pgbench_2pc_batched"]["tps"]), "/s",
               "pgbench 2PC in 4 round trips: transactions/s"),
        Figure("orders.cpu_shop_ms", median(lambda r: r["shop"]["cpu"]["shop_ms"]), "ms",
               "CPU per order: shop"),
        Figure("orders.cpu_postgres_ms", median(lambda r: r["shop"]["cpu"]["postgres_ms"]),
               "ms", "CPU per order: PostgreSQL"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    figures = measure(args.clients, args.duration_s, args.repeats)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    save(args.figures, headline(figures))


if __name__ == "__main__":
    main()
