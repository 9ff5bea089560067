"""A shop process crashed at each step of the two-phase commit resolves to all-or-nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import requests
from sqlalchemy import Engine

from lab.layout import find_free_base_port
from lab.stack import Stack
from shop.orders import OrderCoordinator
from tests.conftest import Ledger, order, prepared_gids

# step -> (prepared transactions the crash leaves, whether the order must exist after recovery)
STEPS = {
    "before_prepare": (0, False),
    "after_first_prepare": (1, False),
    "after_both_prepares": (2, False),
    "after_decision": (2, True),
    "after_first_commit": (1, True),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_crash_at_each_step_resolves_to_all_or_nothing_on_restart(
    step: str,
    stack: Stack,
    engines: dict[str, Engine],
    new_product: Callable[..., int],
    ledger: Callable[[int], Ledger],
) -> None:
    left_prepared, committed = STEPS[step]
    instance = f"crash-{step.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    port = find_free_base_port()
    env = {"SHOP_INSTANCE_ID": instance}
    product = new_product(stock=10)
    key = f"crash-{uuid.uuid4()}"

    crashing = stack.shop_server(90, port=port, extra_env={**env, "SHOP_FAILPOINT": step})
    crashing.start().wait_ready()
    try:
        with pytest.raises(requests.ConnectionError):
            order(f"http://127.0.0.1:{port}", key, product, quantity=1)
    finally:
        crashing.stop()
    assert len(prepared_gids(engines, f"shop:{instance}:")) == left_prepared

    restarted = stack.shop_server(90, port=port, extra_env=env)
    restarted.start().wait_ready()  # resolves its own in-doubt transactions before serving
    try:
        assert prepared_gids(engines, f"shop:{instance}:") == []
        books = ledger(product)
        expected = (9, 1, 1) if committed else (10, 0, 0)
        assert (books.stock(), books.order_count(), books.moved_quantity()) == expected

        # The client's retry with the same key: a replay if committed, a first order if not.
        retry = order(f"http://127.0.0.1:{port}", key, product, quantity=1)
        assert retry.status_code == 201
        assert retry.headers["Idempotent-Replayed"] == ("true" if committed else "false")
        assert (books.stock(), books.order_count(), books.moved_quantity()) == (9, 1, 1)
    finally:
        restarted.stop()


def test_the_resolver_leaves_transactions_younger_than_its_threshold_alone(
    stack: Stack,
    engines: dict[str, Engine],
    new_product: Callable[..., int],
    ledger: Callable[[int], Ledger],
) -> None:
    instance = f"young-{uuid.uuid4().hex[:6]}"
    port = find_free_base_port()
    product = new_product(stock=4)
    crashing = stack.shop_server(
        91,
        port=port,
        extra_env={"SHOP_INSTANCE_ID": instance, "SHOP_FAILPOINT": "after_both_prepares"},
    )
    crashing.start().wait_ready()
    try:
        with pytest.raises(requests.ConnectionError):
            order(f"http://127.0.0.1:{port}", f"young-{uuid.uuid4()}", product)
    finally:
        crashing.stop()
    resolver = OrderCoordinator(engines["orders"], engines["inventory"], instance_id="resolver")

    assert resolver.resolve_in_doubt(min_age_s=3600) == []
    assert len(prepared_gids(engines, f"shop:{instance}:")) == 2

    resolved = resolver.resolve_in_doubt(min_age_s=0)
    mine = [r for r in resolved if r.gid.startswith(f"shop:{instance}:")]
    assert sorted(r.database for r in mine) == ["inventory", "orders"]
    assert {r.decision for r in mine} == {"abort"}
    assert prepared_gids(engines, f"shop:{instance}:") == []
    assert ledger(product).stock() == 4
