"""The shop's business invariants, read in SQL across its two databases: stock never
negative, every settled order has its inventory movement and vice versa, with equal
quantities. Judged by the invariant probe, by restore drills, and by the restore action
before it acts (a database it cannot read is not damaged data: that is a failover's job)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.errors


@dataclass(frozen=True, slots=True)
class Verdict:
    readable: bool  # False: could not check (unreachable, timed out); see `error`
    problems: tuple[str, ...] = ()  # empty and readable: the invariants hold
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def is_sound(self) -> bool:
        return self.readable and not self.problems


def check(orders_dsn: str, inventory_dsn: str, *, settle_s: float, timeout_s: float) -> Verdict:
    """Rows younger than `settle_s` are left out: they may belong to a 2PC still in flight."""
    options = {
        "connect_timeout": max(1, round(timeout_s)),
        "autocommit": True,
        "options": f"-c statement_timeout={int(timeout_s * 1000)}",
    }
    try:
        with psycopg.connect(inventory_dsn, **options) as inv:  # type: ignore[arg-type]
            cutoff = inv.execute("SELECT now() - make_interval(secs => %s)", (settle_s,)).fetchone()
            assert cutoff is not None
            negative = inv.execute("SELECT count(*) FROM products WHERE stock < 0").fetchone()
            moved: dict[Any, int] = dict(inv.execute(
                "SELECT order_id, -delta FROM stock_movements WHERE created_at < %s",
                (cutoff[0],),
            ).fetchall())  # fmt: skip
        with psycopg.connect(orders_dsn, **options) as ords:  # type: ignore[arg-type]
            ordered: dict[Any, int] = dict(ords.execute(
                "SELECT id, quantity FROM orders WHERE created_at < %s", (cutoff[0],)
            ).fetchall())  # fmt: skip
    except psycopg.errors.UndefinedTable as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Verdict(True, (f"a table is missing: {first}",), {"violated": "schema"})
    except psycopg.Error as exc:
        return Verdict(False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    return judge(int(negative[0]) if negative else 0, ordered, moved)


def judge(negative: int, ordered: dict[Any, int], moved: dict[Any, int]) -> Verdict:
    # An order inside the settle window on one side may fall outside it on the other.
    without_movement = [str(o) for o in ordered if o not in moved]
    without_order = [str(o) for o in moved if o not in ordered]
    mismatched = [str(o) for o, q in ordered.items() if o in moved and moved[o] != q]
    details = {
        "orders": len(ordered),
        "negative_stock_products": negative,
        "orders_without_movement": without_movement[:20],
        "movements_without_order": without_order[:20],
        "quantity_mismatches": mismatched[:20],
    }
    problems = []
    if negative:
        problems.append(f"{negative} products with negative stock")
    if without_movement:
        problems.append(f"{len(without_movement)} orders without movement")
    if without_order:
        problems.append(f"{len(without_order)} movements without order")
    if mismatched:
        problems.append(f"{len(mismatched)} quantity mismatches")
    return Verdict(True, tuple(problems), details)
