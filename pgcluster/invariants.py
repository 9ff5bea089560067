"""The shop's business invariants, read in SQL across its two databases: stock never
negative, every order has its inventory movement and vice versa, with equal quantities, and
every product's stock is the sum of its ledger (adjustments and the orders' movements).

A mismatch that a two-phase commit still in flight explains (its other half still prepared,
or committed while we looked) is reported in the details but is no problem; any other, of
any age, is damage. Judged by the invariant probe, by restore drills, and by the restore
action before it acts (a database it cannot read is not damaged data: that is a failover's
job)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.errors

from pgcluster.nodes import deadline

# The shop's participant gids: shop:<instance>:<order uuid hex>:<database> (shop/orders.py).
GID_PREFIX = "shop:"
ORDERS = "orders"
INVENTORY = "inventory"
MAX_LISTED = 20


@dataclass(frozen=True, slots=True)
class Verdict:
    readable: bool  # False: could not check (unreachable, timed out); see `error`
    problems: tuple[str, ...] = ()  # empty and readable: the invariants hold
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def is_sound(self) -> bool:
        return self.readable and not self.problems


def check(
    orders_dsn: str, inventory_dsn: str, *, timeout_s: float, settle_s: float | None = None
) -> Verdict:
    """Orders are read before inventory: a 2PC commits inventory first, so a commit that lands
    between the two reads shows as a movement without its order, which the re-check explains.
    `settle_s` is deprecated and ignored: no row is left out for its age."""
    options = {
        "connect_timeout": max(1, round(timeout_s)),
        "autocommit": True,
        "options": f"-c statement_timeout={int(timeout_s * 1000)}",
    }
    try:
        with (
            psycopg.connect(orders_dsn, **options) as ords,  # type: ignore[arg-type]
            psycopg.connect(inventory_dsn, **options) as inv,  # type: ignore[arg-type]
            deadline(timeout_s * 3, ords, inv),
        ):
            ordered = read_orders(ords)
            negative, moved = read_inventory(inv)
            unbalanced = read_unbalanced(inv)
            suspects = mismatched(ordered, moved)
            in_flight: dict[str, str] = {}
            if suspects:
                # Prepared halves first, rows after: a half that commits between the two
                # reads is then seen by the re-read.
                prepared = prepared_halves(ords, ORDERS) | prepared_halves(inv, INVENTORY)
                _, moved_now = read_inventory(inv, suspects)
                ordered_now = read_orders(ords, suspects)
                in_flight = explain(suspects, ordered, moved, prepared, ordered_now, moved_now)
    except psycopg.errors.UndefinedTable as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Verdict(True, (f"a table is missing: {first}",), {"violated": "schema"})
    except psycopg.Error as exc:
        return Verdict(False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    return judge(negative, ordered, moved, in_flight, unbalanced)


def read_orders(
    conn: psycopg.Connection[Any], ids: Collection[str] | None = None
) -> dict[str, int]:
    if ids is None:
        rows = conn.execute("SELECT id::text, quantity FROM orders").fetchall()
    else:
        rows = conn.execute(
            "SELECT id::text, quantity FROM orders WHERE id = ANY(%s::uuid[])", (list(ids),)
        ).fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


def read_inventory(
    conn: psycopg.Connection[Any], ids: Collection[str] | None = None
) -> tuple[int, dict[str, int]]:
    """Products with negative stock, and each order's moved quantity."""
    if ids is None:
        row = conn.execute("SELECT count(*) FROM products WHERE stock < 0").fetchone()
        negative = int(row[0]) if row else 0
        rows = conn.execute("SELECT order_id::text, -delta FROM stock_movements").fetchall()
    else:
        negative = 0
        rows = conn.execute(
            "SELECT order_id::text, -delta FROM stock_movements WHERE order_id = ANY(%s::uuid[])",
            (list(ids),),
        ).fetchall()
    return negative, {str(r[0]): int(r[1]) for r in rows}


