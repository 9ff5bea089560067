"""Healing that goes on, measured from outside on a lab stack with the lab's own policies
(limits included: 3 failovers in 10 minutes, a 30 s cooldown), under 4 clients ordering
through both shops:

- `standby-stopped`: every process of the standby stopped, the primary killed, the standby
  woken 6 s later. The first failover declines ("no standby answers": not now); a later
  try promotes: writes back soon after the standby wakes.
- `five-kills`: the primary killed five times, 35 s apart: every kill healed (the fourth and
  fifth pass the policy's limit, which must not keep the shop down).
- `gameday`: a short game day of the faults that move or stall the cluster, on the same
  stack and commit, without and then with `--stress` (CPU hogs on every core): write outage
  per fault both ways; every trial healed by the control plane, nothing lost either way.

Per trial: write outage (fault -> first acknowledged order sent after it), the failover's
tries, redundancy; over all: orders lost, products whose stock does not add up, split-brain
samples. Goals: bench/goals.toml.

    .venv/bin/python bench/persist.py [--trials 3] [--kills 5] [--every-s 35]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import OrderClients
from bench.failover import ledger_before, lost_and_unbalanced
from lab.bench_goals import Figure, save
from lab.chaos import inject
from lab.chaos.base import continue_processes, stop_component
from lab.gameday import SplitBrainSampler, gameday
from lab.layout import StackLayout, find_free_base_port
from lab.observe import StackView
from lab.process import wait_until
from lab.stack import Stack
from tests.conftest import lab_tmpdir
from tests.test_controlplane import Api
from tests.test_failover import described, is_redundant

CLIENTS = 4
STANDBY_STOPPED_S = 6.0
HEALED_WITHIN_S = 60.0  # a kill whose writes are not back by then counts as not healed


@dataclass(slots=True)
class Trial:
    scenario: str
    outage_s: float  # fault -> first acknowledged order sent after it
    after_wake_s: float | None  # standby woken -> that acknowledgement (standby-stopped only)
    declined: int  # failover runs since the fault that declined "not now" (and were retried)
    redundant_s: float


def not_now_since(api: Api, since: datetime) -> int:
    """Failover runs since `since` whose precheck declined "not now": each is followed by a
    later try (of its incident, or of the other incident about the same fault)."""
    return sum(
        r["output"].get("decline") == "not-now"
        for r in api.get("/actions?action=failover&limit=500")["actions"]
        if datetime.fromisoformat(r["created_at"]) >= since
    )


def redundant_after(stack: Stack, at: float) -> float:
    try:
        wait_until(lambda: is_redundant(stack), timeout_s=180, interval_s=0.2, what="redundant")
    except Exception:  # not whole again: a figure, not a crash of the bench
        return float("inf")
    return time.monotonic() - at


def standby_stopped(stack: Stack, api: Api, load: OrderClients) -> Trial:
    wait_until(lambda: is_redundant(stack), timeout_s=180, what="a redundant cluster")
    view = StackView.of(stack.layout.data_dir)
    standby = view.standby()
    assert standby is not None
    since = datetime.now(UTC)
    _, procs = stop_component(view, standby)
    try:
        inject("kill-primary", stack.layout.data_dir)
        killed_at = time.monotonic()
        time.sleep(STANDBY_STOPPED_S)  # the fault's length: the standby stays stopped
    finally:
        continue_processes(procs)
    woke_at = time.monotonic()
    wait_until(
        lambda: load.outage_after(killed_at) < float("inf"),
        timeout_s=HEALED_WITHIN_S,
        what="orders acknowledged again",
    )
    outage = load.outage_after(killed_at)
    return Trial(
        "standby-stopped",
        outage,
        killed_at + outage - woke_at,
        not_now_since(api, since),
        redundant_after(stack, killed_at),
    )


def one_kill(stack: Stack, api: Api, load: OrderClients) -> Trial:
    since = datetime.now(UTC)
    inject("kill-primary", stack.layout.data_dir)
    killed_at = time.monotonic()
    try:
        wait_until(
            lambda: load.outage_after(killed_at) < float("inf"),
            timeout_s=HEALED_WITHIN_S,
            what="orders acknowledged again",
        )
    except Exception:
        return Trial("five-kills", float("inf"), None, not_now_since(api, since), 0.0)
    return Trial(
        "five-kills",
        load.outage_after(killed_at),
        None,
        not_now_since(api, since),
        redundant_after(stack, killed_at),
    )


def run(args: argparse.Namespace) -> tuple[list[Trial], int, int, int]:
    stack = Stack(
        StackLayout(lab_tmpdir("shop-bench-persist-"), find_free_base_port(), shop_count=2),
        products=50,
        stock=100000,
    )
    data_dir = stack.layout.data_dir
    trials: list[Trial] = []
    try:
        stack.start()
        before = ledger_before(stack)
        api = Api(stack)
        shops = described(stack)["shop"]["instances"]
        budget_s = args.trials * 120 + args.kills * (args.every_s + 60) + 120
        load = OrderClients(shops, CLIENTS, max_s=budget_s, tag="persist").start()
        sampler = SplitBrainSampler(StackView.of(data_dir)).start()
        started = time.monotonic()
        wait_until(lambda: len(load.acks) >= 20, timeout_s=30, what="orders flowing")
        for _ in range(args.trials):
            trials.append(standby_stopped(stack, api, load))
            report(trials[-1])
        wait_until(lambda: is_redundant(stack), timeout_s=180, what="a redundant cluster")
        for n in range(args.kills):
            kill_started = time.monotonic()
            trials.append(one_kill(stack, api, load))
            report(trials[-1])
            if n + 1 < args.kills:  # the next kill `every_s` after this one, as in the issue
                time.sleep(max(0.0, kill_started + args.every_s - time.monotonic()))
        load.stop()
        sampler.stop()
        split = sampler.count_between(started, time.monotonic())
        lost, unbalanced = lost_and_unbalanced(stack, load.ids(), before)
        days = gamedays(stack, args.gameday_faults.split(","), args.gameday_trials)
        return trials, lost, unbalanced, split, days
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def report(t: Trial) -> None:
    wake = f", {t.after_wake_s:.2f}s after the standby woke" if t.after_wake_s is not None else ""
    print(
        f"{t.scenario}: write outage {t.outage_s:.2f}s{wake}, "
        f"failover declines (not now) {t.declined}, "
        f"redundant after {t.redundant_s:.1f}s",
        flush=True,
    )


GAMEDAY_FAULTS = ("kill-primary", "hang-primary", "kill-standby", "starve-cpu")
SELF_HEALING = frozenset({"starve-cpu"})  # nothing may act on it: its healer is time


def gamedays(stack: Stack, faults: list[str], trials: int) -> dict[str, dict[str, Any]]:
    """The same faults without, then with, CPU hogs on every core (one stack, one commit):
    per fault its trials; over the day what its verification found."""
    found: dict[str, dict[str, Any]] = {}
    for stress in (False, True):
        report = gameday(stack.layout.data_dir, faults=faults, trials=trials, stress=stress,
                         progress=lambda line: print(line, flush=True))  # fmt: skip
        found["stress" if stress else "quiet"] = {
            "trials": report["trials"],
            "verification": report["verification"],
        }
    return found


def gameday_figures(days: dict[str, dict[str, Any]]) -> list[Figure]:
    rows: list[Figure] = []
    for how, day in days.items():
        v = day["verification"]
        bad = int(v.get("lost", 0)) + int(v.get("duplicates", 0)) + (0 if v.get("ok") else 1)
        rows.append(Figure(f"persist.gameday_{how}.unverified", bad, "",
                           f"game day ({how}): orders lost, twice, or not verified"))  # fmt: skip
        not_healed = 0
        for kind, trials in day["trials"].items():
            outages = [t["outage_s"] for t in trials if t.get("outage_s") is not None]
            rows.append(Figure(f"persist.gameday_{how}.{kind}.outage_max_s",
                               max(outages, default=float("nan")), "s",
                               f"game day ({how}): {kind} write outage, max"))  # fmt: skip
            if kind not in SELF_HEALING:
                not_healed += sum(t.get("healed_by") != "control plane" for t in trials)
        what = f"game day ({how}): trials not healed by the control plane"
        rows.append(Figure(f"persist.gameday_{how}.not_healed", not_healed, "", what))
    return rows


def headline(
    trials: list[Trial],
    lost: int,
    unbalanced: int,
    split: int,
    days: dict[str, dict[str, Any]] | None = None,
) -> list[Figure]:
    stopped = [t for t in trials if t.scenario == "standby-stopped"]
    kills = [t for t in trials if t.scenario == "five-kills"]
    rows: list[Figure] = []
    if stopped:
        wake = [t.after_wake_s for t in stopped if t.after_wake_s is not None]
        rows += [
            Figure("persist.standby_stopped.after_wake_max_s", max(wake, default=float("nan")),
                   "s", "standby stopped 6 s at the kill: writes back after it wakes, max"),
            Figure("persist.standby_stopped.outage_p50_s",
                   statistics.median(t.outage_s for t in stopped), "s",
                   "standby stopped 6 s at the kill: write outage, p50"),
            Figure("persist.standby_stopped.no_not_now_decline",
                   sum(t.declined == 0 for t in stopped), "",
                   "standby stopped 6 s at the kill: trials with no 'not now' decline before "
                   "the healing try"),
            Figure("persist.standby_stopped.trials", len(stopped), "", "standby-stopped trials"),
        ]  # fmt: skip
    if kills:
        outages = [t.outage_s for t in kills]
        rows += [
            Figure("persist.kills.not_healed", sum(t.outage_s >= HEALED_WITHIN_S for t in kills),
                   "", f"{len(kills)} kills: not healed within {HEALED_WITHIN_S:g} s"),
            Figure("persist.kills.outage_p50_s", statistics.median(outages), "s",
                   f"{len(kills)} kills: write outage, p50"),
            Figure("persist.kills.outage_max_s", max(outages), "s",
                   f"{len(kills)} kills: write outage, max"),
        ]  # fmt: skip
    rows += [
        Figure("persist.lost", lost, "", "acknowledged orders lost"),
        Figure("persist.unbalanced_products", unbalanced, "",
               "products whose stock sold differs from their quantity ordered"),
        Figure("persist.split_brain", split, "", "split-brain samples"),
    ]  # fmt: skip
    return rows + gameday_figures(days or {})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3, help="standby-stopped trials")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--every-s", type=float, default=35.0)
    parser.add_argument("--gameday-faults", default=",".join(GAMEDAY_FAULTS))
    parser.add_argument("--gameday-trials", type=int, default=2)
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    trials, lost, unbalanced, split, days = run(args)
    figures = headline(trials, lost, unbalanced, split, days)
    print()
    for f in figures:
        print(f"{f.what}: {f.value:.2f} {f.unit}")
    save(args.figures, figures)


if __name__ == "__main__":
    main()
