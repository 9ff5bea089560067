"""The shop on the multi-host lab: PostgreSQL on db-1 and db-2, a shop on app-1 and app-2,
Redis on mon, the control plane on cp reaching every node only over SSH (the `ssh` executor,
its targets file an ordinary one). Faults as the world makes them: a killed postmaster, a
partition that drops packets both ways (nftables), a control plane cut off from everything.
These tests move the primary: the order they run in is the order of a day."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests

from bench.clients import OrderClients
from lab.hosts.stack import NODES, HostsStack
from lab.process import wait_until
from pgcluster.nodes import NodeState, follows, leader_of, observe_all
from tests.conftest import lab_tmpdir


@pytest.fixture(scope="module")
def hs() -> Iterator[HostsStack]:
    stack = HostsStack(lab_tmpdir("shop-hosts-stack"))
    stack.up()
    try:
        yield stack
    finally:
        left = stack.down()
        assert left == [], f"the multi-host lab left {left}"


def api(stack: HostsStack, path: str) -> Any:
    r = requests.get(
        f"{stack.controlplane_url}/api/v1{path}",
        headers={"Authorization": f"Bearer {stack.api_token}"},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()


def views(stack: HostsStack) -> dict[str, Any]:
    return {v.name: v for v in observe_all({n: stack.dsn(n) for n in NODES}, 1.0)}


def leader(stack: HostsStack) -> str | None:
    found = leader_of(list(views(stack).values()))
    return found.name if found else None


def writable(stack: HostsStack) -> list[str]:
    return [n for n, v in views(stack).items() if v.state is NodeState.PRIMARY]


def settled(stack: HostsStack) -> bool:
    """Redundant, and the control plane has nothing open on the cluster: the next fault
    starts a new incident (one still open would carry its retries' back-off)."""
    if not redundant(stack):
        return False
    incidents = api(stack, "/incidents?limit=100")["incidents"]
    return not [
        i for i in incidents if i["target"] == "shop-db-cluster" and i["resolved_at"] is None
    ]


def redundant(stack: HostsStack) -> bool:
    seen = list(views(stack).values())
    lead = leader_of(seen)
    return (
        lead is not None
        and bool(lead.sync_standbys)
        and all(v is lead or follows(v, lead) for v in seen)
    )


def in_doubt(stack: HostsStack) -> int:
    """Prepared transactions on the leader (an acknowledged order whose commit a fault cut is
    one until its shop, or the in-doubt resolver, finishes it)."""
    lead = leader(stack)
    if lead is None:
        return -1
    with psycopg.connect(stack.dsn(lead), connect_timeout=3) as conn:
        row = conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()
    return int(row[0]) if row else 0


def present(stack: HostsStack, ids: list[str]) -> set[str]:
    """Which of `ids` the leader's orders table holds, once nothing is in doubt."""
    wait_until(lambda: in_doubt(stack) == 0, timeout_s=90, what="nothing in doubt")
    lead = leader(stack)
    assert lead is not None
    with psycopg.connect(stack.dsn(lead, "orders"), connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT id::text FROM orders WHERE id::text = ANY(%s)", (ids,)
        ).fetchall()
    return {str(r[0]) for r in rows}


def failovers(stack: HostsStack) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = api(stack, "/actions?action=failover&limit=100")["actions"]
    return runs


def main_pid(stack: HostsStack, node: str) -> int:
    out = stack.hosts.systemctl(
        NODES[node], "show", "-p", "MainPID", "--value", f"postgresql-{node}.service"
    )
    return int(out.strip())


def test_the_stack_runs_on_its_hosts_and_the_control_plane_sees_every_service(
    hs: HostsStack,
) -> None:
    assert leader(hs) == "pg0"
    wait_until(lambda: redundant(hs), timeout_s=30, what="a synchronous standby")

    def all_up() -> bool:
        services = api(hs, "/health")["services"]
        return all(services[s]["status"] == "up" for s in ("shop-0", "shop-1", "redis"))

    wait_until(all_up, timeout_s=30, what="every service up for the control plane")
    # Its executor reaches the nodes by SSH only: the targets file names hosts, not pids.
    targets = hs.targets_file.read_text()
    assert 'kind = "ssh"' in targets and "stack.json" not in targets


def test_a_killed_primary_is_replaced_over_ssh_and_no_acknowledged_order_is_lost(
    hs: HostsStack,
) -> None:
    wait_until(lambda: settled(hs), timeout_s=120, what="a settled cluster")
    old = leader(hs)
    assert old is not None
    load = OrderClients(list(hs.describe()["shops"].values()), 4, max_s=120, tag="kill").start()
    try:
        wait_until(lambda: len(load.acks) >= 20, timeout_s=30, what="orders flowing")
        pid = main_pid(hs, old)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: leader(hs) not in (None, old), timeout_s=60, what="a new leader")
        wait_until(
            lambda: load.outage_after(killed_at) != float("inf"),
            timeout_s=60,
            what="an order acknowledged after the kill",
        )
        outage = load.outage_after(killed_at)
        wait_until(lambda: redundant(hs), timeout_s=120, what="the old primary rejoined")
        redundant_after = time.monotonic() - killed_at
    finally:
        load.stop()
    acked = load.ids()
    assert set(acked) <= present(hs, acked), "an acknowledged order was lost"
    wait_until(
        lambda: any(r["state"] == "succeeded" for r in failovers(hs)),
        timeout_s=30,
        what="the control plane's failover run finished",
    )
    print(f"kill: write outage {outage:.2f} s, redundant after {redundant_after:.1f} s")


