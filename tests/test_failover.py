"""High availability on a stack of its own (these tests move the primary): failover on a
killed or hung primary, the grace for a short stall, fencing, rejoin with pg_rewind, the
degrade to asynchronous commits when the standby dies, and an operator's switchover."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests

from lab.chaos import inject
from lab.chaos.base import continue_processes, stop_component
from lab.load import LoadResult, run_order_load
from lab.observe import StackView
from lab.process import wait_until
from lab.stack import Stack
from remediation.executors.processes import in_directory, is_pid_alive, process_table
from tests.conftest import stack_of_its_own
from tests.test_controlplane import Api


@pytest.fixture(scope="module")
def ha() -> Iterator[Stack]:
    # Loads here order thousands of units over the module: stock that never runs out, so a 409
    # can only mean a bug, never a test that ran longer on a faster machine.
    with stack_of_its_own("shop-ha", products=50, stock=100_000) as lab:
        yield lab


@pytest.fixture(scope="module")
def ha_api(ha: Stack) -> Api:
    return Api(ha)


def described(stack: Stack) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stack.layout.stack_file.read_text())
    return data


def view(stack: Stack) -> StackView:
    """The lab's own look at a stack, from outside the control plane (lab/observe.py)."""
    return StackView.of(stack.layout.data_dir)


def node_state(stack: Stack, index: int) -> tuple[str, int | None]:
    """('primary', timeline) | ('standby', received timeline) | ('down', None)."""
    return view(stack).node_state(f"pg{index}")


def leader(stack: Stack) -> str | None:
    return view(stack).leader()


def is_redundant(stack: Stack) -> bool:
    """One primary, the other node streams its timeline synchronously, and the control plane
    knows commits are synchronous again."""
    return view(stack).is_redundant()


def wait_redundant(stack: Stack, timeout_s: float = 90) -> str:
    wait_until(lambda: is_redundant(stack), timeout_s=timeout_s, what="a redundant cluster")
    name = leader(stack)
    assert name is not None
    return name


def processes_of(stack: Stack, node: str) -> list[int]:
    """Every process of a PostgreSQL node: the postmaster and each backend (each backend calls
    setsid(), so the postmaster's process group is not the server; all chdir to its data)."""
    data_dir = described(stack)["components"][node]["data_dir"]
    return sorted(p.pid for p in in_directory(data_dir)(process_table()))


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def hung(stack: Stack, node: str, *, postmaster_only: bool = False) -> Iterator[list[int]]:
    """The node hangs as a server does (I/O stall, SIGSTOP): every process of it stopped,
    or the postmaster alone (existing sessions keep working, new ones wait). Woken on exit."""
    if postmaster_only:  # not a fault the chaos API makes: half a hang, for the grace test
        pids = [postmaster_pid(stack, node)]
        signal_all(pids, signal.SIGSTOP)
        try:
            yield pids
        finally:
            signal_all(pids, signal.SIGCONT)
        return
    _, procs = stop_component(view(stack), node)  # the chaos API's hang, held by the test
    try:
        yield sorted(p.pid for p in procs)
    finally:
        continue_processes(procs)


def open_session(stack: Stack, node: str) -> psycopg.Connection[Any]:
    """A client session on the node, so that it has a backend of its own to hang."""
    return stack.connect(node)


def postmaster_pid(stack: Stack, node: str) -> int:
    pid: int = described(stack)["components"][node]["pid"]
    return pid


