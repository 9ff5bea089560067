"""Primary kill -> first acknowledged order, and kill -> full redundancy again (the old
primary rewound and streaming as the synchronous standby), over N trials on one lab stack
with its control plane, under 4 clients ordering through both shops; p50, p99 and max over
every trial (none skipped: a kill during the first backup's drill counts). The acknowledged
orders lost, and the products whose stock does not add up. Beside them, the same two measured
with the control plane paused and the steps run by hand at once (promote, first write; rewind,
stream, synchronous): the limit of the steps themselves, with no detection or dispatch.

Goals: bench/goals.toml (today's, and the next ones set from that limit).

    .venv/bin/python bench/failover.py --trials 10 --limit-trials 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import OrderClients
from lab.bench_goals import Figure, save
from lab.chaos import inject
from lab.chaos.base import processes_of
from lab.layout import StackLayout, find_free_base_port
from lab.load import Ledger
from lab.observe import StackView
from lab.process import wait_until
from lab.stack import Stack
from remediation import pg_ops
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import signal_all
from tests.conftest import lab_tmpdir
from tests.test_failover import (
    described,
    is_redundant,
    orders_present,
    prepared_count,
    wait_redundant,
)

# The lab's failover policy allows 3 failovers per 10 minutes, 30 s apart, a guard against a
# flapping cluster; back-to-back trials would measure that guard, not the failover.
BENCH_LIMITS = {
    name: {"cooldown_s": 1, "max_runs": 1000}
    for name in ("failover-primary", "failover-alert", "rejoin-standby")
}
REDUNDANT_WITHIN_S = 60.0
SLOW_TRIAL_S = 1.0  # a trial this slow prints the control plane's steps, whatever the flags
CLIENTS = 4  # ordering through every shop instance, as hang and persist do
POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class Trial:
    outage_s: float  # kill -> first 201 of a request sent after it
    redundant_s: float  # kill -> the old primary streams as the synchronous standby
    acked: list[str]
    where: str  # what the control plane says it did, step by step


def trial(stack: Stack) -> Trial:
    """Kill the leader while CLIENTS clients order through every shop (until the cluster is
    redundant again): seconds to the first acknowledged order sent after the kill, and to
    full redundancy."""
    leader = wait_redundant(stack, timeout_s=120)
    shops = described(stack)["shop"]["instances"]
    load = OrderClients(shops, CLIENTS, max_s=REDUNDANT_WITHIN_S + 30, tag="failover").start()
    try:
        wait_until(lambda: len(load.acks) >= 20, timeout_s=30, what="orders flowing")
        # The chaos API's kill: every process of the leader at once, as a machine dying would.
        record = inject("kill-primary", stack.layout.data_dir)
        assert record.target == leader, (record.target, leader)
        killed_at = record.started.mono
        redundant_s = time_until(lambda: is_redundant(stack), killed_at)
        # Only an order sent after the kill shows the new primary took writes: one in flight
        # at the kill may have committed on the old one.
        wait_until(
            lambda: load.outage_after(killed_at) < float("inf"),
            timeout_s=30,
            what="an order sent after the kill acknowledged",
        )
    finally:
        load.stop()
    return Trial(
        load.outage_after(killed_at),
        redundant_s,
        load.ids(),
        failover_steps(stack, record.started.at),
    )


def time_until(check: Any, since_mono: float) -> float:
    """Seconds from `since_mono` to the first poll that finds `check()` true."""
    deadline = time.monotonic() + REDUNDANT_WITHIN_S
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic() - since_mono
        except (psycopg.Error, OSError):
            pass  # a node going or coming: not yet
        time.sleep(POLL_S)
    raise RuntimeError(f"not redundant within {REDUNDANT_WITHIN_S:g}s of the kill")


def failover_steps(stack: Stack, since: datetime) -> str:
    """The failover run's steps as the control plane audited them: when each happened after
    the kill, and its output (the rejoin's laps)."""
    view = StackView.of(stack.layout.data_dir)
    try:
        runs = sorted(  # oldest first: the last is the one that acted (or the latest try)
            (
                r
                for r in view.api_get("/actions?action=failover&limit=50")["actions"]
                if datetime.fromisoformat(r["created_at"]) >= since
            ),
            key=lambda r: int(r["id"]),
        )
        if not runs:
            return "no failover run"
        run = view.api_get(f"/actions/{runs[-1]['id']}")
    except (requests.RequestException, OSError, ValueError) as exc:
        return f"cannot read the failover run: {exc}"

    def after(at: str) -> str:
        return f"{(datetime.fromisoformat(at) - since).total_seconds():.2f}s"

    detected = sorted(
        i["detected_at"]
        for i in view.api_get("/incidents?limit=50")["incidents"]
        if i.get("detected_at") and datetime.fromisoformat(i["detected_at"]) >= since
    )
    parts = [f"incident at {after(detected[0])}"] if detected else []
    if len(runs) > 1:  # tries before the last: declined, failed or stood aside, and why
        parts += [
            f"run {r['id']} {r['state']} (created {after(r['created_at'])}): "
            f"{str(r.get('reason', ''))[:120]}"
            for r in runs[:-1]
        ]
    parts.append(f"run created {after(runs[-1]['created_at'])}")
    for e in run["audit"]:
        took = f" ({e['duration_ms']:.0f} ms)" if e.get("duration_ms") is not None else ""
        text = e["message"] if e["verb"] == "output" else ""
        parts.append(f"{e['verb']} at {after(e['at'])}{took} {text}".rstrip())
    return "; ".join(parts)


# -- the limit: the same steps by hand, at once -----------------------------------------------
def paused_controlplane(view: StackView) -> Any:
    procs = processes_of(view, "controlplane")
    signal_all(procs, signal.SIGSTOP)
    return procs


def limit_trial(stack: Stack) -> tuple[float, float]:
    """With the control plane paused: kill the leader, then at once fence, promote the
    standby and commit a write on it (the outage's limit); then rewind the old primary,
    start it and restore synchronous commits (redundancy's limit). Seconds from the kill."""
    leader = wait_redundant(stack, timeout_s=120)
    view = StackView.of(stack.layout.data_dir)
    executor = LabExecutor(stack.layout.stack_file)
    nodes = {n: stack.dsn(n) for n in ("pg0", "pg1")}
    new = next(n for n in nodes if n != leader)
    procs = paused_controlplane(view)
    try:
        record = inject("kill-primary", stack.layout.data_dir)
        killed = record.started.mono
        executor.fence(leader)
        standby = pg_ops.views({new: nodes[new]}, 0.5)[0]
        pg_ops.promote(standby, nodes[new], 30)
        pg_ops.commit_a_write(nodes[new])
        write_s = time.monotonic() - killed
        promoted = pg_ops.views({new: nodes[new]}, 0.5)[0]
        how = pg_ops.rejoin(executor, leader, promoted, nodes, timeout_s=60)
        pg_ops.restore_sync(None, new, nodes[new], 60)  # by hand: no facts recorded
        redundant_s = time.monotonic() - killed
    finally:
        signal_all(procs, signal.SIGCONT)
    if os.environ.get("BENCH_VERBOSE"):
        print(f"  by hand: {how}")
    return write_s, redundant_s


def ha_bench_stack(prefix: str) -> Stack:
    """A stack for HA trials: two shops, deep stock, the flapping guard lifted."""
    return Stack(
        StackLayout(lab_tmpdir(prefix), find_free_base_port(), shop_count=2),
        products=50,
        stock=100000,
        policy_overrides=BENCH_LIMITS,
    )


def lost_and_unbalanced(stack: Stack, acknowledged: list[str], before: Ledger) -> tuple[int, int]:
    """Once the cluster is whole and nothing is in doubt: acknowledged orders missing, and
    products whose stock does not add up (stock + sold != the stock before, or sold in the
    inventory != ordered in the orders database: one half of a 2PC without the other).
    Duplicates are not counted: the orders' primary key and idempotency key are unique, so
    such a count could never be non-zero."""
    wait_redundant(stack, timeout_s=180)
    wait_until(lambda: prepared_count(stack) == 0, timeout_s=120, what="nothing in doubt")
    present = orders_present(stack, acknowledged)
    view = StackView.of(stack.layout.data_dir)
    after, initial = Ledger.read(view), before.initial()
    unbalanced = [
        p
        for p in set(after.stock) | set(after.moved) | set(after.ordered)
        if after.stock.get(p, 0) + after.moved.get(p, 0) != initial.get(p, 0)
        or after.moved.get(p, 0) != after.ordered.get(p, 0)
    ]
    return len(set(acknowledged) - set(present)), len(unbalanced)


def ledger_before(stack: Stack) -> Ledger:
    """The stock before any trial, to check what the trials sold against."""
    wait_redundant(stack, timeout_s=120)
    return Ledger.read(StackView.of(stack.layout.data_dir))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def line(what: str, values: list[float], limits: list[float]) -> str:
    text = (
        f"{what} over {len(values)} trials: p50 {statistics.median(values):.2f}s, "
        f"p99 {p99(values):.2f}s, max {max(values):.2f}s"
    )
    if limits:
        limit = statistics.median(limits)
        text += (
            f"; limit (by hand, {len(limits)} trials) p50 {limit:.2f}s, "
            f"p50 ratio {statistics.median(values) / limit:.1f}x"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--limit-trials", type=int, default=3)
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    stack = ha_bench_stack("shop-bench-ha-")
    data_dir = stack.layout.data_dir
    trials: list[Trial] = []
    limits: list[tuple[float, float]] = []
    try:
        stack.start()
        before = ledger_before(stack)
        # Every trial counts, from the first: one during the first backup's drill is a
        # failover during a drill, and its time a figure to improve.
        for n in range(args.trials):
            t = trial(stack)
            trials.append(t)
            print(
                f"trial {n + 1}: first acknowledged order {t.outage_s:.2f}s, "
                f"redundant {t.redundant_s:.2f}s after the kill"
            )
            if os.environ.get("BENCH_VERBOSE") or t.outage_s > SLOW_TRIAL_S:
                print(f"  failover: {t.where}")  # a slow trial always says where time went
        for n in range(args.limit_trials):
            limits.append(limit_trial(stack))
            print(
                f"limit {n + 1}: first write {limits[-1][0]:.2f}s, "
                f"redundant {limits[-1][1]:.2f}s after the kill (by hand)"
            )
        acknowledged = [i for t in trials for i in t.acked]
        lost, unbalanced = lost_and_unbalanced(stack, acknowledged, before)
    finally:
        stack.stop()
        if os.environ.get("BENCH_KEEP_LOGS"):  # for a post-mortem: the servers' own logs
            shutil.copytree(stack.layout.logs, os.environ["BENCH_KEEP_LOGS"], dirs_exist_ok=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    print(
        line(
            "kill -> first acknowledged order",
            [t.outage_s for t in trials],
            [w for w, _ in limits],
        )
    )
    print(
        line(
            "kill -> redundant (synchronous standby)",
            [t.redundant_s for t in trials],
            [r for _, r in limits],
        )
    )
    print(
        f"{len(acknowledged)} acknowledged orders, {lost} lost; "
        f"{unbalanced} products whose stock does not add up"
    )
    save(args.figures, headline(trials, limits, lost, unbalanced))


def headline(
    trials: list[Trial], limits: list[tuple[float, float]], lost: int, unbalanced: int
) -> list[Figure]:
    """p50, p99 and max over every trial; the limit by hand (median) for context."""
    outage = [t.outage_s for t in trials]
    redundant = [t.redundant_s for t in trials]
    figures = [
        Figure("failover.outage_p50_s", statistics.median(outage), "s",
               "kill -> first acknowledged order, p50"),
        Figure("failover.outage_p99_s", p99(outage), "s", "kill -> first acknowledged order, p99"),
        Figure("failover.outage_max_s", max(outage), "s", "kill -> first acknowledged order, max"),
        Figure("failover.redundant_p50_s", statistics.median(redundant), "s",
               "kill -> redundant again, p50"),
        Figure("failover.redundant_p99_s", p99(redundant), "s", "kill -> redundant again, p99"),
        Figure("failover.redundant_max_s", max(redundant), "s", "kill -> redundant again, max"),
        Figure("failover.trials", len(trials), "", "trials (every one counted)"),
        Figure("failover.lost", lost, "", "acknowledged orders lost"),
        Figure("failover.unbalanced_products", unbalanced, "",
               "products whose stock sold differs from their quantity ordered"),
    ]  # fmt: skip
    if limits:
        figures += [
            Figure("failover.limit_write_s", statistics.median(w for w, _ in limits), "s",
                   "limit: kill -> first write, by hand"),
            Figure("failover.limit_redundant_s", statistics.median(r for _, r in limits), "s",
                   "limit: kill -> redundant, by hand"),
        ]  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