def test_a_primary_cut_off_from_the_control_plane_only_is_not_failed_over(
    hs: HostsStack,
) -> None:
    wait_until(lambda: settled(hs), timeout_s=120, what="a settled cluster")
    lead = leader(hs)
    assert lead is not None
    before = len(failovers(hs))
    load = OrderClients(list(hs.describe()["shops"].values()), 2, max_s=60, tag="cp-cut").start()
    hs.hosts.net.partition(NODES[lead], ["cp"])
    try:
        time.sleep(15)  # the primary probe's grace (5 s) and the witness's window, thrice
        assert len(load.acks) > 0
        cut_at = time.monotonic()
        acks_before = len(load.acks)
        time.sleep(2)
        assert len(load.acks) > acks_before, "the shops stopped ordering: the primary was moved"
        del cut_at
    finally:
        hs.hosts.net.heal(NODES[lead])
        load.stop()
    assert leader(hs) == lead, "a failover moved a primary that lived"
    new_runs = failovers(hs)[: len(failovers(hs)) - before]
    assert not [r for r in new_runs if r["state"] == "succeeded"], new_runs
    acked = load.ids()
    assert set(acked) <= present(hs, acked)


def test_a_primary_partitioned_from_everything_is_replaced_and_never_writable_beside_the_new_one(
    hs: HostsStack,
) -> None:
    wait_until(lambda: settled(hs), timeout_s=120, what="a settled cluster")
    old = leader(hs)
    assert old is not None
    load = OrderClients(list(hs.describe()["shops"].values()), 4, max_s=180, tag="part").start()
    split_brain = 0
    try:
        wait_until(lambda: len(load.acks) >= 20, timeout_s=30, what="orders flowing")
        hs.hosts.net.partition(NODES[old])
        cut_at = time.monotonic()  # once in place: orders sent before it may pass
        wait_until(lambda: leader(hs) not in (None, old), timeout_s=90, what="a new leader")
        wait_until(
            lambda: load.outage_after(cut_at) != float("inf"),
            timeout_s=60,
            what="an order acknowledged after the partition",
        )
        outage = load.outage_after(cut_at)
        hs.hosts.net.heal(NODES[old])
        healed_at = time.monotonic()
        # The old primary, back: fenced and rejoined; a write it took meanwhile is never
        # acknowledged (its commits wait for a synchronous standby it no longer has).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not redundant(hs):
            if len(writable(hs)) > 1:
                split_brain += 1
            time.sleep(0.2)
        assert redundant(hs), "the old primary did not rejoin"
        rejoined = time.monotonic() - healed_at
    finally:
        hs.hosts.net.heal(NODES[old])
        load.stop()
    acked = load.ids()
    assert set(acked) <= present(hs, acked), "an acknowledged order was lost"
    print(
        f"partition: write outage {outage:.2f} s, rejoined {rejoined:.1f} s after the heal, "
        f"{split_brain} looks with two writable nodes"
    )
    # Its audit says it promoted past the node it could not reach, and why that was safe.
    audits = [
        json.dumps(api(hs, f"/actions/{r['id']}"))
        for r in failovers(hs)
        if r["state"] == "succeeded"
    ]
    assert any(f"{old} not fenced, its host unreached" in a for a in audits), audits[:1]


