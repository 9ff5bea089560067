"""Repair in place: put back, from a scratch instance restored to the last good point, what
damage took from the live database, keeping every good write made since.

Append-only tables are repaired (the shop never updates or deletes their rows, so a row that
existed then and is missing now was lost): a dropped table is recreated from the scratch copy
(pg_dump | psql), and missing rows are copied back by primary key. Then stock: a product's
stock is the sum of its ledger (adjustments and the orders' movements, both append-only, so
just repaired), and a stock value changed behind the ledger is set back to that sum. Anything
else (an UPDATE that corrupted an order's values) needs a full point-in-time restore, which
the restore action only states the loss of: an operator must request it, accepting that
loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgcluster import invariants
from remediation import pg_ops
from remediation.base import ActionError
from remediation.executors.base import Executor, ExecutorError


def exists(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def recreate_table(
    executor: Executor, node: str, scratch_dsn: str, live_dsn: str, table: str, work_dir: Path
) -> int:
    """Dump the table (definition, indexes, owned sequence, rows) from the scratch instance
    and load it into the live database; returns the rows it holds."""
    dump = work_dir / f"repair-{table}.sql"
    try:
        executor.run_tool(node, "pg_dump", ["-d", scratch_dsn, "-t", table, "-f", str(dump)])
        # One transaction: the shop's writes must not land in a half-built table.
        executor.run_tool(
            node, "psql", ["-1", "-d", live_dsn, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(dump)]
        )
    except ExecutorError as exc:
        raise ActionError(f"could not recreate {table}: {exc}") from exc
    finally:
        dump.unlink(missing_ok=True)
    with pg_ops.connect(live_dsn, timeout_s=5) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        found = row.fetchone()
    return int(found[0]) if found else 0


def copy_missing_rows(scratch_dsn: str, live_dsn: str, table: str) -> int:
    """Rows of the scratch copy that the live table lacks (by its primary key), copied back;
    rows written since stay as they are. Returns how many were put back."""
    name = sql.Identifier(table)
    with (
        pg_ops.connect(scratch_dsn, timeout_s=5) as src,
        pg_ops.connect(live_dsn, timeout_s=5) as dst,
        dst.transaction(),
    ):
        dst.execute(
            sql.SQL(
                "CREATE TEMP TABLE repair_rows (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP"
            ).format(name)
        )
        with (
            src.cursor().copy(sql.SQL("COPY {} TO STDOUT").format(name)) as out,
            dst.cursor().copy("COPY repair_rows FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        done = dst.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM repair_rows ON CONFLICT DO NOTHING").format(name)
        )
        return max(done.rowcount, 0)


def repair_tables(
    executor: Executor,
    node: str,
    scratch_dsn: str,
    live_dsn: str,
    tables: list[str],
    work_dir: Path,
) -> dict[str, str]:
    """Per table: what was done ("recreated with N rows", "N rows put back", "intact")."""
    report = {}
    for table in tables:
        with pg_ops.connect(live_dsn, timeout_s=5) as live:
            present = exists(live, table)
        if not present:
            rows = recreate_table(executor, node, scratch_dsn, live_dsn, table, work_dir)
            report[table] = f"recreated with {rows} rows"
            continue
        put_back = copy_missing_rows(scratch_dsn, live_dsn, table)
        report[table] = f"{put_back} rows put back" if put_back else "intact"
    return report


def rebalance_stock(live_dsn: str, *, lock_timeout_ms: int = 5000) -> dict[int, tuple[int, int]]:
    """Every product whose stock is not the sum of its ledger gets that sum back: product id
    -> (stock found, stock set). One product at a time, under its row lock, which every order
    takes first: no order can move its stock or its ledger in between."""
    fixed: dict[int, tuple[int, int]] = {}
    with pg_ops.connect(live_dsn, timeout_s=5) as conn:
        conn.execute(f"SET lock_timeout = {int(lock_timeout_ms)}")
        suspects = [int(r[0]) for r in conn.execute(invariants.UNBALANCED).fetchall()]
        for product in suspects:
            with conn.transaction():
                row = conn.execute(
                    "SELECT stock FROM products WHERE id = %s FOR UPDATE", (product,)
                ).fetchone()
                ledger = conn.execute(
                    "SELECT (SELECT COALESCE(sum(delta), 0) FROM stock_adjustments"
                    "  WHERE product_id = %s)"
                    " + (SELECT COALESCE(sum(delta), 0) FROM stock_movements"
                    "  WHERE product_id = %s)",
                    (product, product),
                ).fetchone()
                if row is None or ledger is None or int(row[0]) == int(ledger[0]):
                    continue
                conn.execute(
                    "UPDATE products SET stock = %s, updated_at = now() WHERE id = %s",
                    (int(ledger[0]), product),
                )
                fixed[product] = (int(row[0]), int(ledger[0]))
    return fixed
