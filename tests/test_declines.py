"""Every action's precheck says which kind of no it is, against real servers (the shared
stack, read only: a precheck changes nothing): nothing to do (the incident is recovered),
not now (tried again with backoff) or never (escalated at once). The lab's own policy params,
from the stack's targets file, pointed at dead ports or doubled nodes where a case needs it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from controlplane.config import Settings
from lab.layout import find_free_base_port
from lab.stack import Stack
from remediation import pg_ops
from remediation.base import ActionContext, ActionError, Check, Decline
from remediation.executors.base import Executor
from remediation.executors.lab import LabExecutor
from remediation.executors.none import NoExecutor
from remediation.registry import build_action
from tests.test_failover import leader

UNHEALTHY = Check(False, "probe says down")
HEALTHY = Check(True, "probe says up")


def policy_params(stack: Stack, name: str) -> dict[str, Any]:
    policy = Settings.load(environ={}, targets_file=stack.targets_file).policy(name)
    assert policy is not None, name
    return dict(policy.params)


def dead_dsn() -> str:
    return f"host=127.0.0.1 port={find_free_base_port()} dbname=postgres connect_timeout=1"


def precheck(
    action: str,
    params: Mapping[str, Any],
    *,
    executor: Executor | None = None,
    component: str | None = None,
    is_healthy: Callable[[], Check] = lambda: UNHEALTHY,
    labels: Mapping[str, str] | None = None,
) -> Check:
    ctx = ActionContext(
        target="t",
        component=component,
        params=params,
        executor=executor or NoExecutor(),
        is_healthy=is_healthy,
        labels=dict(labels or {}),
    )
    return build_action(action).precheck(ctx)


def nodes_of(stack: Stack) -> tuple[dict[str, str], str, str]:
    nodes: dict[str, str] = policy_params(stack, "failover-primary")["nodes"]
    lead = leader(stack)
    assert lead is not None
    return nodes, lead, next(n for n in nodes if n != lead)


# Healthy nodes must answer within these on any machine (a slow answer would read as a node
# gone, and the decline as NOT_NOW); the dead ones refuse at once, so generous costs nothing.
QUICK = {"observe_timeout_s": 2.0, "precheck_budget_s": 6.0}


def test_failover_declines_each_kind(stack: Stack) -> None:
    nodes, lead, standby = nodes_of(stack)
    base = {**policy_params(stack, "failover-primary"), **QUICK}
    assert precheck("failover", base).decline is Decline.NOTHING_TO_DO
    dead = {"a": dead_dsn(), "b": dead_dsn()}
    assert precheck("failover", {**base, "nodes": dead}).decline is Decline.NOT_NOW
    # Two nodes writable on one timeline (the leader named twice): a human must choose.
    twice = {"a": nodes[lead], "b": nodes[lead]}
    assert precheck("failover", {**base, "nodes": twice}).decline is Decline.NEVER
    # No leader, a standby that could be promoted, and no fact that commits were synchronous
    # (NoFacts: none known): promoting could lose acknowledged orders.
    unknown = {"gone": dead_dsn(), standby: nodes[standby]}
    found = precheck("failover", {**base, "nodes": unknown})
    assert found.decline is Decline.NEVER and "synchronous" in found.reason


def test_rejoin_declines_each_kind(stack: Stack) -> None:
    base = {**policy_params(stack, "rejoin-standby"), **QUICK}
    assert precheck("rejoin", base).decline is Decline.NOTHING_TO_DO
    dead = {"a": dead_dsn(), "b": dead_dsn()}
    assert precheck("rejoin", {**base, "nodes": dead}).decline is Decline.NOT_NOW


def test_rejoin_with_the_leader_gone_says_not_now_after_one_look_and_frees_the_cluster(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A leader that refuses (killed) is a failover's job: the rejoin must not hold the
    # cluster for its look budget while the failover waits behind it (it held it 3 s).
    nodes, _, standby = nodes_of(stack)
    base = {**policy_params(stack, "rejoin-standby"), "precheck_budget_s": 3.0}
    looks: list[int] = []
    real_views = pg_ops.views

    def counted(*args: Any, **kwargs: Any) -> Any:
        looks.append(1)
        return real_views(*args, **kwargs)

    monkeypatch.setattr(pg_ops, "views", counted)
    gone = {"gone": dead_dsn(), standby: nodes[standby]}
    found = precheck("rejoin", {**base, "nodes": gone})
    assert found.decline is Decline.NOT_NOW and "a failover's job" in found.reason
    assert len(looks) == 1, looks


def test_switchover_declines_each_kind(stack: Stack) -> None:
    _, lead, _ = nodes_of(stack)
    base = policy_params(stack, "switchover")
    assert precheck("switchover", {**base, "candidate": lead}).decline is Decline.NOTHING_TO_DO
    dead = {"a": dead_dsn(), "b": dead_dsn()}
    assert precheck("switchover", {**base, "nodes": dead}).decline is Decline.NOT_NOW
    assert precheck("switchover", {**base, "candidate": "pg9"}).decline is Decline.NEVER


def test_restart_declines_each_kind(stack: Stack) -> None:
    executor = LabExecutor(stack.layout.stack_file)
    params = policy_params(stack, "restart-dead-shop")
    shop = stack.describe()["shop"]["instances"][0].removeprefix("http://")
    labels = {"instance": shop}
    healthy = precheck(
        "restart", params, executor=executor, component="shop-0", is_healthy=lambda: HEALTHY
    )
    assert healthy.decline is Decline.NOTHING_TO_DO
    # Its probes fail, but its process runs and answers /healthz: not ready because of a
    # dependency, not dead; a restart would not help yet.
    alive = precheck("restart", params, executor=executor, component="shop-0", labels=labels)
    assert alive.decline is Decline.NOT_NOW
    assert precheck("restart", params, executor=executor).decline is Decline.NEVER


def test_cache_flush_says_not_now_while_redis_is_unreachable(stack: Stack) -> None:
    params = policy_params(stack, "flush-untrue-cache")
    dead = {**params, "redis_url": f"redis://127.0.0.1:{find_free_base_port()}/0", "timeout_s": 1}
    assert precheck("cache_flush", dead).decline is Decline.NOT_NOW
    assert precheck("cache_flush", params).ok


def test_in_doubt_has_nothing_to_do_without_a_prepared_transaction_and_may_start_over(
    stack: Stack,
) -> None:
    params = policy_params(stack, "resolve-in-doubt")
    assert precheck("in_doubt", {**params, "min_age_s": 3600}).decline is Decline.NOTHING_TO_DO
    with pytest.raises(ActionError) as failed:
        precheck("in_doubt", {**params, "orders_dsn": dead_dsn()})
    assert not failed.value.permanent  # a failed run whose action may start over: retried
    assert build_action("in_doubt").may_start_over


def test_restore_declines_each_kind(stack: Stack) -> None:
    params = policy_params(stack, "restore-damaged-data")
    assert precheck("restore", params).decline is Decline.NOTHING_TO_DO  # the data is sound
    dead = {**params, "nodes": {"a": dead_dsn(), "b": dead_dsn()}}
    assert precheck("restore", dead).decline is Decline.NOT_NOW


def test_backup_says_not_now_without_a_writable_leader(stack: Stack) -> None:
    params = policy_params(stack, "scheduled-backup")
    dead = {**params, "nodes": {"a": dead_dsn(), "b": dead_dsn()}}
    assert precheck("backup", dead).decline is Decline.NOT_NOW