def test_a_control_plane_cut_off_from_everything_does_nothing_and_undoes_nothing(
    hs: HostsStack,
) -> None:
    wait_until(lambda: settled(hs), timeout_s=120, what="a settled cluster")
    lead = leader(hs)
    before = len(failovers(hs))
    load = OrderClients(list(hs.describe()["shops"].values()), 2, max_s=60, tag="cp").start()
    hs.hosts.net.partition("cp")
    try:
        time.sleep(12)
    finally:
        hs.hosts.net.heal("cp")
    try:
        time.sleep(8)  # back: it sees the cluster as it is
        assert leader(hs) == lead
        assert redundant(hs)
    finally:
        load.stop()
    runs = failovers(hs)
    assert not [r for r in runs[: len(runs) - before] if r["state"] == "succeeded"]
    acked = load.ids()
    assert acked and set(acked) <= present(hs, acked)


def test_an_app_host_cut_off_is_reported_never_restarted_blind_and_serves_again_when_back(
    hs: HostsStack,
) -> None:
    """The rule for an app host the control plane cannot reach: its shop's incident opens
    (its readiness probe), the restart policy's attempts fail saying the host is unreached
    (nothing is started or stopped unseen), and when the link returns the instance, which
    never stopped, passes its probe and the incident resolves. The other shop serves."""
    wait_until(lambda: settled(hs), timeout_s=120, what="a settled cluster")
    shops = hs.describe()["shops"]
    pid = int(hs.hosts.systemctl("app-2", "show", "-p", "MainPID", "--value", "shop-1.service"))
    load = OrderClients([shops["shop-0"]], 2, max_s=90, tag="app").start()
    hs.hosts.net.partition("app-2")
    try:

        def refused_unreached() -> bool:
            runs = api(hs, "/actions?action=restart&limit=50")["actions"]
            return any(
                r["target"] == "shop-1" and r["state"] in ("failed", "skipped") for r in runs
            )

        wait_until(refused_unreached, timeout_s=60, what="a restart of shop-1 that failed")
        acks = len(load.acks)
        time.sleep(2)
        assert len(load.acks) > acks, "the other shop stopped serving"
    finally:
        hs.hosts.net.heal("app-2")
    try:

        def shop1_up() -> bool:
            return bool(api(hs, "/health")["services"]["shop-1"]["status"] == "up")

        wait_until(shop1_up, timeout_s=60, what="shop-1 up again for the control plane")
    finally:
        load.stop()
    runs = [
        r for r in api(hs, "/actions?action=restart&limit=50")["actions"] if r["target"] == "shop-1"
    ]
    audits = json.dumps([api(hs, f"/actions/{r['id']}") for r in runs])
    assert "unreach" in audits or "no answer" in audits, audits[:2000]
    now = int(hs.hosts.systemctl("app-2", "show", "-p", "MainPID", "--value", "shop-1.service"))
    assert now == pid, "shop-1 was restarted: it never stopped, only its host was cut off"


def test_a_killed_shop_is_started_again_by_the_control_plane_over_ssh(hs: HostsStack) -> None:
    wait_until(lambda: settled(hs), timeout_s=120, what="a settled cluster")
    unit = "shop-0.service"
    before = int(hs.hosts.systemctl("app-1", "show", "-p", "MainPID", "--value", unit))
    hs.hosts.systemctl("app-1", "kill", "--signal=SIGKILL", unit)  # its master and workers

    def started_again() -> bool:
        pid = int(hs.hosts.systemctl("app-1", "show", "-p", "MainPID", "--value", unit))
        return pid not in (0, before)

    wait_until(started_again, timeout_s=60, what="shop-0 started again")
    wait_until(
        lambda: requests.get(f"{hs.shop_base_url('shop-0')}/readyz", timeout=2).ok,
        timeout_s=60,
        what="shop-0 ready",
    )

    def restarted_by_the_control_plane() -> bool:
        runs = api(hs, "/actions?action=restart&limit=50")["actions"]
        return any(r["target"] == "shop-0" and r["state"] == "succeeded" for r in runs)

    # Its run (through the ssh executor) ends once its probe passes twice.
    wait_until(restarted_by_the_control_plane, timeout_s=30, what="a succeeded restart run")
