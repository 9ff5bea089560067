"""Restore under load on a stack of its own: the restore point taken from the WAL and proven in
a scratch copy, a repair that loses no acknowledged order, and a full restore only when an
operator accepted its exact loss (exported first)."""

from __future__ import annotations

import contextlib
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.load import LoadResult, run_order_load
from lab.process import wait_until
from lab.stack import Stack
from pgcluster import invariants
from remediation import pitr, restore_point
from tests.conftest import stack_of_its_own
from tests.test_backups import place_orders, primary_sql, with_a_backup
from tests.test_controlplane import Api
from tests.test_failover import described, leader, order, orders_present, runs_of, wait_redundant

RELS = {
    (5, 16400): "orders.orders",
    (5, 16401): "orders.tx_decisions",
    (6, 16500): "inventory.products",
    (6, 16501): "inventory.stock_movements",
}


def line(rmgr: str, xid: int, lsn: str, desc: str) -> str:
    return (
        f"rmgr: {rmgr:<11} len (rec/tot):     54/    54, tx: {xid:>10}, lsn: {lsn}, "
        f"prev 0/00000000, desc: {desc}"
    )


def heap(xid: int, lsn: str, verb: str, db: int, rel: int) -> str:
    return line("Heap", xid, lsn, f"{verb} off 5 flags 0x00 , blkref #0: rel 1663/{db}/{rel} blk 0")


def commit(xid: int, lsn: str, extra: str = "") -> str:
    return line("Transaction", xid, lsn, f"COMMIT 2026-11-26 14:00:00.5 UTC{extra}")


ORDER_2PC = [  # the shop's own order: stock taken with its movement, prepared, committed
    heap(10, "0/100", "HOT_UPDATE", 6, 16500),
    heap(10, "0/110", "INSERT", 6, 16501),
    line("Transaction", 10, "0/120", "PREPARE gid shop:a:b:inventory: 2026-11-26 14:00:00 UTC"),
    line("Transaction", 0, "0/130", "COMMIT_PREPARED 10: 2026-11-26 14:00:00 UTC"),
]


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (ORDER_2PC, None),
        # an order whose movements' table was dropped since: unknown to the catalog, still not
        # a stock change outside an order
        (
            [
                heap(20, "0/1", "UPDATE", 6, 16500),
                heap(20, "0/2", "INSERT", 6, 16777),
                commit(20, "0/3"),
            ],
            None,
        ),
        (
            [*ORDER_2PC, heap(11, "0/200", "DELETE", 5, 16400), commit(11, "0/210")],
            ("0/210", "DELETE from orders.orders"),
        ),
        (
            [
                heap(12, "0/200", "DELETE", 6, 16501),
                line("Transaction", 12, "0/210", "ABORT 2026-11-26 14:00:00 UTC"),
            ],
            None,
        ),
        (
            [heap(13, "0/200", "UPDATE", 6, 16500), commit(13, "0/210")],
            ("0/210", "UPDATE of products without a stock movement"),
        ),
        (
            [heap(14, "0/200", "UPDATE", 5, 16400), commit(14, "0/210")],
            ("0/210", "UPDATE in place of orders.orders"),
        ),
        (
            [commit(15, "0/210", "; rels: base/6/16501; inval msgs: catcache 1")],
            ("0/210", "DROP or TRUNCATE of inventory.stock_movements"),
        ),
        ([commit(16, "0/210", "; rels: base/9/16501")], None),  # another database's table
        (
            [heap(18, "0/200", "DELETE", 6, 16501), commit(17, "0/210", "; subxacts: 18")],
            ("0/210", "DELETE from inventory.stock_movements"),
        ),
        (
            [
                heap(19, "0/200", "DELETE", 5, 16400),
                commit(19, "0/210"),
                line("XLOG", 0, "0/220", f"RESTORE_POINT {restore_point.MARKER}"),
            ],
            None,
        ),
    ],
)
def test_the_first_damaging_commit_is_found_in_the_decoded_wal(
    records: list[str], expected: tuple[str, str] | None
) -> None:
    damage = restore_point.first_damage(records, RELS, {"orders": 5, "inventory": 6})
    assert (damage and (damage.commit_lsn, damage.what)) == expected


