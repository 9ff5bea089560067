"""delete-orders: the oldest order rows deleted on the primary (a bad migration, a wrong
WHERE). Data damage: the restore that follows waits for an operator's approval."""

from __future__ import annotations

from typing import ClassVar

from lab.chaos.base import BaseFault, FaultRecord, Stamp, record
from lab.observe import StackView


class DeleteOrders(BaseFault):
    kind: ClassVar[str] = "delete-orders"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"restore"})
    target: ClassVar[str] = "shop-db-cluster"
    destructive: ClassVar[bool] = True
    rows: int = 5

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        with view.leader_db("orders") as conn:
            started = Stamp.now()
            rows = conn.execute(
                "DELETE FROM orders WHERE id IN "
                "(SELECT id FROM orders ORDER BY created_at LIMIT %s) RETURNING id::text",
                (self.rows,),
            ).fetchall()
        self.deleted = [str(r[0]) for r in rows]
        return record(self.kind, "orders", started, Stamp.now(), deleted_ids=self.deleted)

    def is_recovered(self, view: StackView) -> bool:
        return len(view.orders_present(self.deleted)) == len(self.deleted)