# One statement, one snapshot: an order's stock change and its movement commit together (in
# the inventory half of its 2PC), so a product whose stock is not the sum of its ledger (the
# adjustments: initial stock, restocks; and the orders' movements) was changed behind it.
UNBALANCED = (
    "SELECT p.id, p.stock, COALESCE(a.total, 0) + COALESCE(m.total, 0)"
    " FROM products p"
    " LEFT JOIN (SELECT product_id, sum(delta) AS total FROM stock_adjustments"
    "  GROUP BY product_id) a ON a.product_id = p.id"
    " LEFT JOIN (SELECT product_id, sum(delta) AS total FROM stock_movements"
    "  GROUP BY product_id) m ON m.product_id = p.id"
    " WHERE p.stock <> COALESCE(a.total, 0) + COALESCE(m.total, 0) ORDER BY p.id"
)


def read_unbalanced(conn: psycopg.Connection[Any]) -> dict[int, tuple[int, int]]:
    """Products whose stock is not what their ledger says: id -> (stock, ledger)."""
    return {int(r[0]): (int(r[1]), int(r[2])) for r in conn.execute(UNBALANCED).fetchall()}


def prepared_halves(conn: psycopg.Connection[Any], database: str) -> set[tuple[str, str]]:
    """(order uuid hex, database) of each shop transaction still prepared in this database."""
    rows = conn.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE %s",
        (GID_PREFIX + "%",),
    ).fetchall()
    halves = set()
    for (gid,) in rows:
        parts = str(gid).rsplit(":", 2)
        if len(parts) == 3 and parts[2] == database:
            halves.add((parts[1], database))
    return halves


def uuid_hex(order_id: str) -> str:
    return order_id.replace("-", "").lower()


def mismatched(ordered: Mapping[str, int], moved: Mapping[str, int]) -> set[str]:
    """Order ids on one side only, or with different quantities on the two sides."""
    return {o for o in ordered.keys() | moved.keys() if ordered.get(o) != moved.get(o)}


def explain(
    suspects: Collection[str],
    ordered: Mapping[str, int],
    moved: Mapping[str, int],
    prepared: Collection[tuple[str, str]],
    ordered_now: Mapping[str, int],
    moved_now: Mapping[str, int],
) -> dict[str, str]:
    """Which mismatches a 2PC in flight explains, and how: the missing half is still prepared,
    or the re-read (after the look at what is prepared) finds the two sides agreeing."""
    why: dict[str, str] = {}
    for order_id in suspects:
        missing = [
            db for db, side in ((ORDERS, ordered), (INVENTORY, moved)) if order_id not in side
        ]
        still = [db for db in missing if (uuid_hex(order_id), db) in prepared]
        if still:
            why[order_id] = f"{' and '.join(still)} half still prepared"
        elif ordered_now.get(order_id) == moved_now.get(order_id):
            why[order_id] = "committed while checked"
    return why


def judge(
    negative: int,
    ordered: Mapping[str, int],
    moved: Mapping[str, int],
    in_flight: Mapping[str, str] | None = None,
    unbalanced: Mapping[int, tuple[int, int]] | None = None,
) -> Verdict:
    """`in_flight`: order id -> why a 2PC in flight explains its mismatch (see `explain`);
    `unbalanced`: product id -> (stock, what its ledger says), where they differ."""
    unbalanced = unbalanced or {}
    suspects = mismatched(ordered, moved)
    flying = {o: why for o, why in (in_flight or {}).items() if o in suspects}
    damaged = sorted(suspects - flying.keys())
    without_movement = [o for o in damaged if o not in moved]
    without_order = [o for o in damaged if o not in ordered]
    quantity = [o for o in damaged if o in ordered and o in moved]
    details = {
        "orders": len(ordered),
        "negative_stock_products": negative,
        "orders_without_movement": without_movement[:MAX_LISTED],
        "movements_without_order": without_order[:MAX_LISTED],
        "quantity_mismatches": quantity[:MAX_LISTED],
        "in_flight": dict(sorted(flying.items())[:MAX_LISTED]),
        "in_flight_count": len(flying),
        "stock_off_ledger": {str(k): v for k, v in sorted(unbalanced.items())[:MAX_LISTED]},
    }
    problems = []
    if negative:
        problems.append(f"{negative} products with negative stock")
    if without_movement:
        problems.append(f"{len(without_movement)} orders without movement")
    if without_order:
        problems.append(f"{len(without_order)} movements without order")
    if quantity:
        problems.append(f"{len(quantity)} quantity mismatches")
    if unbalanced:
        problems.append(f"{len(unbalanced)} products whose stock disagrees with its ledger")
    return Verdict(True, tuple(problems), details)