def test_a_timeline_history_splits_the_wal_to_decode(tmp_path: Path) -> None:
    (tmp_path / "00000002.history").write_text("1\t0/3000160\tno recovery target specified\n")
    start, end = restore_point.lsn_value("0/1000028"), restore_point.lsn_value("0/5000000")
    assert restore_point.timeline_ranges(tmp_path, start, end, 2) == [
        (1, start, restore_point.lsn_value("0/3000160")),
        (2, restore_point.lsn_value("0/3000160"), end),
    ]


def test_a_recovery_across_a_timeline_switch_gets_the_old_timelines_wal_in_pg_wal(
    tmp_path: Path,
) -> None:
    # A backup on timeline 1, a failover to timeline 2 inside segment 5, then timeline 3: the
    # two-phase state prepared before each switch is read from pg_wal by its old name.
    archive, backup, dest = tmp_path / "archive", tmp_path / "backup", tmp_path / "dest"
    for path in (archive, backup, dest / "pg_wal"):
        path.mkdir(parents=True)
    (backup / "backup_label").write_text(
        "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\n"
    )
    (archive / "00000002.history").write_text("1\t0/500E0A0\tno recovery target specified\n")
    (archive / "00000003.history").write_text(
        "1\t0/500E0A0\tno recovery target specified\n2\t0/7000100\tno recovery target\n"
    )
    for name in (
        "000000010000000000000003", "000000010000000000000004", "000000010000000000000005",
        "000000010000000000000006", "000000020000000000000005", "000000020000000000000006",
        "000000020000000000000007", "000000030000000000000007",
        "000000010000000000000005.partial",
    ):  # fmt: skip
        with (archive / name).open("wb") as fh:
            fh.write(name.encode())  # which file it was, to see what went where
            fh.truncate(16 * 1024 * 1024)  # sparse: a segment's size, no disk
    kept = pitr.keep_ancestor_wal(dest, backup, archive)
    assert kept == [
        "000000010000000000000004",
        "000000010000000000000005",
        "000000020000000000000005",
        "000000020000000000000006",
        "000000020000000000000007",
    ]
    assert sorted(p.name for p in (dest / "pg_wal").iterdir()) == kept

    def came_from(name: str) -> str:
        return (dest / "pg_wal" / name).read_bytes()[:24].decode()

    # A switch's segment comes from the child timeline: the old one's may go on past the
    # switch with writes the switch discarded.
    assert came_from("000000010000000000000004") == "000000010000000000000004"
    assert came_from("000000010000000000000005") == "000000020000000000000005"
    assert came_from("000000020000000000000007") == "000000030000000000000007"
    # Nothing to keep on a cluster that never switched timelines.
    for history in archive.glob("*.history"):
        history.unlink()
    assert pitr.keep_ancestor_wal(dest, backup, archive) == []


# -- on a stack of its own, under load -------------------------------------------------------
@pytest.fixture(scope="module")
def rs() -> Iterator[Stack]:
    overrides = {"restore-damaged-data": {"cooldown_s": 1, "max_runs": 50}}
    with stack_of_its_own(
        "shop-restore", products=50, stock=1_000_000, policy_overrides=overrides
    ) as lab:
        yield lab


@pytest.fixture(scope="module")
def rs_api(rs: Stack) -> Api:
    return Api(rs)


@contextlib.contextmanager
def under_load(stack: Stack) -> Iterator[LoadResult]:
    """Three clients ordering until the block ends; the result fills in as it ends."""
    stop = threading.Event()
    result = LoadResult(duration_s=0)

    def load() -> None:
        done = run_order_load(
            described(stack)["shop"]["instances"],
            clients=3,
            duration_s=900,
            product_ids=list(range(1, 51)),
            think_s=0.02,
            stop=stop,
        )
        result.acknowledged.extend(done.acknowledged)
        result.statuses.update(done.statuses)

    loader = threading.Thread(target=load)
    loader.start()
    wait_until(lambda: order(stack).status_code == 201, timeout_s=30, what="orders flowing")
    try:
        yield result
    finally:
        stop.set()
        loader.join(timeout=60)


def last_run_id(api: Api) -> int:
    return max((int(r["id"]) for r in runs_of(api, "restore")), default=0)


