"""Hangs, not deaths: every process of the primary (or of the standby) SIGSTOPped for 5, 15
and 60 s under load (4 clients ordering through both shops), then SIGCONT. Per trial: write
outage (hang -> first acknowledged order sent after it; goal <= grace + 2 s = 7 s whatever
the hang's length), the longest window without any acknowledged order, time to full
redundancy (goal < 30 s from the hang), orders lost and acknowledged twice (goal 0), restore
runs proposed (goal 0) and split-brain samples (two writable nodes at once, goal 0).

    .venv/bin/python bench/hang.py [--hangs 5 15 60] [--nodes primary standby]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.failover import ha_bench_stack, lost_and_twice
from lab.process import wait_until
from lab.stack import Stack
from remediation.executors.processes import in_directory, process_table
from tests.test_controlplane import Api
from tests.test_failover import described, is_redundant

CLIENTS = 4


@dataclass(slots=True)
class Trial:
    node: str
    hang_s: float
    outage_s: float
    longest_gap_s: float
    redundant_s: float
    acked: list[str]
    restore_runs: int
    split_brain: int


def hang_every_process(data_dir: str) -> list[int]:
    """SIGSTOP every process of the instance: the postmaster and each backend (setsid'd)."""
    pids = [p.pid for p in in_directory(data_dir)(process_table())]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def wake(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def writable(port: int) -> bool:
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", connect_timeout=2, autocommit=True
        ) as conn:
            conn.execute("SET statement_timeout = 1000")
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            return bool(row) and not row[0]
    except psycopg.Error:
        return False


def split_brain_sampler(stack: Stack, stop: threading.Event, samples: list[int]) -> None:
    """Polls both nodes from outside the control plane, each in its own thread (a hung node
    must not slow the other's samples): a sample where both accept writes is a split brain."""
    state = {0: False, 1: False}

    def poll(index: int) -> None:
        while not stop.is_set():
            state[index] = writable(stack.layout.pg_port(index))
            if state[0] and state[1]:
                samples.append(1)
            time.sleep(0.1)

    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


def trial(stack: Stack, api: Api, role: str, hang_s: float) -> Trial:
    wait_until(lambda: is_redundant(stack), timeout_s=180, what="a redundant cluster")
    comps = described(stack)["components"]
    node = next(n for n, c in comps.items() if c["role"] == role and "data_dir" in c)
    shops = described(stack)["shop"]["instances"]
    restores_before = len(api.get("/actions?action=restore&limit=500")["actions"])
    acks: list[tuple[float, float, str]] = []  # (sent, acknowledged, id)
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        deadline = time.monotonic() + hang_s + 90
        with requests.Session() as session:
            while not stop.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    r = session.post(
                        f"{shops[n % len(shops)]}/orders",
                        json={
                            "product_id": 1 + (n * 7 + len(acks)) % 50,
                            "quantity": 1,
                            "customer": f"hang-{n}",
                            "address": "1 Road",
                        },
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                        timeout=15,
                    )
                except requests.RequestException:
                    time.sleep(0.05)
                    continue
                if r.status_code == 201:
                    with lock:
                        acks.append((sent, time.monotonic(), r.json()["id"]))
                else:
                    time.sleep(0.05)

    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in clients:
        t.start()
    wait_until(lambda: len(acks) >= 20, timeout_s=30, what="orders flowing")
    samples: list[int] = []
    sampler = threading.Thread(target=split_brain_sampler, args=(stack, stop, samples))
    sampler.start()
    pids = hang_every_process(comps[node]["data_dir"])
    # From the moment every process is stopped: an order sent before may still have had its
    # decision committed, and is rightly acknowledged once its deadline frees it.
    hung_at = time.monotonic()
    redundant_at: list[float] = []

    def watch_redundancy() -> None:
        time.sleep(1)  # the fault must first be seen: a node stopped a moment ago still looks fine
        while time.monotonic() < hung_at + hang_s + 120 and not redundant_at:
            if is_redundant(stack):
                redundant_at.append(time.monotonic())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_redundancy, daemon=True)
    watcher.start()
    try:
        while time.monotonic() < hung_at + hang_s:
            time.sleep(0.1)
    finally:
        wake(pids)
    watcher.join(timeout=130)
    time.sleep(2)  # a little load after the recovery: the shops serve the new shape
    stop.set()
    for t in clients:
        t.join(timeout=20)
    sampler.join(timeout=30)
    with lock:
        done = sorted(acks, key=lambda a: a[1])
    after = [a for a in done if a[0] > hung_at]
    outage = (after[0][1] - hung_at) if after else float("inf")
    times = [hung_at] + [a[1] for a in done if a[1] > hung_at]
    gap = max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))
    restores = len(api.get("/actions?action=restore&limit=500")["actions"]) - restores_before
    return Trial(
        node=f"{role} {node}",
        hang_s=hang_s,
        outage_s=outage,
        longest_gap_s=gap,
        redundant_s=(redundant_at[0] - hung_at) if redundant_at else float("inf"),
        acked=[a[2] for a in done],
        restore_runs=restores,
        split_brain=len(samples),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hangs", type=float, nargs="+", default=[5, 15, 60])
    parser.add_argument("--nodes", nargs="+", default=["primary", "standby"])
    args = parser.parse_args()
    stack = ha_bench_stack("shop-bench-hang-")
    data_dir = stack.layout.data_dir
    trials: list[Trial] = []
    try:
        stack.start()
        api = Api(stack)
        for role in args.nodes:
            for hang_s in args.hangs:
                t = trial(stack, api, role, hang_s)
                trials.append(t)
                print(
                    f"{t.node} hung {t.hang_s:g}s: write outage {t.outage_s:.2f}s, longest gap "
                    f"{t.longest_gap_s:.2f}s, redundant after {t.redundant_s:.1f}s, "
                    f"{len(t.acked)} acknowledged, restore runs {t.restore_runs}, "
                    f"split-brain samples {t.split_brain}",
                    flush=True,
                )
        acknowledged = [i for t in trials for i in t.acked]
        lost, twice = lost_and_twice(stack, acknowledged)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print()
    print("| node | hang | write outage | longest gap | redundant after | restores | split |")
    print("|---|---|---|---|---|---|---|")
    for t in trials:
        print(
            f"| {t.node} | {t.hang_s:g} s | {t.outage_s:.2f} s | {t.longest_gap_s:.2f} s | "
            f"{t.redundant_s:.1f} s | {t.restore_runs} | {t.split_brain} |"
        )
    print(f"\n{len(acknowledged)} acknowledged orders in all: {lost} lost, {twice} twice")


if __name__ == "__main__":
    main()
