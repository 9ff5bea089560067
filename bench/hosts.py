"""Failover on the multi-host lab (lab/hosts/stack.py): the control plane on its own host
reaches the nodes only over SSH. Under load (4 clients ordering through both shops), per
trial, from outside:

- kill: every process of the primary's unit SIGKILLed on its host (`systemctl kill`): write
  outage (the kill -> the first acknowledged order sent after it) and time to redundancy
  (a synchronous standby again: the old primary rewound and rejoined over SSH);
- partition: the primary's host cut off from every other (nftables, both ways): write
  outage, then the link back, and the time until the old primary has rejoined.

Over all: acknowledged orders lost. Goals: bench/goals.toml (`hosts.*`).

    .venv/bin/python bench/hosts.py [--kills 5] [--partitions 3] [--figures FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import OrderClients
from lab.bench_goals import Figure, save
from lab.hosts.stack import NODES, HostsStack
from lab.process import wait_until
from tests.conftest import lab_tmpdir
from tests.test_hosts_stack import leader, present, redundant, settled

CLIENTS = 4


def kill_trial(stack: HostsStack) -> tuple[float, float, list[str]]:
    wait_until(lambda: settled(stack), timeout_s=180, what="a settled cluster")
    old = leader(stack)
    assert old is not None
    load = OrderClients(list(stack.describe()["shops"].values()), CLIENTS, max_s=120, tag="k")
    load.start()
    try:
        wait_until(lambda: len(load.acks) >= 20, timeout_s=30, what="orders flowing")
        stack.hosts.systemctl(NODES[old], "kill", "--signal=SIGKILL", f"postgresql-{old}.service")
        at = time.monotonic()
        wait_until(
            lambda: load.outage_after(at) != float("inf"), timeout_s=60, what="an order after"
        )
        wait_until(lambda: redundant(stack), timeout_s=120, what="redundancy")
        redundant_s = time.monotonic() - at
        outage = load.outage_after(at)
    finally:
        load.stop()
    return outage, redundant_s, load.ids()


def partition_trial(stack: HostsStack) -> tuple[float, float, list[str]]:
    wait_until(lambda: settled(stack), timeout_s=180, what="a settled cluster")
    old = leader(stack)
    assert old is not None
    load = OrderClients(list(stack.describe()["shops"].values()), CLIENTS, max_s=180, tag="p")
    load.start()
    try:
        wait_until(lambda: len(load.acks) >= 20, timeout_s=30, what="orders flowing")
        stack.hosts.net.partition(NODES[old])
        at = time.monotonic()
        try:
            wait_until(
                lambda: load.outage_after(at) != float("inf"), timeout_s=90, what="an order after"
            )
            outage = load.outage_after(at)
        finally:
            stack.hosts.net.heal(NODES[old])
        healed = time.monotonic()
        wait_until(lambda: redundant(stack), timeout_s=120, what="the old primary rejoined")
        rejoined_s = time.monotonic() - healed
    finally:
        load.stop()
    return outage, rejoined_s, load.ids()


def figure(fid: str, values: list[float], how: str, what: str) -> Figure:
    value = statistics.median(values) if how == "p50" else max(values)
    return Figure(fid, value, "s", f"{what}, {how}")


def headline(
    kills: list[tuple[float, float]], partitions: list[tuple[float, float]], lost: int
) -> list[Figure]:
    outages, redundants = [k[0] for k in kills], [k[1] for k in kills]
    figures = [
        figure("hosts.kill_outage_p50_s", outages, "p50", "kill -> first acknowledged order"),
        figure("hosts.kill_outage_max_s", outages, "max", "kill -> first acknowledged order"),
        figure("hosts.kill_redundant_p50_s", redundants, "p50", "kill -> redundant again"),
        Figure("hosts.lost", lost, "", "acknowledged orders lost"),
    ]
    if partitions:
        cut, back = [p[0] for p in partitions], [p[1] for p in partitions]
        what = "partition -> first acknowledged order"
        figures += [
            figure("hosts.partition_outage_p50_s", cut, "p50", what),
            figure("hosts.partition_outage_max_s", cut, "max", what),
            figure("hosts.partition_rejoined_p50_s", back, "p50", "link back -> rejoined"),
        ]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--figures", type=Path)
    args = parser.parse_args()
    stack = HostsStack(lab_tmpdir("shop-bench-hosts"))
    stack.up()
    kills: list[tuple[float, float]] = []
    partitions: list[tuple[float, float]] = []
    acked: list[str] = []
    try:
        for n in range(args.kills):
            outage, redundant_s, ids = kill_trial(stack)
            kills.append((outage, redundant_s))
            acked += ids
            print(f"kill {n + 1}: outage {outage:.2f} s, redundant after {redundant_s:.1f} s")
        for n in range(args.partitions):
            outage, rejoined_s, ids = partition_trial(stack)
            partitions.append((outage, rejoined_s))
            acked += ids
            print(f"partition {n + 1}: outage {outage:.2f} s, rejoined {rejoined_s:.1f} s")
        wait_until(lambda: settled(stack), timeout_s=180, what="a settled cluster")
        lost = len(set(acked) - present(stack, acked))
    finally:
        left = stack.down()
    if left:
        print(f"the lab left {left}", file=sys.stderr)
        return 1
    figures = headline(kills, partitions, lost)
    for figure in figures:
        print(f"{figure.id}: {figure.value:.2f} {figure.unit}  ({figure.what})")
    save(args.figures, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
