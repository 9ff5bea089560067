"""What a full restore to a point would discard, exported before it runs: the append-only rows
the live cluster holds and the copy at the point lacks, and the command that re-applies the
orders among them still valid (their stock still there).

    python -m remediation.restore_export FILE ORDERS_DSN INVENTORY_DSN"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from remediation import pg_ops

KEYS = {"orders": "id", "tx_decisions": "gid", "stock_movements": "order_id"}
DATABASES = {"orders": "orders", "tx_decisions": "orders", "stock_movements": "inventory"}


@dataclass(frozen=True, slots=True)
class Loss:
    """Acknowledged orders a full restore to the point would discard."""

    order_ids: tuple[str, ...]
    total_cents: int
    rows: Mapping[str, list[dict[str, Any]]]  # table -> rows written after the point

    @property
    def count(self) -> int:
        return len(self.order_ids)

    def describe(self) -> str:
        ids = ", ".join(self.order_ids[:10]) + (" …" if self.count > 10 else "")
        return f"{self.count} acknowledged orders, total {self.total_cents} cents ({ids or 'none'})"


def keys_of(dsn: str, table: str) -> set[str]:
    key = sql.Identifier(KEYS[table])
    with pg_ops.connect(dsn, timeout_s=10) as conn:
        if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]:  # type: ignore[index]
            return set()
        query = sql.SQL("SELECT {}::text FROM {}").format(key, sql.Identifier(table))
        return {str(r[0]) for r in conn.execute(query).fetchall()}


def rows_of(dsn: str, table: str, keys: set[str]) -> list[dict[str, Any]]:
    if not keys:
        return []
    query = sql.SQL("SELECT * FROM {} WHERE {}::text = ANY(%s)").format(
        sql.Identifier(table), sql.Identifier(KEYS[table])
    )
    with pg_ops.connect(dsn, timeout_s=10) as conn, conn.cursor(row_factory=dict_row) as cur:
        return [
            {k: (v if isinstance(v, int | str | None) else str(v)) for k, v in row.items()}
            for row in cur.execute(query, (sorted(keys),)).fetchall()
        ]


def loss_between(live: Mapping[str, str], copy: Mapping[str, str]) -> Loss:
    """`live` and `copy`: database -> dsn. The rows only the live side has."""
    rows = {}
    for table, db in DATABASES.items():
        only = keys_of(live[db], table) - keys_of(copy[db], table)
        rows[table] = rows_of(live[db], table, only)
    orders = sorted(rows["orders"], key=lambda r: str(r["created_at"]))
    return Loss(
        tuple(str(r["id"]) for r in orders), sum(int(r["total_cents"]) for r in orders), rows
    )


def export(loss: Loss, path: Path, point: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"restore_point": point, "orders": loss.count, "total_cents": loss.total_cents}
    path.write_text(json.dumps({**body, "rows": loss.rows}, indent=1, default=str))
    return path


def reapply_command(path: Path, orders_dsn: str, inventory_dsn: str) -> str:
    return f"python -m remediation.restore_export {path} '{orders_dsn}' '{inventory_dsn}'"


def reapply(path: Path, orders_dsn: str, inventory_dsn: str) -> tuple[int, int]:
    """Each exported order whose stock is still there: its movement (and the stock taken),
    then its decision and the order. Returns (re-applied, skipped)."""
    data = json.loads(path.read_text())["rows"]
    moves = {str(m["order_id"]): m for m in data["stock_movements"]}
    decisions = {str(d["gid"]): d for d in data["tx_decisions"]}
    done = skipped = 0
    with (
        pg_ops.connect(orders_dsn, timeout_s=10) as ords,
        pg_ops.connect(inventory_dsn, timeout_s=10) as inv,
    ):
        for order in data["orders"]:
            move = moves.get(str(order["id"]))
            if move is None:
                skipped += 1
                continue
            with inv.transaction():
                taken = inv.execute(
                    "UPDATE products SET stock = stock + %s WHERE id = %s AND stock + %s >= 0"
                    " AND NOT EXISTS (SELECT 1 FROM stock_movements WHERE order_id = %s)",
                    (move["delta"], move["product_id"], move["delta"], move["order_id"]),
                ).rowcount
                if taken:
                    inv.execute(
                        "INSERT INTO stock_movements (order_id, product_id, delta, created_at)"
                        " VALUES (%s, %s, %s, %s)",
                        (move["order_id"], move["product_id"], move["delta"], move["created_at"]),
                    )
            if not taken:
                skipped += 1
                continue
            with ords.transaction():
                decision = decisions.get(str(order["gid"]))
                if decision:
                    ords.execute(
                        "INSERT INTO tx_decisions VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        tuple(decision[k] for k in ("gid", "decision", "decided_by", "decided_at")),
                    )
                columns = list(order)
                ords.execute(
                    sql.SQL("INSERT INTO orders ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
                        sql.SQL(", ").join(map(sql.Identifier, columns)),
                        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
                    ),
                    [order[c] for c in columns],
                )
            done += 1
    return done, skipped


if __name__ == "__main__":  # pragma: no cover - the operator's command
    applied, left = reapply(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
    print(f"re-applied {applied} orders, skipped {left} (stock gone or no movement)")