def order(stack: Stack, product_id: int = 1) -> requests.Response:
    response = requests.post(
        f"{described(stack)['shop']['instances'][0]}/orders",
        json={"product_id": product_id, "quantity": 1, "customer": "ha", "address": "1 Road"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
        timeout=15,
    )
    # Out of stock is the test's own setup failing, never "not yet": say so at once.
    assert response.status_code != 409, response.text
    return response


def orders_present(stack: Stack, ids: list[str]) -> dict[str, int]:
    return view(stack).orders_present(ids)


def prepared_count(stack: Stack) -> int:
    return view(stack).prepared_count()


def runs_of(api: Api, action: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = api.get(f"/actions?action={action}&limit=500")["actions"]
    assert all(r["action"] == action for r in runs)
    return runs


def test_killing_the_primary_under_load_fails_over_rejoins_it_and_loses_no_acknowledged_order(
    ha: Stack, ha_api: Api
) -> None:
    old = wait_redundant(ha)
    result: dict[str, LoadResult] = {}

    def load() -> None:
        result["load"] = run_order_load(
            described(ha)["shop"]["instances"],
            clients=4,
            duration_s=10,
            product_ids=list(range(1, 51)),
            think_s=0.01,
        )

    loader = threading.Thread(target=load)
    loader.start()
    wait_until(lambda: order(ha).status_code == 201, timeout_s=10, what="orders flowing")
    inject("kill-primary", ha.layout.data_dir)  # every process of it, as a dying machine
    loader.join(timeout=60)

    new = wait_redundant(ha)
    assert new != old
    acknowledged = result["load"].acknowledged
    assert len(acknowledged) > 10, result["load"].statuses
    # Orders whose commit decision was durable when the primary died are acknowledged; their
    # prepared halves survive the promotion and the in-doubt resolver finishes them.
    wait_until(lambda: prepared_count(ha) == 0, timeout_s=90, what="no transaction in doubt")
    present = orders_present(ha, acknowledged)
    assert set(present) == set(acknowledged)  # every acknowledged order survived the failover
    assert set(present.values()) == {1}  # and exactly once
    failover = runs_of(ha_api, "failover")
    assert [r["state"] for r in failover] == ["succeeded"]
    # Rejoined by the control plane: the failover hands over at once (its output says so),
    # or, if that part failed, the rejoin policy's run did it.
    outputs = [
        e["message"]
        for r in failover
        for e in ha_api.get(f"/actions/{r['id']}")["audit"]
        if e["verb"] == "output"
    ]
    rejoin = [r for r in runs_of(ha_api, "rejoin") if r["state"] == "succeeded"]
    assert rejoin or any(f"{old} rejoined" in m for m in outputs), outputs


def test_a_primary_stalled_for_less_than_the_grace_is_not_failed_over(
    ha: Stack, ha_api: Api
) -> None:
    before = wait_redundant(ha)
    failovers = len(runs_of(ha_api, "failover"))
    with open_session(ha, before), hung(ha, before) as pids:
        assert len(pids) > 2, "the postmaster and its backends, not the postmaster alone"
        ha_api.wait_cycles(4)  # ~2 s of the 5 s grace, with the primary probe timing out
    ha_api.wait_cycles(6)
    assert leader(ha) == before
    assert len(runs_of(ha_api, "failover")) == failovers
    assert order(ha).status_code == 201


def load_in_background(stack: Stack, duration_s: float) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def load() -> None:
        result["load"] = run_order_load(
            described(stack)["shop"]["instances"],
            clients=4,
            duration_s=duration_s,
            product_ids=list(range(1, 51)),
            think_s=0.01,
        )

    loader = threading.Thread(target=load)
    loader.start()
    wait_until(lambda: order(stack).status_code == 201, timeout_s=10, what="orders flowing")
    return loader, result


def assert_every_acknowledged_order_kept(stack: Stack, acknowledged: list[str]) -> None:
    wait_until(lambda: prepared_count(stack) == 0, timeout_s=90, what="no transaction in doubt")
    present = orders_present(stack, acknowledged)
    assert set(present) == set(acknowledged)
    assert set(present.values()) == {1}


def test_a_primary_hung_whole_is_fenced_whole_and_orders_flow_again_while_it_still_hangs(
    ha: Stack, ha_api: Api
) -> None:
    before = wait_redundant(ha)
    restores = len(runs_of(ha_api, "restore"))
    loader, result = load_in_background(ha, duration_s=25)
    with open_session(ha, before), hung(ha, before) as pids:
        assert len(pids) > 2
        # The shop's pooled connections lead to the hung node: only its own deadlines free
        # them. Orders must be acknowledged again while the old primary is still stopped.
        wait_until(
            lambda: node_state(ha, 1 - int(before[-1]))[0] == "primary",
            timeout_s=60,
            what="the standby promoted",
        )
        wait_until(
            lambda: order(ha).status_code == 201, timeout_s=30, what="an order on the new primary"
        )
        # The fence took every process of the old primary, backends included (the rejoin
        # may already have started new ones: those are not the hung ones).
        assert [pid for pid in pids if is_pid_alive(pid)] == []
    loader.join(timeout=90)
    after = wait_redundant(ha)
    assert after != before
    assert_every_acknowledged_order_kept(ha, result["load"].acknowledged)
    # A 2PC caught between its two commits by the failover is not damage: no restore offered.
    assert len(runs_of(ha_api, "restore")) == restores


def test_a_primary_whose_postmaster_alone_hangs_is_replaced_and_its_backends_are_fenced_too(
    ha: Stack, ha_api: Api
) -> None:
    before = wait_redundant(ha)
    backends_before = [p for p in processes_of(ha, before) if p != postmaster_pid(ha, before)]
    assert backends_before, "a live node has backends and auxiliary processes"
    with hung(ha, before, postmaster_only=True):
        # Existing sessions keep working on the backends, but no new one is accepted: after
        # the grace the node is replaced, and the fence must not leave its backends serving.
        wait_until(
            lambda: node_state(ha, 1 - int(before[-1]))[0] == "primary",
            timeout_s=60,
            what="the standby promoted",
        )
        assert [pid for pid in backends_before if is_pid_alive(pid)] == []
    after = wait_redundant(ha)
    assert after != before
    assert order(ha).status_code == 201


def test_a_hung_standby_is_fenced_and_rejoined_while_orders_keep_flowing(
    ha: Stack, ha_api: Api
) -> None:
    primary = wait_redundant(ha)
    standby = "pg1" if primary == "pg0" else "pg0"
    loader, result = load_in_background(ha, duration_s=20)
    with hung(ha, standby) as pids:
        assert len(pids) > 2
        # Synchronous commits would wait for the hung standby for as long as it hangs: the
        # control plane goes asynchronous, and the orders flow while it is still stopped.
        ha_api.wait_cycles(2)
        wait_until(lambda: order(ha).status_code == 201, timeout_s=30, what="an order accepted")
        wait_until(
            lambda: all(not is_pid_alive(pid) for pid in pids),
            timeout_s=60,
            what="the hung standby fenced",
        )
    loader.join(timeout=90)
    assert wait_redundant(ha) == primary
    assert_every_acknowledged_order_kept(ha, result["load"].acknowledged)


def test_killing_the_standby_keeps_orders_flowing_and_synchronous_commits_return_with_it(
    ha: Stack, ha_api: Api
) -> None:
    primary = wait_redundant(ha)
    inject("kill-standby", ha.layout.data_dir)  # every process of it, as a dying machine
    # With the only synchronous standby gone every commit would wait forever: the control
    # plane switches to asynchronous commits, so orders go through while it is away.
    wait_until(lambda: order(ha).status_code == 201, timeout_s=30, what="an order accepted")
    assert wait_redundant(ha) == primary

    def rejoin_outputs() -> list[str]:
        return [
            e["message"]
            for r in runs_of(ha_api, "rejoin")
            for e in ha_api.get(f"/actions/{r['id']}")["audit"]
            if e["verb"] == "output"
        ]

    # The run records its output a moment after the cluster is redundant again.
    wait_until(
        lambda: any(
            "degraded to asynchronous" in m and "synchronous again" in m for m in rejoin_outputs()
        ),
        timeout_s=30,
        what="the rejoin's report of the degrade and the return to synchronous commits",
    )


def test_an_operator_switchover_moves_the_primary_and_keeps_every_order(
    ha: Stack, ha_api: Api
) -> None:
    before = wait_redundant(ha)
    assert order(ha).status_code == 201
    response = ha_api.post(
        "/actions",
        {"action": "switchover", "target": "shop-db-cluster", "reason": "operator: patching"},
    )
    assert response.status_code == 202
    run_id = response.json()["id"]
    wait_until(
        lambda: ha_api.get(f"/actions/{run_id}")["state"] in ("succeeded", "failed"),
        timeout_s=90,
        what="the switchover done",
    )
    assert ha_api.get(f"/actions/{run_id}")["state"] == "succeeded"
    after = wait_redundant(ha)
    assert after != before
    assert order(ha).status_code == 201
