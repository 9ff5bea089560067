"""InvariantProbe: the shop's business invariants, checked in SQL across both databases:
stock never negative, and every settled order has its inventory movement (and vice versa)."""

from __future__ import annotations

from typing import Any

import psycopg
from pydantic import Field

from probes.base import Health, Params, Probe, ProbeResult, describe, down


class InvariantParams(Params):
    orders_dsn: str
    inventory_dsn: str
    # Rows younger than this may belong to a two-phase commit still in flight.
    settle_s: float = Field(default=10.0, ge=0)


class InvariantProbe(Probe):
    kind = "invariant"
    Params = InvariantParams

    def check(self) -> ProbeResult:
        p: InvariantParams = self.params  # type: ignore[assignment]
        timeout = {
            "connect_timeout": max(1, round(self.timeout_s)),
            "autocommit": True,
            "options": f"-c statement_timeout={int(self.timeout_s * 1000)}",
        }
        try:
            with psycopg.connect(p.inventory_dsn, **timeout) as inv:  # type: ignore[arg-type]
                cutoff = inv.execute(
                    "SELECT now() - make_interval(secs => %s)", (p.settle_s,)
                ).fetchone()
                assert cutoff is not None
                negative = inv.execute("SELECT count(*) FROM products WHERE stock < 0").fetchone()
                moved: dict[Any, int] = dict(inv.execute(
                    "SELECT order_id, -delta FROM stock_movements WHERE created_at < %s",
                    (cutoff[0],),
                ).fetchall())  # fmt: skip
            with psycopg.connect(p.orders_dsn, **timeout) as ords:  # type: ignore[arg-type]
                ordered: dict[Any, int] = dict(ords.execute(
                    "SELECT id, quantity FROM orders WHERE created_at < %s", (cutoff[0],)
                ).fetchall())  # fmt: skip
        except psycopg.errors.UndefinedTable as exc:
            return down(f"a table is missing: {describe(exc)}", violated="schema")
        except psycopg.Error as exc:
            return down(describe(exc))
        return self._judge(int(negative[0]) if negative else 0, ordered, moved)

    @staticmethod
    def _judge(negative: int, ordered: dict[Any, int], moved: dict[Any, int]) -> ProbeResult:
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
        if problems:
            return ProbeResult(Health.DOWN, "; ".join(problems), details=details)
        return ProbeResult(Health.UP, f"{len(ordered)} settled orders consistent", details=details)
