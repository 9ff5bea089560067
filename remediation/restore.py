"""Restore: point-in-time recovery of the whole PostgreSQL cluster after data damage (rows
deleted, a table dropped), to the latest point known good, then the standby rebuilt, the
caches flushed, and the loss measured: the orders written after the restore point.

Both shop databases live in the one cluster, so a restore keeps them consistent with each
other (and with the 2PC decision log). The restore point is the operator's `to`, else the
start of the last passing invariant check before the incident (`ActionContext.last_good_at`).
Approval is the default mode for this action: it discards every write after that point."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from pgcluster import invariants
from pgcluster.nodes import leader_of
from remediation import pg_ops, pitr, repair
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params
from remediation.cache_flush import CacheFlush
from remediation.executors.base import ExecutorError
from remediation.in_doubt import InDoubt

logger = logging.getLogger(__name__)


class RestoreParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=1)
    backups_dir: str
    archive_dir: str
    to: datetime | None = None  # the operator's restore point (aware); else the last good
    orders_db: str = "orders"
    inventory_db: str = "inventory"
    cache: dict[str, Any] | None = None  # cache_flush params, to drop what the damage cached
    restore_timeout_s: float = Field(default=600, gt=0)
    # Repair in place first (incident runs only; an operator's `to` is a full restore): a
    # scratch instance restored to the point, the append-only tables' losses copied back.
    scratch_dir: str | None = None
    repair_tables: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "orders": ["orders", "tx_decisions"],
            "inventory": ["stock_movements"],
        }
    )
    settle_s: float = Field(default=10, ge=0)  # as the invariant probe: rows still in 2PC
    archive_timeout_s: float = Field(default=30, gt=0)


def params_of(ctx: ActionContext) -> RestoreParams:
    p = parse_params(RestoreParams, ctx, "restore")
    if p.to is not None and p.to.tzinfo is None:
        raise ActionError(
            "restore: `to` needs a time zone (e.g. 2026-11-25T13:00:00Z)", permanent=True
        )
    return p


def restore_point(ctx: ActionContext, p: RestoreParams) -> datetime:
    point = p.to or ctx.last_good_at
    if point is None:
        raise ActionError("no restore point: no passing check is known; give `to`", permanent=True)
    return point


def written_after(dsn: str, point: datetime, p: RestoreParams) -> set[str] | None:
    """Order ids written after `point`, from whichever of the orders and their stock
    movements can still be read (a dropped table hides its side); None if neither."""
    found: set[str] = set()
    readable = False
    for db, sql in (
        (p.orders_db, "SELECT id::text FROM orders WHERE created_at >= %s"),
        (p.inventory_db, "SELECT order_id::text FROM stock_movements WHERE created_at >= %s"),
    ):
        try:
            with pg_ops.connect(pitr.dsn_with(dsn, dbname=db)) as conn:
                found |= {str(r[0]) for r in conn.execute(sql, (point,)).fetchall()}
                readable = True
        except (ActionError, psycopg.Error) as exc:
            logger.warning("cannot read %s for the loss report: %s", db, exc)
    return found if readable else None


def still_present(dsn: str, ids: set[str], p: RestoreParams) -> set[str]:
    if not ids:
        return set()
    with pg_ops.connect(pitr.dsn_with(dsn, dbname=p.orders_db)) as conn:
        rows = conn.execute(
            "SELECT id::text FROM orders WHERE id::text = ANY(%s)", (list(ids),)
        ).fetchall()
    return {str(r[0]) for r in rows}


def archive_current_wal(dsn: str, timeout_s: float) -> str | None:
    """Close the leader's current WAL segment and wait until it is archived, so that recovery
    can reach a point inside it. None when the leader cannot be asked (then the archive
    holds what it holds)."""
    try:
        with pg_ops.connect(dsn) as conn:
            # Recovery to a time stops at the first commit after it, and fails outright if
            # the WAL ends first: this commit (an xid assigned is a commit record) marks "now".
            conn.execute("SELECT txid_current()")
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            assert row is not None
            segment = str(row[0])

            def archived() -> bool:
                done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
                return done is not None and done[0] is not None and str(done[0]) >= segment

            pg_ops.wait_for(archived, timeout_s, f"WAL segment {segment} archived")
            return segment
    except (ActionError, psycopg.Error) as exc:
        logger.warning("could not archive the current WAL segment: %s", exc)
        return None


class Restore(Action):
    kind = "restore"

    def precheck(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        point = restore_point(ctx, p)
        if point >= datetime.now(UTC):
            raise ActionError(
                f"restore point {point.isoformat()} is not in the past", permanent=True
            )
        backup = pitr.backup_for(Path(p.backups_dir), point)
        if p.to is None:  # an incident's restore: the data must be damaged, not out of reach
            leader = leader_of(pg_ops.views(p.nodes))
            if leader is None:
                return Check(False, "no writable primary: a failover's job, not a restore's")
            verdict = self._verdict(p, p.nodes[leader.name])
            if not verdict.readable:
                return Check(False, f"cannot read the data ({verdict.error}): not a restore")
            if verdict.is_sound:
                return Check(False, "the data is sound: nothing to restore")
            damage = "; ".join(verdict.problems)
            return Check(True, f"{damage}: restore {backup.label} to {point.isoformat()}")
        return Check(True, f"restore {backup.label} to {point.isoformat()}")

    @staticmethod
    def _verdict(p: RestoreParams, dsn: str) -> invariants.Verdict:
        return invariants.check(
            pitr.dsn_with(dsn, dbname=p.orders_db),
            pitr.dsn_with(dsn, dbname=p.inventory_db),
            settle_s=p.settle_s,
            timeout_s=10,
        )

    def execute(self, ctx: ActionContext) -> Outcome:
        p = params_of(ctx)
        point = restore_point(ctx, p)
        backup = pitr.backup_for(Path(p.backups_dir), point)
        views = pg_ops.views(p.nodes)
        leader = leader_of(views)
        target = leader.name if leader else next(iter(p.nodes))
        timings: dict[str, float] = {}
        started = time.monotonic()
        # Verified before any use, a repair's scratch copy included (its rows go live).
        pitr.check_backup(ctx.executor, target, backup)
        timings["verify_backup_s"] = pitr.elapsed_since(started)
        tried = ""
        if p.to is None and p.scratch_dir and leader is not None:
            try:
                return self._repair(ctx, p, point, backup, leader.name)
            except ActionError as exc:
                tried = f"a repair in place did not do ({exc}); "
                logger.warning("repair in place failed, restoring in full: %s", exc)
        before = written_after(p.nodes[target], point, p) if leader else None
        segment = archive_current_wal(p.nodes[target], p.archive_timeout_s) if leader else None
        # From here every write since `point` is being discarded: no node may take one.
        ctx.executor.set_fact(pg_ops.SYNCHRONOUS, False)
        for view in views:
            try:
                ctx.executor.stop(view.name)
            except ExecutorError:
                ctx.executor.fence(view.name)
        step = time.monotonic()
        data_dir = Path(ctx.executor.data_dir(target))
        pitr.prepare_recovery(ctx.executor, target, data_dir, backup, Path(p.archive_dir), point)
        timings["copy_s"] = pitr.elapsed_since(step)
        step = time.monotonic()
        ctx.executor.restart(target)
        ctx.executor.set_role(target, "primary")
        pitr.wait_promoted(
            p.nodes[target], p.restore_timeout_s, alive=lambda: ctx.executor.is_running(target)
        )
        pitr.reset_recovery_settings(p.nodes[target])
        # Recovery stops before the first commit after the point, not before a PREPARE: a
        # two-phase commit in flight then is restored prepared, its coordinator gone (every
        # session died with the stop), its row locks held. Finish it now, by the decision log.
        in_doubt = self._resolve_in_doubt(ctx, p, p.nodes[target])
        timings["recover_s"] = pitr.elapsed_since(step)
        timings["writable_after_s"] = pitr.elapsed_since(started)
        lost = sorted(before - still_present(p.nodes[target], before, p)) if before else []
        step = time.monotonic()
        new_leader = leader_of(pg_ops.views({target: p.nodes[target]}))
        if new_leader is None:
            raise ActionError(f"{target} is not a writable leader after the restore")
        rebuilt = [
            f"{name}: "
            + pg_ops.rejoin(ctx.executor, name, new_leader, p.nodes, timeout_s=p.restore_timeout_s)
            for name in p.nodes
            if name != target
        ]
        if rebuilt:
            pg_ops.restore_sync(ctx.executor, target, p.nodes[target], p.restore_timeout_s)
        timings["standby_s"] = pitr.elapsed_since(step)
        flushed = self._flush_caches(ctx, p)
        timings["total_s"] = pitr.elapsed_since(started)
        loss = (
            f"{len(lost)} orders written after the restore point are gone"
            if before is not None
            else "loss unknown (neither orders nor stock movements were readable)"
        )
        return Outcome(
            f"{tried}restored {target} from {backup.label} to {point.isoformat()}: {loss}; "
            f"writable after {timings['writable_after_s']:.1f}s; "
            f"in doubt: {in_doubt}; standby: {'; '.join(rebuilt) or 'none'}; caches: {flushed}",
            {
                "restore_point": point.isoformat(),
                "backup": backup.label,
                "node": target,
                "archived_segment": segment,
                "lost_orders": len(lost) if before is not None else None,
                "lost_order_ids": lost[:100],
                "standby": rebuilt,
                "timings": timings,
                "mode": "full",
            },
        )

    def _repair(
        self,
        ctx: ActionContext,
        p: RestoreParams,
        point: datetime,
        backup: pitr.BackupInfo,
        node: str,
    ) -> Outcome:
        """Scratch instance at `point`, losses of the append-only tables copied back, then the
        invariants must pass as the control plane's probes see them; else ActionError."""
        started = time.monotonic()
        assert p.scratch_dir is not None
        work_dir = Path(p.scratch_dir)
        dsn = p.nodes[node]
        if archive_current_wal(dsn, p.archive_timeout_s) is None:
            raise ActionError("the WAL up to the point could not be archived")
        scratch = pitr.start_scratch(
            ctx.executor,
            node,
            dsn,
            backup,
            Path(p.archive_dir),
            work_dir / f"repair-{backup.label}",
            pitr.free_port(),
            timeout_s=p.restore_timeout_s,
            target=point,
        )
        report: dict[str, str] = {}
        try:
            for db, tables in p.repair_tables.items():
                done = repair.repair_tables(
                    ctx.executor,
                    node,
                    pitr.dsn_with(scratch.dsn, dbname=db),
                    pitr.dsn_with(dsn, dbname=db),
                    tables,
                    work_dir,
                )
                report.update({f"{db}.{table}": what for table, what in done.items()})
        finally:
            pitr.stop_scratch(ctx.executor, scratch)
        verdict = self._verdict(p, dsn)
        if not verdict.is_sound:
            problems = "; ".join(verdict.problems) or verdict.error
            raise ActionError(f"after {report} the invariants still fail: {problems}")
        flushed = self._flush_caches(ctx, p)
        seconds = pitr.elapsed_since(started)
        what = ", ".join(f"{t}: {w}" for t, w in report.items())
        return Outcome(
            f"repaired in place from {backup.label} restored to {point.isoformat()} in a "
            f"scratch instance ({what}): 0 orders lost, every write since kept; "
            f"{seconds:.1f}s; caches: {flushed}",
            {
                "restore_point": point.isoformat(),
                "backup": backup.label,
                "node": node,
                "mode": "repair",
                "repair": report,
                "lost_orders": 0,
                "lost_order_ids": [],
                "timings": {"total_s": seconds, "writable_after_s": 0.0},
            },
        )

    @staticmethod
    def _resolve_in_doubt(ctx: ActionContext, p: RestoreParams, dsn: str) -> str:
        params = {
            "orders_dsn": pitr.dsn_with(dsn, dbname=p.orders_db),
            "inventory_dsn": pitr.dsn_with(dsn, dbname=p.inventory_db),
            "min_age_s": 0,
        }
        return InDoubt().execute(replace(ctx, component=None, params=params)).summary

    @staticmethod
    def _flush_caches(ctx: ActionContext, p: RestoreParams) -> str:
        if p.cache is None:
            return "none configured"
        try:
            return CacheFlush().execute(replace(ctx, component=None, params=p.cache)).summary
        except ActionError as exc:  # the restore stands; a stale cache expires by its TTL
            return f"flush failed ({exc})"

    def verify(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes))
        if leader is None:
            return Check(False, "no writable leader")
        if len(p.nodes) > 1 and not leader.sync_standbys:
            return Check(False, f"{leader.name} has no synchronous standby yet")
        try:
            pg_ops.commit_a_write(p.nodes[leader.name])
        except ActionError as exc:
            return Check(False, str(exc))
        health = ctx.is_healthy()
        return health if not health.ok else Check(True, f"{leader.name} restored; {health.reason}")
