"""Backups on a stack of their own (a restore rewrites the cluster): the scheduled backup and
its drill, the `backup`/`backups`/`restore` commands, retention, and point-in-time restore
after rows are deleted (automatic, approved by an operator) or a table is dropped (CLI), and
a full restore only once an operator accepted the loss it states."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.backups import sync_catalog
from controlplane.cli import open_catalog
from controlplane.config import Settings
from lab.process import wait_until
from lab.stack import Stack
from remediation import pitr
from remediation.base import ActionContext, Check
from remediation.executors.lab import LabExecutor
from remediation.prune_backups import PruneBackups
from tests.conftest import stack_of_its_own
from tests.test_controlplane import Api
from tests.test_failover import (
    leader,
    order,
    orders_present,
    prepared_count,
    runs_of,
    wait_redundant,
)
from tests.test_in_doubt import crash_at


@pytest.fixture(scope="module")
def bk() -> Iterator[Stack]:
    # Several restores within minutes: beyond the lab's guard of 2 an hour, 60 s apart.
    overrides = {"restore-damaged-data": {"cooldown_s": 1, "max_runs": 50}}
    with stack_of_its_own("shop-backup", products=50, policy_overrides=overrides) as lab:
        yield lab


@pytest.fixture(scope="module")
def bk_api(bk: Stack) -> Api:
    return Api(bk)


def cli(stack: Stack, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "web.cli", *args, "--data-dir", str(stack.layout.data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def catalog(stack: Stack) -> list[dict[str, Any]]:
    done = cli(stack, "backups", "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def primary_sql(stack: Stack, db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    name = leader(stack)
    assert name is not None
    with stack.connect(name, db) as conn:
        cur = conn.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


def with_a_backup(stack: Stack) -> None:
    wait_until(lambda: bool(catalog(stack)), timeout_s=180, what="a base backup")


def place_orders(stack: Stack, n: int) -> list[str]:
    ids = []
    for i in range(n):
        response = order(stack, product_id=1 + i % 50)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def invariants_pass_with(api: Api, orders_at_least: int) -> bool:
    probe = api.get("/health")["services"]["shop-db-cluster"]["probes"]["shop-invariants"]
    summary = str(probe.get("summary", ""))
    return probe["health"] == "up" and int(summary.split()[0]) >= orders_at_least


def settled(stack: Stack, api: Api) -> None:
    """Every order so far is older than the probe's settle time and a check has passed."""
    count = int(primary_sql(stack, "orders", "SELECT count(*) FROM orders")[0][0])
    wait_until(
        lambda: invariants_pass_with(api, count),
        timeout_s=60,
        what=f"an invariant check passing over {count} orders",
    )


def test_the_control_plane_takes_and_drills_a_backup_soon_after_start(
    bk: Stack, bk_api: Api
) -> None:
    wait_until(
        lambda: any(r["verified_at"] for r in catalog(bk)), timeout_s=180, what="a verified backup"
    )
    newest = next(r for r in catalog(bk) if r["verified_at"])
    manifest = Path(newest["path"]) / "backup_manifest"
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == newest["checksum"]
    assert newest["drill"]["passed"] is True
    assert "consistent" in newest["drill"]["summary"]
    wait_until(
        lambda: (
            bk_api.get("/health")["services"]["shop-db-backups"]["probes"]["shop-backups"]["health"]
            == "up"
        ),
        timeout_s=60,
        what="the backup probe up",
    )


def test_the_backup_command_reports_progress_and_catalogs_a_verified_backup(bk: Stack) -> None:
    before = {r["label"] for r in catalog(bk)}
    done = cli(bk, "backup")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "pg_basebackup" in done.stdout
    assert "drill passed" in done.stdout
    label = done.stdout.strip().splitlines()[-1]
    assert label not in before
    row = next(r for r in catalog(bk) if r["label"] == label)
    assert row["verified_at"] is not None
    assert row["size_bytes"] > 1_000_000
    listing = cli(bk, "backups")
    assert label in listing.stdout and "verified" in listing.stdout
    assert Api(bk).get("/backups")["backups"] == catalog(bk)  # API clients see the catalog


