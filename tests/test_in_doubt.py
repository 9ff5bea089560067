"""The control plane finishes two-phase commits a crashed shop left prepared, by its own
probe (shop_in_doubt_transactions through Prometheus), per the shop's decision log."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from lab.layout import find_free_base_port
from lab.process import wait_until
from lab.stack import Stack
from tests.conftest import Ledger, order, prepared_gids


def crash_at(stack: Stack, step: str, product: int, index: int) -> str:
    """A shop that dies at `step` of an order and is not restarted: its 2PC stays in doubt."""
    instance = f"lost-{uuid.uuid4().hex[:8]}"
    port = find_free_base_port()
    shop = stack.shop_server(
        index, port=port, extra_env={"SHOP_INSTANCE_ID": instance, "SHOP_FAILPOINT": step}
    )
    shop.start().wait_ready()
    try:
        with pytest.raises(requests.ConnectionError):
            order(f"http://127.0.0.1:{port}", f"lost-{uuid.uuid4()}", product)
    finally:
        shop.stop()
    return instance


def test_the_control_plane_resolves_a_crashed_shops_in_doubt_transactions(
    stack: Stack,
    engines: dict[str, Engine],
    new_product: Callable[..., int],
    ledger: Callable[[int], Ledger],
) -> None:
    aborted_product, committed_product = new_product(stock=5), new_product(stock=5)
    undecided = crash_at(stack, "after_both_prepares", aborted_product, 80)
    decided = crash_at(stack, "after_decision", committed_product, 81)
    assert len(prepared_gids(engines, f"shop:{undecided}:")) == 2
    assert len(prepared_gids(engines, f"shop:{decided}:")) == 2

    cp = stack.describe()["components"]["controlplane"]["url"]
    headers = {"Authorization": f"Bearer {stack.api_token}"}

    def resolved_run() -> dict[str, Any] | None:
        incidents = requests.get(
            f"{cp}/api/v1/incidents?limit=100", headers=headers, timeout=5
        ).json()["incidents"]
        for incident in incidents:
            if incident["kind"] in ("shop-in-doubt", "ShopInDoubtTransactions"):
                detail = requests.get(
                    f"{cp}/api/v1/incidents/{incident['id']}", headers=headers, timeout=5
                ).json()
                for run in detail["actions"]:
                    if run["action"] == "in_doubt" and run["state"] == "succeeded":
                        return dict(run)
        return None

    wait_until(
        lambda: resolved_run() is not None,
        timeout_s=120,
        interval_s=1,
        what="the in-doubt transactions resolved by the control plane",
    )
    assert prepared_gids(engines, f"shop:{undecided}:") == []
    assert prepared_gids(engines, f"shop:{decided}:") == []
    # All or nothing, as the decision log said: no decision -> rolled back; commit -> committed.
    aborted, committed = ledger(aborted_product), ledger(committed_product)
    assert (aborted.stock(), aborted.order_count(), aborted.moved_quantity()) == (5, 0, 0)
    assert (committed.stock(), committed.order_count(), committed.moved_quantity()) == (4, 1, 1)
    run = resolved_run()
    assert run is not None
    audit = requests.get(f"{cp}/api/v1/actions/{run['id']}", headers=headers, timeout=5).json()[
        "audit"
    ]
    outputs = [a for a in audit if a["verb"] == "output"]
    assert outputs and "committed" in outputs[0]["message"]
