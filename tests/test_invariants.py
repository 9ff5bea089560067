"""The business invariants: `judge` and `explain` as tables, then against the shared lab's real
PostgreSQL: a two-phase commit in flight is no damage, rows deleted a moment ago are, and a
database that cannot be read gives no verdict (UNKNOWN), not a violated one.

The real tests write on the shared stack, which other tests (and its own control plane's
shop-invariants probe) read: each works on a product of its own and puts back, at once and
whatever happens, every row it removed or added."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql
from sqlalchemy import Engine, delete, insert, select

from lab.layout import find_free_base_port
from lab.stack import Stack
from lab.targets import primary_dsn
from pgcluster import invariants
from pgcluster.invariants import Verdict, explain, judge
from probes.base import Health
from probes.registry import build_probe
from shop.models import Order
from tests.conftest import order

A, B, C = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
HEX_A, HEX_B = uuid.UUID(A).hex, uuid.UUID(B).hex

JUDGE_TABLE = [
    # (description, judge's arguments, expected problems)
    ("both sides agree: sound",
     (0, {A: 1, B: 2}, {A: 1, B: 2}, {}), ()),
    ("negative stock is damage",
     (2, {A: 1}, {A: 1}, {}), ("2 products with negative stock",)),
    ("an order without its movement is damage",
     (0, {A: 1, B: 2}, {A: 1}, {}), ("1 orders without movement",)),
    ("a movement without its order is damage",
     (0, {A: 1}, {A: 1, B: 2}, {}), ("1 movements without order",)),
    ("different quantities are damage",
     (0, {A: 1}, {A: 3}, {}), ("1 quantity mismatches",)),
    ("a movement whose order is in flight is no problem",
     (0, {A: 1}, {A: 1, B: 2}, {B: "orders half still prepared"}), ()),
    ("a mismatch in flight hides no other damage",
     (1, {A: 1, C: 1}, {B: 2}, {B: "orders half still prepared"}),
     ("1 products with negative stock", "2 orders without movement")),
    ("an in-flight entry for an order that agrees changes nothing",
     (0, {A: 1}, {A: 1}, {A: "committed while checked"}), ()),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), [(a, e) for _, a, e in JUDGE_TABLE],
                         ids=[d for d, _, _ in JUDGE_TABLE])  # fmt: skip
def test_judge(args: tuple[Any, ...], expected: tuple[str, ...]) -> None:
    verdict = judge(*args)
    assert verdict.readable
    assert verdict.problems == expected
    assert verdict.is_sound is not expected


def test_judge_lists_damage_and_what_is_in_flight_apart() -> None:
    verdict = judge(0, {A: 1, C: 1}, {A: 1, B: 2}, {B: "orders half still prepared"})
    assert verdict.details["movements_without_order"] == []
    assert verdict.details["orders_without_movement"] == [C]
    assert verdict.details["in_flight"] == {B: "orders half still prepared"}
    assert verdict.details["in_flight_count"] == 1


EXPLAIN_TABLE = [
    # (description, explain's arguments after `suspects`, expected explanations)
    ("a movement whose orders half is still prepared",
     ({}, {A: 1}, {(HEX_A, "orders")}, {}, {A: 1}), {A: "orders half still prepared"}),
    ("an order whose inventory half is still prepared (a resolver commits in any order)",
     ({A: 1}, {}, {(HEX_A, "inventory")}, {A: 1}, {}), {A: "inventory half still prepared"}),
    ("a movement whose order committed between the reads: the re-read agrees",
     ({}, {A: 1}, set(), {A: 1}, {A: 1}), {A: "committed while checked"}),
    ("a movement without order, nothing prepared, still alone on the re-read: damage",
     ({}, {A: 1}, set(), {}, {A: 1}), {}),
    ("the prepared half of another order explains nothing",
     ({}, {A: 1}, {(HEX_B, "orders")}, {}, {A: 1}), {}),
    ("a prepared half on the side that is present explains nothing",
     ({}, {A: 1}, {(HEX_A, "inventory")}, {}, {A: 1}), {}),
    ("a quantity mismatch that stays on the re-read: damage",
     ({A: 1}, {A: 2}, set(), {A: 1}, {A: 2}), {}),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), [(a, e) for _, a, e in EXPLAIN_TABLE],
                         ids=[d for d, _, _ in EXPLAIN_TABLE])  # fmt: skip
def test_explain(args: tuple[Any, ...], expected: dict[str, str]) -> None:
    assert explain({A}, *args) == expected


# -- against the shared lab's PostgreSQL -------------------------------------------------------
def check(stack: Stack) -> Verdict:
    return invariants.check(
        primary_dsn(stack.layout, "orders"), primary_dsn(stack.layout, "inventory"), timeout_s=5
    )


@contextmanager
def autocommit(stack: Stack, db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(primary_dsn(stack.layout, db), autocommit=True) as conn:
        yield conn


def test_a_movement_whose_order_is_still_prepared_is_in_flight_until_rolled_back(
    stack: Stack, new_product: Callable[..., int]
) -> None:
    product = new_product(stock=5)
    order_id = uuid.uuid4()
    txid = f"shop:tests-invariants:{order_id.hex}"  # the shop's gid format (shop/orders.py)
    inv = psycopg.connect(primary_dsn(stack.layout, "inventory"))
    ords = psycopg.connect(primary_dsn(stack.layout, "orders"))
    try:
        # The shop's 2PC by hand, stopped between its two commits: inventory committed,
        # the order still prepared (what a failover leaves behind for a moment).
        inv.tpc_begin(f"{txid}:inventory")
        inv.execute("UPDATE products SET stock = stock - 1 WHERE id = %s", (product,))
        inv.execute(
            "INSERT INTO stock_movements (order_id, product_id, delta) VALUES (%s, %s, -1)",
            (order_id, product),
        )
        inv.tpc_prepare()
        ords.tpc_begin(f"{txid}:orders")
        ords.execute(
            "INSERT INTO orders (id, idempotency_key, request_hash, product_id, quantity,"
            " customer, address, unit_price_cents, total_cents, gid)"
            " VALUES (%s, %s, 'x', %s, 1, 'c', 'a', 1, 1, %s)",
            (order_id, f"tests-invariants-{order_id}", product, txid),
        )
        ords.tpc_prepare()
        inv.tpc_commit()

        in_flight = check(stack)
        assert in_flight.readable, in_flight.error
        assert in_flight.details["in_flight"][str(order_id)] == "orders half still prepared"
        assert str(order_id) not in in_flight.details["movements_without_order"]

        ords.tpc_rollback()  # the order is lost: its movement is damage now, however young
        damaged = check(stack)
        assert str(order_id) in damaged.details["movements_without_order"]
        assert str(order_id) not in damaged.details["in_flight"]
        assert any(p.endswith("movements without order") for p in damaged.problems)
    finally:
        inv.close()
        ords.close()
        for db in ("orders", "inventory"):  # whatever a failed assertion left prepared
            with autocommit(stack, db) as conn:
                gid = f"{txid}:{db}"
                if conn.execute(
                    "SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)
                ).fetchone():
                    conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
        with autocommit(stack, "inventory") as conn, conn.transaction():
            moved = conn.execute(
                "DELETE FROM stock_movements WHERE order_id = %s RETURNING -delta", (order_id,)
            ).fetchone()
            if moved:
                conn.execute(
                    "UPDATE products SET stock = stock + %s WHERE id = %s", (moved[0], product)
                )
    assert str(order_id) not in check(stack).details["movements_without_order"]


def test_orders_deleted_a_moment_ago_are_damage_at_once(
    stack: Stack, shops: list[str], engines: dict[str, Engine], new_product: Callable[..., int]
) -> None:
    product = new_product(stock=5)
    placed = [order(shops[0], f"tests-invariants-{uuid.uuid4()}", product) for _ in range(2)]
    assert [r.status_code for r in placed] == [201, 201], [r.text for r in placed]
    ids = [uuid.UUID(r.json()["id"]) for r in placed]
    table = Order.__table__
    with engines["orders"].begin() as conn:
        rows = [dict(r) for r in conn.execute(select(table).where(table.c.id.in_(ids))).mappings()]
        conn.execute(delete(table).where(table.c.id.in_(ids)))
    try:
        verdict = check(stack)
        probe = build_probe(
            "invariant",
            "inv",
            {
                "orders_dsn": primary_dsn(stack.layout, "orders"),
                "inventory_dsn": primary_dsn(stack.layout, "inventory"),
            },
            5,
        ).run()
    finally:
        with engines["orders"].begin() as conn:
            conn.execute(insert(table), rows)
    assert {str(i) for i in ids} <= set(verdict.details["movements_without_order"])
    assert any(p.endswith("movements without order") for p in verdict.problems)
    assert probe.health is Health.DOWN
    assert "movements without order" in probe.summary
    after = check(stack)
    assert not {str(i) for i in ids} & set(after.details["movements_without_order"])


def test_a_database_that_cannot_be_read_gives_no_verdict_and_the_probe_says_unknown() -> None:
    dsn = f"host=127.0.0.1 port={find_free_base_port()} user=postgres dbname=orders"
    verdict = invariants.check(dsn, dsn, timeout_s=1)
    assert not verdict.readable
    assert not verdict.is_sound and verdict.problems == ()
    assert verdict.error.startswith("OperationalError")
    result = build_probe("invariant", "inv", {"orders_dsn": dsn, "inventory_dsn": dsn}, 1).run()
    assert result.health is Health.UNKNOWN
    assert result.summary.startswith("cannot read the data: OperationalError")


def test_a_stock_value_changed_behind_its_ledger_is_damage_and_a_restock_is_not(
    stack: Stack, shops: list[str], new_product: Callable[..., int]
) -> None:
    product = new_product(stock=5)
    assert order(shops[0], f"tests-invariants-{uuid.uuid4()}", product).status_code == 201
    restock = requests.patch(
        f"{shops[0]}/admin/products/{product}",
        json={"stock": 40},
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        timeout=10,
    )
    assert restock.status_code == 200, restock.text
    assert str(product) not in check(stack).details["stock_off_ledger"]
    with autocommit(stack, "inventory") as conn:
        conn.execute("UPDATE products SET stock = 1000 WHERE id = %s", (product,))
    try:
        verdict = check(stack)
    finally:
        with autocommit(stack, "inventory") as conn:
            conn.execute("UPDATE products SET stock = 40 WHERE id = %s", (product,))
    assert verdict.details["stock_off_ledger"][str(product)] == (1000, 40)
    assert any(p.endswith("disagrees with its ledger") for p in verdict.problems)
    assert str(product) not in check(stack).details["stock_off_ledger"]