def take_undrilled(stack: Stack) -> pitr.BackupInfo:
    """A base backup taken as the backup action takes it, without its drill."""
    settings = Settings.load(environ={}, targets_file=stack.targets_file)
    assert settings.backups is not None
    name = leader(stack)
    assert name is not None
    return pitr.take_base_backup(
        LabExecutor(stack.layout.stack_file),
        name,
        settings.backups.nodes[name],
        settings.backups.backups_dir,
    )


def requested(api: Api, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """An operator's run of `action` on the cluster, finished."""
    body = {"action": action, "target": "shop-db-cluster", "reason": "test", "params": params or {}}
    response = api.post("/actions", body)
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    wait_until(
        lambda: api.get(f"/actions/{run_id}")["state"] in ("succeeded", "failed", "skipped"),
        timeout_s=300,
        what=f"the {action} run finished",
    )
    run: dict[str, Any] = api.get(f"/actions/{run_id}")
    return run


def test_a_corrupted_backup_fails_its_drill_and_is_not_verified(bk: Stack, bk_api: Api) -> None:
    info = take_undrilled(bk)
    victim = next(p for p in sorted(Path(info.path, "base").rglob("*")) if p.is_file())
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, other bytes
    run = requested(bk_api, "drill", {"label": info.label})
    assert run["state"] == "failed", run
    assert "verification" in run["output"]["error"], run["output"]
    row = next(r for r in catalog(bk) if r["label"] == info.label)
    assert row["verified_at"] is None and row["drill"]["passed"] is False
    shutil.rmtree(info.path)
    sync_catalog(open_catalog(None, bk.layout.data_dir), bk.layout.backups)


def test_retention_keeps_the_newest_backups_and_prunes_the_wal_only_old_ones_needed(
    bk: Stack,
) -> None:
    while len(catalog(bk)) < 2:
        take_undrilled(bk)
        sync_catalog(open_catalog(None, bk.layout.data_dir), bk.layout.backups)
    rows = catalog(bk)
    newest = rows[0]
    # The retention run's own code, with a tighter policy than the stack's: keep one, of any age.
    policy = Settings.load(environ={}, targets_file=bk.targets_file).policy("backup-retention")
    assert policy is not None
    action = PruneBackups()
    ctx = ActionContext(
        target="shop-db-cluster",
        component=None,
        params={**policy.params, "keep_count": 1, "max_age_s": 0},
        executor=LabExecutor(bk.layout.stack_file),
        is_healthy=lambda: Check.go("n/a"),
    )
    assert action.precheck(ctx).ok
    deleted = action.execute(ctx).data["deleted"]
    assert sorted(deleted) == sorted(r["label"] for r in rows[1:])
    sync_catalog(open_catalog(None, bk.layout.data_dir), bk.layout.backups)
    assert [r["label"] for r in catalog(bk)] == [newest["label"]]
    assert not any(Path(r["path"]).exists() for r in rows[1:])
    start_wal = json.loads((Path(newest["path"]) / "controlplane-backup.json").read_text())[
        "start_wal"
    ]
    segments = [p.name for p in bk.layout.wal_archive.iterdir() if len(p.name) == 24]
    assert segments and min(segments) >= start_wal


def last_restore_id(bk_api: Api) -> int:
    return max((int(r["id"]) for r in runs_of(bk_api, "restore")), default=0)


def approved_restore(bk_api: Api, after_id: int) -> dict[str, Any]:
    """Wait for a restore the damage calls for (a run newer than `after_id`), approve it, and
    return the finished run with its report (the `output` audit entry) as `report`; a failed
    run (it escalated) as it is."""

    def awaiting() -> dict[str, Any] | None:
        return next(
            (
                r
                for r in runs_of(bk_api, "restore")
                if r["state"] == "awaiting_approval" and r["id"] > after_id
            ),
            None,
        )

    wait_until(lambda: awaiting() is not None, timeout_s=90, what="a restore awaiting approval")
    run = awaiting()
    assert run is not None
    assert bk_api.post(f"/actions/{run['id']}/approve", {}).status_code == 202
    wait_until(
        lambda: bk_api.get(f"/actions/{run['id']}")["state"] in ("succeeded", "failed"),
        timeout_s=300,
        what="the restore finished",
    )
    done: dict[str, Any] = bk_api.get(f"/actions/{run['id']}")
    if done["state"] == "failed":
        return done
    assert done["state"] == "succeeded", json.dumps(done, indent=1)[-3000:]
    done["report"] = next(a for a in done["audit"] if a["verb"] == "output")
    return done


def test_deleted_order_rows_are_put_back_after_approval_keeping_every_later_order(
    bk: Stack, bk_api: Api
) -> None:
    wait_redundant(bk)
    with_a_backup(bk)
    good = place_orders(bk, 10)
    settled(bk, bk_api)
    victims = good[:4]
    before = last_restore_id(bk_api)
    primary_sql(bk, "orders", "DELETE FROM orders WHERE id::text = ANY(%s)", victims)
    late = place_orders(bk, 3)  # after the last good point: a full restore would lose these
    # Prometheus alerts on the same failure (the control plane's cp_probe_up metric); the
    # alert keeps the probe's label, so it meets the same restore policy.
    wait_until(
        lambda: any(
            i["kind"] == "ShopDataInvariantsViolated" and i["source"] == "alert"
            for i in bk_api.get("/incidents?limit=500")["incidents"]
        ),
        timeout_s=90,
        what="the ShopDataInvariantsViolated alert's incident",
    )
    done = approved_restore(bk_api, before)
    assert done["state"] == "succeeded", json.dumps(done, indent=1)[-3000:]
    report = done["report"]
    assert report["data"]["mode"] == "repair"
    assert report["data"]["repair"]["orders.orders"] == "4 rows put back"
    assert set(orders_present(bk, good + late)) == set(good + late)  # back, and none lost
    assert report["data"]["lost_orders"] == 0
    incident = bk_api.get(f"/incidents/{done['incident_id']}")
    assert any("0 orders lost" in e["message"] for e in incident["timeline"])
    # The alert's incident met the restore policy too, yet only one restore ran: the other
    # request awaits approval until its incident resolves, and is then dropped.
    assert [r["state"] for r in runs_of(bk_api, "restore")].count("succeeded") == 1
    wait_until(
        lambda: not any(r["state"] == "awaiting_approval" for r in runs_of(bk_api, "restore")),
        timeout_s=90,
        what="no restore left awaiting approval",
    )
    wait_redundant(bk)
    assert order(bk).status_code == 201


def test_a_dropped_table_is_recreated_from_a_scratch_restore_with_its_rows(
    bk: Stack, bk_api: Api
) -> None:
    wait_redundant(bk)
    with_a_backup(bk)
    kept = place_orders(bk, 5)
    settled(bk, bk_api)
    movements = primary_sql(bk, "inventory", "SELECT count(*) FROM stock_movements")[0][0]
    before = last_restore_id(bk_api)
    primary_sql(bk, "inventory", "DROP TABLE stock_movements")
    assert order(bk).status_code != 201
    report = approved_restore(bk_api, before)["report"]
    assert report["data"]["mode"] == "repair"
    assert report["data"]["repair"]["inventory.stock_movements"] == (
        f"recreated with {movements} rows"
    )
    assert set(orders_present(bk, kept)) == set(kept)
    wait_until(lambda: order(bk).status_code == 201, timeout_s=30, what="orders flowing")


def full_restore(bk_api: Api, params: dict[str, Any]) -> dict[str, Any]:
    """An operator's full restore (its own request, stating the loss it accepts), finished."""
    body = {
        "action": "restore",
        "target": "shop-db-cluster",
        "reason": "accepted",
        "params": params,
    }
    response = bk_api.post("/actions", {**body, "params": {**params, "full": True}})
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    wait_until(
        lambda: bk_api.get(f"/actions/{run_id}")["state"] in ("succeeded", "failed", "skipped"),
        timeout_s=400,
        what="the full restore finished",
    )
    done: dict[str, Any] = bk_api.get(f"/actions/{run_id}")
    assert done["state"] == "succeeded", json.dumps(done, indent=1)[-3000:]
    done["report"] = next(a for a in done["audit"] if a["verb"] == "output")
    return done


def test_damage_a_repair_cannot_undo_is_restored_in_full_only_once_its_loss_is_accepted(
    bk: Stack, bk_api: Api
) -> None:
    wait_redundant(bk)
    with_a_backup(bk)
    good = place_orders(bk, 5)
    settled(bk, bk_api)
    # Changed in place, not lost: no copy of lost rows can undo it.
    before = last_restore_id(bk_api)
    primary_sql(bk, "orders", "UPDATE orders SET quantity = 7 WHERE id::text = %s", good[0])
    late = place_orders(bk, 3)
    refused = approved_restore(bk_api, before)  # escalates, stating the loss
    assert refused["state"] == "failed"
    error = refused["output"]["error"]
    assert "Nothing was discarded" in error
    assert set(orders_present(bk, good + late)) == set(good + late)
    assert all(o in error for o in late[:2]) and "exported to" in error
    request = json.loads(error.split("request restore with ")[1])
    assert request["accept_loss"] == len(late)
    report = full_restore(bk_api, request)["report"]
    assert report["data"]["mode"] == "full"
    quantity = primary_sql(bk, "orders", "SELECT quantity FROM orders WHERE id::text = %s", good[0])
    assert quantity == [(1,)]
    assert set(orders_present(bk, good)) == set(good)
    assert orders_present(bk, late) == {}  # written after the point: gone, as accepted
    assert set(report["data"]["lost_order_ids"]) == set(late)
    exported = json.loads(Path(report["data"]["export"]).read_text())
    assert {r["id"] for r in exported["rows"]["orders"]} == set(late)  # and exported
    assert f"discarded {len(late)} acknowledged orders" in report["message"]
    wait_redundant(bk)
    assert order(bk).status_code == 201


def test_a_dropped_table_is_restored_by_the_restore_command_to_a_time_before_the_drop(
    bk: Stack, bk_api: Api
) -> None:
    wait_redundant(bk)
    with_a_backup(bk)
    kept = place_orders(bk, 5)
    settled(bk, bk_api)
    before_drop = primary_sql(bk, "inventory", "SELECT now()")[0][0]
    time.sleep(0.5)  # the drop must be strictly after the restore point
    primary_sql(bk, "inventory", "DROP TABLE stock_movements")
    assert order(bk).status_code != 201
    done = cli(bk, "restore", "--to", before_drop.isoformat(), timeout_s=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restore verified" in done.stdout
    assert "output: repaired in place" in done.stdout  # proven, and nothing written lost
    assert primary_sql(bk, "inventory", "SELECT to_regclass('stock_movements')")[0][0]
    assert set(orders_present(bk, kept)) == set(kept)
    wait_redundant(bk)
    assert order(bk).status_code == 201


def test_a_restore_to_before_every_backup_is_refused_with_a_clear_error(bk: Stack) -> None:
    done = cli(bk, "restore", "--to", "2001-01-01T00:00:00Z", "--timeout-s", "60")
    assert done.returncode != 0
    assert "no base backup finished before" in done.stdout + done.stderr


def test_a_restore_finishes_the_two_phase_commits_it_brings_back_prepared(
    bk: Stack, bk_api: Api
) -> None:
    wait_redundant(bk)
    with_a_backup(bk)
    crash_at(bk, "after_both_prepares", product=7, index=90)  # no decision: must roll back
    assert prepared_count(bk) == 2
    point = primary_sql(bk, "postgres", "SELECT now()")[0][0]
    report = full_restore(bk_api, {"to": point.isoformat(), "accept_loss": 0})["report"]
    assert "in doubt: committed 0, rolled back 2" in report["message"]
    assert prepared_count(bk) == 0
    assert order(bk, product_id=7).status_code == 201  # its row lock went with it
