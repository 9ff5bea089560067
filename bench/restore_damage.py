"""Restore after damage, under load: per damage kind, the time from the operator's approval to
the restore verified (or escalated), and the acknowledged orders lost (goal: 0 for damage to
append-only data). Three clients order throughout, on a lab stack of its own.

    .venv/bin/python bench/restore_damage.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import stack_of_its_own
from tests.test_backups import primary_sql
from tests.test_controlplane import Api
from tests.test_failover import orders_present, runs_of
from tests.test_restore import (
    approve_next_restore,
    invariants_hold,
    last_run_id,
    ready,
    under_load,
)

DAMAGE = {
    "deleted orders (200 oldest)": (
        "orders",
        "DELETE FROM orders WHERE id IN (SELECT id FROM orders ORDER BY created_at LIMIT 200)",
    ),
    "deleted stock movements (100)": (
        "inventory",
        "DELETE FROM stock_movements WHERE id IN"
        " (SELECT id FROM stock_movements ORDER BY id LIMIT 100)",
    ),
    "dropped table stock_movements": ("inventory", "DROP TABLE stock_movements"),
    "stock values changed behind the ledger (10)": (
        "inventory",
        "UPDATE products SET stock = stock + 500 WHERE id IN"
        " (SELECT id FROM products ORDER BY id LIMIT 10)",
    ),
    "orders changed in place (repair cannot undo)": (
        "orders",
        "UPDATE orders SET quantity = quantity + 1 WHERE id IN"
        " (SELECT id FROM orders ORDER BY created_at DESC LIMIT 3)",
    ),
}


def one(stack: Any, api: Api, db: str, damage: str, warmup_s: float) -> dict[str, Any]:
    ready(stack)
    before = last_run_id(api)
    with under_load(stack) as load:
        time.sleep(warmup_s)  # a bench: orders accumulate before the damage
        primary_sql(stack, db, damage)
        approved_at: list[float] = []
        original = api.post

        def post(path: str, body: Any) -> Any:
            if path.endswith("/approve"):
                approved_at.append(time.monotonic())
            return original(path, body)

        api.post = post  # type: ignore[method-assign]
        try:
            done = approve_next_restore(api, before)
        finally:
            api.post = original  # type: ignore[method-assign]
        finished_at = time.monotonic()
    acknowledged = list(load.acknowledged)
    present = orders_present(stack, acknowledged)
    return {
        "state": done["state"],
        "approval_to_end_s": round(finished_at - approved_at[0], 1),
        "acknowledged": len(acknowledged),
        "lost": len(set(acknowledged) - set(present)),
        "invariants_hold": invariants_hold(stack),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-s", type=float, default=10)
    args = parser.parse_args()
    overrides = {"restore-damaged-data": {"cooldown_s": 1, "max_runs": 50}}
    with stack_of_its_own(
        "bench-restore-damage", products=50, stock=1_000_000, policy_overrides=overrides
    ) as stack:
        api = Api(stack)
        print(f"{'damage':<46} {'run':<10} {'approval→end':>13} {'acked':>6} {'lost':>5} inv")
        for kind, (db, damage) in DAMAGE.items():
            row = one(stack, api, db, damage, args.warmup_s)
            print(
                f"{kind:<46} {row['state']:<10} {row['approval_to_end_s']:>12}s "
                f"{row['acknowledged']:>6} {row['lost']:>5} {row['invariants_hold']}",
                flush=True,
            )
        print(f"restore runs: {[r['state'] for r in runs_of(api, 'restore')]}")


if __name__ == "__main__":
    main()
