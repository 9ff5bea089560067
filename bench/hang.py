"""Hangs, not deaths: every process of the primary (or of the standby) SIGSTOPped for 5, 15
and 60 s under load (4 clients ordering through both shops), then SIGCONT. Per trial: write
outage (hang -> first acknowledged order sent after it), the longest window without any
acknowledged order, time to full redundancy; over all: orders lost, products whose stock does
not add up, restore runs proposed, false failovers and split-brain samples (two writable nodes
at once). Goals: bench/goals.toml.

    .venv/bin/python bench/hang.py [--hangs 5 15 60] [--nodes primary standby]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import OrderClients
from bench.failover import ha_bench_stack, ledger_before, lost_and_unbalanced
from lab.bench_goals import Figure, save
from lab.chaos import FaultRecord
from lab.chaos.hang_primary import HangPrimary
from lab.chaos.hang_standby import HangStandby
from lab.gameday import SplitBrainSampler
from lab.observe import StackView
from lab.process import wait_until
from lab.stack import Stack
from tests.test_controlplane import Api
from tests.test_failover import described, is_redundant

CLIENTS = 4
GRACE_S = 5.0  # the lab's grace for a primary that does not answer (lab/targets.py)


@dataclass(slots=True)
class Trial:
    node: str
    hang_s: float
    outage_s: float
    longest_gap_s: float
    redundant_s: float
    acked: list[str]
    restore_runs: int
    failover_runs: int
    split_brain: int


def _stopped(comp: dict[str, object]) -> bool:
    """The node's postmaster is stopped (state T in /proc): the hang has begun."""
    try:
        stat = Path(f"/proc/{comp['pid']}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "T"


def trial(stack: Stack, api: Api, role: str, hang_s: float) -> Trial:
    wait_until(lambda: is_redundant(stack), timeout_s=180, what="a redundant cluster")
    view = StackView.of(stack.layout.data_dir)
    # The node the fault will hang, as the nodes themselves say (stack.json's roles may lag).
    node = view.leader() if role == "primary" else view.standby()
    assert node is not None, f"no {role} to hang"
    comps = view.components()
    shops = described(stack)["shop"]["instances"]
    restores_before = len(api.get("/actions?action=restore&limit=500")["actions"])
    failovers_before = len(api.get("/actions?action=failover&limit=500")["actions"])
    load = OrderClients(shops, CLIENTS, max_s=hang_s + 90, tag="hang").start()
    wait_until(lambda: len(load.acks) >= 20, timeout_s=30, what="orders flowing")
    sampler = SplitBrainSampler(view).start()
    # The chaos API's hang: every process of the node SIGSTOPped (the postmaster and each
    # setsid'd backend), woken after `hang_s`, run beside the load and the watcher.
    hang = HangPrimary() if role == "primary" else HangStandby()
    record: list[FaultRecord] = []
    hanger = threading.Thread(target=lambda: record.append(hang.run(view, duration_s=hang_s)))
    hanger.start()
    # From the moment every process is stopped: an order sent before may still have had its
    # decision committed, and is rightly acknowledged once its deadline frees it.
    wait_until(lambda: bool(record) or _stopped(comps[node]), timeout_s=10, what="the hang")
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
    hanger.join()
    hung_at = record[0].started.mono
    assert record[0].target == node, (record[0].target, node)
    watcher.join(timeout=130)
    time.sleep(2)  # a little load after the recovery: the shops serve the new shape
    load.stop()
    sampler.stop()
    restores = len(api.get("/actions?action=restore&limit=500")["actions"]) - restores_before
    failovers = len(api.get("/actions?action=failover&limit=500")["actions"]) - failovers_before
    return Trial(
        node=f"{role} {node}",
        hang_s=hang_s,
        outage_s=load.outage_after(hung_at),
        longest_gap_s=load.longest_gap_after(hung_at),
        redundant_s=(redundant_at[0] - hung_at) if redundant_at else float("inf"),
        acked=load.ids(),
        restore_runs=restores,
        failover_runs=failovers,
        split_brain=sampler.count_between(hung_at, time.monotonic()),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hangs", type=float, nargs="+", default=[5, 15, 60])
    parser.add_argument("--nodes", nargs="+", default=["primary", "standby"])
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    stack = ha_bench_stack("shop-bench-hang-")
    data_dir = stack.layout.data_dir
    trials: list[Trial] = []
    try:
        stack.start()
        before = ledger_before(stack)
        api = Api(stack)
        for role in args.nodes:
            for hang_s in args.hangs:
                t = trial(stack, api, role, hang_s)
                trials.append(t)
                print(
                    f"{t.node} hung {t.hang_s:g}s: write outage {t.outage_s:.2f}s, longest gap "
                    f"{t.longest_gap_s:.2f}s, redundant after {t.redundant_s:.1f}s, "
                    f"{len(t.acked)} acknowledged, restore runs {t.restore_runs}, "
                    f"failover runs {t.failover_runs}, split-brain samples {t.split_brain}",
                    flush=True,
                )
        acknowledged = [i for t in trials for i in t.acked]
        lost, unbalanced = lost_and_unbalanced(stack, acknowledged, before)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print()
    print(
        "| node | hang | write outage | longest gap | redundant after | restores | failovers "
        "| split |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for t in trials:
        print(
            f"| {t.node} | {t.hang_s:g} s | {t.outage_s:.2f} s | {t.longest_gap_s:.2f} s | "
            f"{t.redundant_s:.1f} s | {t.restore_runs} | {t.failover_runs} | {t.split_brain} |"
        )
    print(
        f"\n{len(acknowledged)} acknowledged orders in all: {lost} lost; {unbalanced} products "
        "whose stock does not add up"
    )
    save(args.figures, headline(trials, lost, unbalanced))


def headline(trials: list[Trial], lost: int, unbalanced: int) -> list[Figure]:
    """Per node the worst write outage over its hangs; the worst redundancy over all; each
    trial's own two figures for context; the counts that must be 0."""
    rows = []
    for role in ("primary", "standby"):
        mine = [t for t in trials if t.node.startswith(role)]
        if mine:
            rows.append(Figure(f"hang.{role}_outage_max_s", max(t.outage_s for t in mine), "s",
                               f"{role} hung ({', '.join(f'{t.hang_s:g}' for t in mine)} s): "
                               "write outage, max"))  # fmt: skip
    if trials:
        rows.append(Figure("hang.redundant_max_s", max(t.redundant_s for t in trials), "s",
                           "hang -> redundant again, max"))  # fmt: skip
    for t in trials:
        role, name = t.node.split()[0], f"{t.node.split()[0]} hung {t.hang_s:g} s"
        trial_id = f"hang.{role}_{t.hang_s:g}s"
        rows += [
            Figure(f"{trial_id}.outage_s", t.outage_s, "s", f"{name}: write outage"),
            Figure(f"{trial_id}.redundant_s", t.redundant_s, "s", f"{name}: redundant after"),
        ]
    # A primary hung within its grace (5 s in the lab) is waited for, and a hung standby is
    # never failed over: any failover there is a false one. A longer primary hang gets one.
    false = sum(
        t.failover_runs for t in trials if t.node.startswith("standby") or t.hang_s <= GRACE_S
    )
    extra = sum(
        max(0, t.failover_runs - 1)
        for t in trials
        if t.node.startswith("primary") and t.hang_s > GRACE_S
    )
    rows += [
        Figure("hang.lost", lost, "", "acknowledged orders lost"),
        Figure("hang.unbalanced_products", unbalanced, "",
               "products whose stock sold differs from their quantity ordered"),
        Figure("hang.restore_runs", sum(t.restore_runs for t in trials), "",
               "restore runs proposed"),
        Figure("hang.split_brain", sum(t.split_brain for t in trials), "", "split-brain samples"),
        Figure("hang.false_failovers", false, "",
               "false failovers (standby, or within the grace)"),
        Figure("hang.extra_failovers", extra, "", "failovers beyond one per primary hang"),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
