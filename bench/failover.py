"""Primary kill -> first acknowledged order, and kill -> full redundancy again (the old
primary rewound and streaming as the synchronous standby), over N trials on one lab stack
with its control plane; the acknowledged orders lost. Beside them, the same two measured with
the control plane paused and the steps run by hand at once (promote, first write; rewind,
stream, synchronous): the limit of the steps themselves, with no detection or dispatch.

Goals (issue 11): outage p50 < 0.4 s, p99 < 0.8 s; redundancy p50 < 3 s, max < 6 s; 0 lost.

    .venv/bin/python bench/failover.py --trials 10 --limit-trials 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.bench_goals import Figure, save
from lab.chaos import inject
from lab.chaos.base import processes_of
from lab.layout import StackLayout, find_free_base_port
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
POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class Trial:
    outage_s: float  # kill -> first 201 of a request sent after it
    redundant_s: float  # kill -> the old primary streams as the synchronous standby
    acked: list[str]
    where: str  # what the control plane says it did, step by step


def trial(stack: Stack) -> Trial:
    """Kill the leader while one client orders in a loop (until the cluster is redundant
    again): seconds to the first 201 sent after the kill, and to full redundancy."""
    leader = wait_redundant(stack, timeout_s=120)
    shop = described(stack)["shop"]["instances"][0]
    acked: list[str] = []
    first_after: list[float] = []
    killed_at: list[float] = []
    after: list[tuple[float, str, float]] = []  # (sent after the kill, outcome, seconds taken)
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + REDUNDANT_WITHIN_S + 30
        with requests.Session() as session:
            while not stop.is_set() and time.monotonic() < deadline:
                sent_at = time.monotonic()
                try:
                    r = session.post(
                        f"{shop}/orders",
                        json={
                            "product_id": 1 + len(acked) % 50,
                            "quantity": 1,
                            "customer": "bench",
                            "address": "1 Road",
                        },
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                        timeout=15,
                    )
                except requests.RequestException as exc:
                    if killed_at:
                        after.append(
                            (sent_at - killed_at[0], type(exc).__name__, time.monotonic() - sent_at)
                        )
                    continue
                if killed_at:
                    after.append(
                        (sent_at - killed_at[0], str(r.status_code), time.monotonic() - sent_at)
                    )
                if r.status_code == 201:
                    acked.append(r.json()["id"])
                    # Only a request sent after the kill shows the new primary took writes:
                    # one in flight at the kill may have committed on the old one.
                    if killed_at and sent_at > killed_at[0] and not first_after:
                        first_after.append(time.monotonic() - killed_at[0])

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(acked) >= 5, timeout_s=30, what="orders flowing")
        # The chaos API's kill: every process of the leader at once, as a machine dying would.
        record = inject("kill-primary", stack.layout.data_dir)
        assert record.target == leader, (record.target, leader)
        killed_at.append(record.started.mono)
        redundant_s = time_until(lambda: is_redundant(stack), record.started.mono)
    finally:
        stop.set()
        thread.join(timeout=30)
    if not first_after:
        raise RuntimeError("no order acknowledged after the kill")
    if os.environ.get("BENCH_VERBOSE"):
        print(
            "  requests after the kill (sent at, outcome, took):",
            ", ".join(f"{s:.2f}s {o} {t:.2f}s" for s, o, t in after[:12]),
        )
    return Trial(first_after[0], redundant_s, acked, failover_steps(stack, record.started.at))


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
        runs = [
            r
            for r in view.api_get("/actions?action=failover&limit=50")["actions"]
            if datetime.fromisoformat(r["created_at"]) >= since
        ]
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
        executor.set_fact(pg_ops.SYNCHRONOUS, False)
        standby = pg_ops.views({new: nodes[new]}, 0.5)[0]
        pg_ops.promote(standby, nodes[new], 30)
        pg_ops.commit_a_write(nodes[new])
        write_s = time.monotonic() - killed
        executor.set_role(new, "primary")
        promoted = pg_ops.views({new: nodes[new]}, 0.5)[0]
        how = pg_ops.rejoin(executor, leader, promoted, nodes, timeout_s=60)
        pg_ops.restore_sync(executor, new, nodes[new], 60)
        redundant_s = time.monotonic() - killed
    finally:
        signal_all(procs, signal.SIGCONT)
    if os.environ.get("BENCH_VERBOSE"):
        print(f"  by hand: {how}")
    return write_s, redundant_s


def wait_first_drill(stack: Stack, timeout_s: float = 180) -> None:
    """The control plane takes its first base backup 5 s after it starts, then drills it
    (restores it into a scratch instance): seconds of heavy I/O. With --after-first-drill the
    trials begin once that is over, so that they measure failovers, not failovers during a
    drill."""
    view = StackView.of(stack.layout.data_dir)

    def drilled() -> bool:
        return any((b.get("drill") or {}).get("at") for b in view.api_get("/backups")["backups"])

    wait_until(drilled, timeout_s=timeout_s, interval_s=0.5, what="the first backup drilled")


def ha_bench_stack(prefix: str) -> Stack:
    """A stack for HA trials: two shops, deep stock, the flapping guard lifted."""
    return Stack(
        StackLayout(lab_tmpdir(prefix), find_free_base_port(), shop_count=2),
        products=50,
        stock=100000,
        policy_overrides=BENCH_LIMITS,
    )


def lost_and_twice(stack: Stack, acknowledged: list[str]) -> tuple[int, int]:
    """Once the cluster is whole and nothing is in doubt: acknowledged orders missing, and
    present more than once."""
    wait_redundant(stack, timeout_s=180)
    wait_until(lambda: prepared_count(stack) == 0, timeout_s=120, what="nothing in doubt")
    present = orders_present(stack, acknowledged)
    return len(set(acknowledged) - set(present)), sum(1 for c in present.values() if c > 1)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def line(what: str, values: list[float], limits: list[float], goal: str) -> str:
    text = (
        f"{what} over {len(values)} trials: p50 {statistics.median(values):.2f}s, "
        f"p99 {p99(values):.2f}s, max {max(values):.2f}s (goal {goal})"
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
    parser.add_argument(
        "--after-first-drill",
        action="store_true",
        help="begin once the control plane's first backup and its drill are done",
    )
    args = parser.parse_args()
    stack = ha_bench_stack("shop-bench-ha-")
    data_dir = stack.layout.data_dir
    trials: list[Trial] = []
    limits: list[tuple[float, float]] = []
    try:
        stack.start()
        if args.after_first_drill:
            wait_first_drill(stack)
        for n in range(args.trials):
            t = trial(stack)
            trials.append(t)
            print(
                f"trial {n + 1}: first acknowledged order {t.outage_s:.2f}s, "
                f"redundant {t.redundant_s:.2f}s after the kill"
            )
            if os.environ.get("BENCH_VERBOSE"):
                print(f"  failover: {t.where}")
        for n in range(args.limit_trials):
            limits.append(limit_trial(stack))
            print(
                f"limit {n + 1}: first write {limits[-1][0]:.2f}s, "
                f"redundant {limits[-1][1]:.2f}s after the kill (by hand)"
            )
        acknowledged = [i for t in trials for i in t.acked]
        lost, twice = lost_and_twice(stack, acknowledged)
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
            "p50 < 0.4s, p99 < 0.8s",
        )
    )
    print(
        line(
            "kill -> redundant (synchronous standby)",
            [t.redundant_s for t in trials],
            [r for _, r in limits],
            "p50 < 3s, max < 6s",
        )
    )
    print(f"{len(acknowledged)} acknowledged orders, {lost} lost, {twice} twice")
    save(args.figures, headline(trials, limits, lost, twice))


def headline(
    trials: list[Trial], limits: list[tuple[float, float]], lost: int, twice: int
) -> list[Figure]:
    outage = [t.outage_s for t in trials]
    redundant = [t.redundant_s for t in trials]
    o50, o99 = statistics.median(outage), p99(outage)
    r50, rmax = statistics.median(redundant), max(redundant)
    figures = [
        Figure("failover", "kill -> first acknowledged order, p50", o50, "s", "< 0.4 s", o50 < 0.4),
        Figure("failover", "kill -> first acknowledged order, p99", o99, "s", "< 0.8 s", o99 < 0.8),
        Figure("failover", "kill -> redundant again, p50", r50, "s", "< 3 s", r50 < 3),
        Figure("failover", "kill -> redundant again, max", rmax, "s", "< 6 s", rmax < 6),
        Figure("failover", "acknowledged orders lost", lost, "", "0", lost == 0),
        Figure("failover", "orders acknowledged twice", twice, "", "0", twice == 0),
    ]
    if limits:
        write_limit = statistics.median(w for w, _ in limits)
        redundant_limit = statistics.median(r for _, r in limits)
        figures += [
            Figure("failover", "limit: kill -> first write, by hand", write_limit, "s", "", None),
            Figure("failover", "limit: kill -> redundant, by hand", redundant_limit, "s", "", None),
        ]
    return figures


if __name__ == "__main__":
    main()
