"""drop-table: a shop table dropped on the primary (default `stock_movements`: every order
fails until it is back). Data damage: the restore waits for an operator's approval."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import BaseFault, FaultRecord, Stamp, record
from lab.observe import StackView

TABLES = {"stock_movements": "inventory", "tx_decisions": "orders", "orders": "orders"}


class DropTable(BaseFault):
    kind: ClassVar[str] = "drop-table"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restore"})
    target: ClassVar[str] = "shop-db-cluster"
    destructive: ClassVar[bool] = True
    table: str = "stock_movements"

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        database = TABLES[self.table]
        with view.leader_db(database) as conn:
            started = Stamp.now()
            conn.execute(f"DROP TABLE {self.table} CASCADE")  # a name from TABLES only
        return record(self.kind, f"{database}.{self.table}", started, Stamp.now())

    def is_recovered(self, view: StackView) -> bool:
        with view.leader_db(TABLES[self.table]) as conn:
            row = conn.execute("SELECT to_regclass(%s)", (self.table,)).fetchone()
        return bool(row and row[0])