def approve_next_restore(api: Api, after_id: int) -> dict[str, Any]:
    """Approve the restore the damage calls for; the finished run, its audit as `audit`."""

    def awaiting() -> dict[str, Any] | None:
        return next(
            (
                r
                for r in runs_of(api, "restore")
                if r["state"] == "awaiting_approval" and r["id"] > after_id
            ),
            None,
        )

    wait_until(lambda: awaiting() is not None, timeout_s=120, what="a restore awaiting approval")
    run = awaiting()
    assert run is not None
    assert api.post(f"/actions/{run['id']}/approve", {}).status_code == 202
    return finished(api, run["id"])


def finished(api: Api, run_id: int) -> dict[str, Any]:
    wait_until(
        lambda: api.get(f"/actions/{run_id}")["state"] in ("succeeded", "failed", "skipped"),
        timeout_s=400,
        what="the restore finished",
    )
    done: dict[str, Any] = api.get(f"/actions/{run_id}")
    return done


def output_of(run: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = next(a for a in run["audit"] if a["verb"] == "output")
    return entry


def invariants_hold(stack: Stack) -> bool:
    name = leader(stack)
    assert name is not None
    return invariants.check(
        stack.dsn(name, "orders"), stack.dsn(name, "inventory"), timeout_s=10
    ).is_sound


def settle(stack: Stack, load: LoadResult) -> None:
    wait_until(lambda: invariants_hold(stack), timeout_s=60, what="the invariants holding")
    acknowledged = list(load.acknowledged)
    assert len(acknowledged) > 20, load.statuses
    assert set(orders_present(stack, acknowledged)) == set(acknowledged)


def ready(stack: Stack) -> None:
    wait_redundant(stack)
    with_a_backup(stack)


def repaired_under_load(stack: Stack, api: Api, damage: str, db: str) -> dict[str, Any]:
    """Damage the data while three clients order, approve the restore at once, keep ordering
    through it; every acknowledged order must be there after, and the invariants hold."""
    ready(stack)
    before = last_run_id(api)
    with under_load(stack) as load:
        wait_until(
            lambda: primary_sql(stack, "orders", "SELECT count(*) FROM orders")[0][0] >= 100,
            timeout_s=60,
            what="100 orders",
        )
        damaged = len(primary_sql(stack, db, damage))
        done = approve_next_restore(api, before)
    assert done["state"] == "succeeded", json.dumps(done, indent=1)[-3000:]
    settle(stack, load)
    report = output_of(done)
    report["damaged"] = damaged
    assert report["data"]["mode"] == "repair"
    assert report["data"]["lost_orders"] == 0
    assert "just before transaction" in report["data"]["restore_point_why"]
    return report


def test_deleted_orders_are_put_back_under_load_from_a_point_proven_in_the_wal(
    rs: Stack, rs_api: Api
) -> None:
    report = repaired_under_load(
        rs,
        rs_api,
        "DELETE FROM orders WHERE id IN (SELECT id FROM orders ORDER BY created_at LIMIT 50)"
        " RETURNING id",
        "orders",
    )
    assert "DELETE from orders.orders" in report["data"]["restore_point_why"]
    assert report["data"]["repair"]["orders.orders"] == "50 rows put back"


def test_deleted_stock_movements_are_put_back_under_load(rs: Stack, rs_api: Api) -> None:
    report = repaired_under_load(
        rs,
        rs_api,
        "DELETE FROM stock_movements WHERE id IN"
        " (SELECT id FROM stock_movements ORDER BY id LIMIT 30) RETURNING id",
        "inventory",
    )
    assert report["data"]["repair"]["inventory.stock_movements"] == "30 rows put back"


def test_deleted_orders_are_put_back_from_a_backup_older_than_a_switchover(
    rs: Stack, rs_api: Api
) -> None:
    # The proof and the repair recover a backup taken before the primary moved: the recovery
    # crosses a timeline switch with two-phase commits prepared just before it.
    ready(rs)
    before = wait_redundant(rs)
    with under_load(rs):
        switched = rs_api.post(
            "/actions",
            {"action": "switchover", "target": "shop-db-cluster", "reason": "test: patching"},
        )
        assert switched.status_code == 202, switched.text
        assert finished(rs_api, switched.json()["id"])["state"] == "succeeded"
    assert wait_redundant(rs) != before
    report = repaired_under_load(
        rs,
        rs_api,
        "DELETE FROM orders WHERE id IN (SELECT id FROM orders ORDER BY created_at DESC"
        " OFFSET 20 LIMIT 40) RETURNING id",
        "orders",
    )
    assert report["data"]["repair"]["orders.orders"] == "40 rows put back"


def test_stock_values_changed_behind_the_ledger_are_set_back_under_load(
    rs: Stack, rs_api: Api
) -> None:
    # A mistaken UPDATE of stock, not an order: the ledger (the initial stock and every order's
    # movement) says what each stock must be, and the repair sets it back, losing nothing.
    report = repaired_under_load(
        rs,
        rs_api,
        "UPDATE products SET stock = stock + 500 WHERE id IN"
        " (SELECT id FROM products ORDER BY id LIMIT 10) RETURNING id",
        "inventory",
    )
    assert report["data"]["repair"]["inventory.products"] == (
        "stock of 10 products set back to their ledger"
    )
    assert "UPDATE of products" in report["data"]["restore_point_why"]


def test_a_dropped_table_is_recreated_under_load_with_every_acknowledged_order(
    rs: Stack, rs_api: Api
) -> None:
    report = repaired_under_load(rs, rs_api, "DROP TABLE stock_movements", "inventory")
    assert report["damaged"] == 0
    assert "DROP or TRUNCATE" in report["data"]["restore_point_why"]
    assert report["data"]["repair"]["inventory.stock_movements"].startswith("recreated with")


def test_damage_only_a_full_restore_undoes_discards_nothing_until_its_loss_is_accepted(
    rs: Stack, rs_api: Api
) -> None:
    ready(rs)
    before = last_run_id(rs_api)
    with under_load(rs) as load:
        primary_sql(
            rs,
            "orders",
            "UPDATE orders SET quantity = quantity + 1 WHERE id IN"
            " (SELECT id FROM orders ORDER BY created_at DESC LIMIT 3)",
        )
        refused = approve_next_restore(rs_api, before)
    # The repair could not undo it: the run escalates, stating the loss; nothing discarded.
    assert refused["state"] == "failed"
    error = refused["output"]["error"]
    assert "Nothing was discarded" in error and "exported to" in error
    present = orders_present(rs, list(load.acknowledged))
    assert set(present) == set(load.acknowledged)
    request = json.loads(error.split("request restore with ")[1])
    export = Path(error.split("exported to ")[1].split(" ")[0])
    assert export.exists()
    # A loss other than the one at the point is refused, and nothing is touched.
    wrong = {**request, "accept_loss": 0}  # orders came in after the point
    run = rs_api.post(
        "/actions",
        {"action": "restore", "target": "shop-db-cluster", "reason": "test", "params": wrong},
    )
    assert run.status_code == 202, run.text
    assert finished(rs_api, run.json()["id"])["state"] == "skipped"
    assert set(orders_present(rs, list(load.acknowledged))) == set(load.acknowledged)
    # The operator accepts the loss now stated (orders stopped): the full restore runs.
    latest = rs_api.post(
        "/actions",
        {"action": "restore", "target": "shop-db-cluster", "reason": "t", "params": request},
    )
    first = finished(rs_api, latest.json()["id"])
    # The loss grew with the orders after the report: refused, then accepted as it now is.
    reason = first["output"].get("precheck", "")
    if first["state"] == "skipped":
        accepted = int(reason.split("discard ")[1].split()[0])
        request["accept_loss"] = accepted
        latest = rs_api.post(
            "/actions",
            {"action": "restore", "target": "shop-db-cluster", "reason": "t", "params": request},
        )
        first = finished(rs_api, latest.json()["id"])
    assert first["state"] == "succeeded", json.dumps(first, indent=1)[-3000:]
    data = output_of(first)["data"]
    assert data["mode"] == "full" and data["lost_orders"] == request["accept_loss"]
    discarded = set(data["lost_order_ids"])
    kept = [o for o in load.acknowledged if o not in discarded]
    assert set(orders_present(rs, kept)) == set(kept)
    exported = json.loads(Path(data["export"]).read_text())
    assert {str(r["id"]) for r in exported["rows"]["orders"]} == discarded
    wait_redundant(rs)
    wait_until(lambda: invariants_hold(rs), timeout_s=60, what="the invariants holding")
    assert order(rs).status_code == 201


@contextlib.contextmanager
def archive_unreadable_while_aside(stack: Stack, node: str) -> Iterator[threading.Event]:
    """From the moment a full restore moves `node`'s data directory aside until it is back, the
    WAL archive cannot be read by PostgreSQL (permission denied, as after a wrong chown or a
    remount): the recovery ends short of its point, as it would in the world. The event is set
    once the archive was taken away."""
    data_dir = Path(described(stack)["components"][node]["data_dir"])
    aside = data_dir.with_name(f"{data_dir.name}.before-restore")
    archive = stack.layout.wal_archive
    mode = stat.S_IMODE(archive.stat().st_mode)
    stop, taken = threading.Event(), threading.Event()

    def watch() -> None:
        while not aside.exists():
            if stop.wait(0.005):
                return
        archive.chmod(0)
        taken.set()
        while aside.exists() and not stop.wait(0.02):
            pass
        archive.chmod(mode)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield taken
    finally:
        stop.set()
        watcher.join(timeout=10)
        archive.chmod(mode)


def identity(stack: Stack, node: str) -> tuple[int, int]:
    """The cluster's system identifier and the timeline it writes on."""
    with stack.connect(node) as conn:
        row = conn.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system()),"
            " (SELECT timeline_id FROM pg_control_checkpoint())"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_a_full_restore_whose_recovery_fails_puts_the_old_data_directory_back(
    rs: Stack, rs_api: Api
) -> None:
    # An operator asks for a full restore to a point before three acknowledged orders and a
    # change in place; when the restored server starts, the WAL archive it needs is unreadable.
    ready(rs)
    name = wait_redundant(rs)
    # The point in a segment of its own: only the archive holds it (an earlier restore's
    # timeline switch puts the segments before it in the recovery's pg_wal).
    primary_sql(rs, "orders", "SELECT pg_switch_wal()")
    point = primary_sql(rs, "orders", "SELECT pg_current_wal_lsn()::text")[0][0]
    after_point = place_orders(rs, 3)
    damaged = primary_sql(
        rs,
        "orders",
        "UPDATE orders SET quantity = quantity + 1 WHERE id IN"
        " (SELECT id FROM orders ORDER BY created_at DESC LIMIT 3) RETURNING id, quantity",
    )
    was = identity(rs, name)
    every_order = {r[0] for r in primary_sql(rs, "orders", "SELECT id::text FROM orders")}
    assert set(after_point) <= every_order
    request = {"full": True, "to": point, "accept_loss": len(after_point)}
    with archive_unreadable_while_aside(rs, name) as taken:
        run = request_full_restore(rs_api, request)
    # The recovery could not reach the point: the run escalates, saying why and what it did.
    assert taken.is_set(), json.dumps(run, indent=1)[-3000:]
    assert run["state"] == "failed", json.dumps(run, indent=1)[-3000:]
    error = run["output"]["error"]
    # The failing recovery is seen either as the server stopping during it, or as the session
    # that waited on it closed under it (which comes first is the machine's timing).
    assert "full restore failed" in error, error
    assert "stopped during recovery" in error or "server closed the connection" in error, error
    assert f"the pre-restore data directory of {name} is back" in error, error
    attempts = [a for a in run["audit"] if a["verb"].startswith("execute")]
    assert len(attempts) == 1 and attempts[0]["data"]["permanent"] is True, attempts  # escalated
    # The cluster is as it was found: the same leader, cluster and timeline, synchronous again,
    # every order there (none discarded), the damage still there (nothing was restored).
    assert wait_redundant(rs) == name
    assert identity(rs, name) == was
    now = {r[0] for r in primary_sql(rs, "orders", "SELECT id::text FROM orders")}
    assert now == every_order
    ids = [row[0] for row in damaged]
    still = primary_sql(rs, "orders", "SELECT id, quantity FROM orders WHERE id = ANY(%s)", ids)
    assert set(still) == set(damaged)
    assert not invariants_hold(rs)
    assert order(rs).status_code == 201


def request_full_restore(api: Api, request: dict[str, Any]) -> dict[str, Any]:
    """The full restore as requested, the loss accepted as it is when it runs (the orders
    taken after the escalation add to it): the finished run."""
    for _ in range(3):
        posted = api.post(
            "/actions",
            {"action": "restore", "target": "shop-db-cluster", "reason": "t", "params": request},
        )
        assert posted.status_code == 202, posted.text
        run = finished(api, posted.json()["id"])
        reason = run["output"].get("precheck", "")
        if run["state"] != "skipped" or "would now discard " not in reason:
            return run
        request = {**request, "accept_loss": int(reason.split("discard ")[1].split()[0])}
    raise AssertionError(f"the loss never settled: {reason}")
