"""Restore after data damage (rows deleted, a table dropped, values changed in place), never
making things worse: a restore point taken from the data, proven before anything is touched,
a repair in place that keeps every later write, and a full restore only when an operator
accepted its exact loss.

1. The point: the operator's `to` (a time or an LSN), else just before the commit of the first
   damaging transaction in the WAL archive (`restore_point`), searched from the newest backup
   back. A scratch instance restored to it must pass the invariants: the point is proven.
2. The repair: what the append-only tables lost is copied back from that copy (a dropped table
   recreated); the live invariants must then pass. Nothing written since is touched.
3. If they still fail, the run fails (escalates) stating what a full restore to the point
   would discard (orders, ids, total), with those rows exported and a command to re-apply them.
   The full restore is a separate request, `{"full": true, "to": <point>, "accept_loss": N}`,
   refused unless the loss at the point is still N. It keeps the data directory it replaces
   aside until the restored cluster passes its checks, and puts it back if it does not."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgcluster.nodes import leader_of
from remediation import full_restore, pg_ops, pitr, repair, restore_export, restore_point
from remediation.base import Action, ActionContext, ActionError, Check, Outcome
from remediation.cache_flush import CacheFlush
from remediation.restore_model import (
    Point,
    Proof,
    RestoreOperatorParams,
    RestoreParams,
    dbs,
    params_of,
    verdict_of,
)

logger = logging.getLogger(__name__)


def archive_current_wal(dsn: str, timeout_s: float) -> str:
    """Close the leader's current WAL segment and wait until it is archived; returns where the
    archive now ends (an LSN): the search for damage and the recovery both read up to it."""
    with pg_ops.connect(dsn) as conn:
        # The marker needs no standby: with none streaming (being rebuilt, say), a synchronous
        # commit would wait for one forever and hold the whole restore.
        conn.execute("SET synchronous_commit = local")
        conn.execute("SELECT txid_current()")  # a commit record marks "now"
        row = conn.execute(
            "SELECT lsn::text, pg_walfile_name(lsn - 1) FROM pg_switch_wal() AS lsn"
        ).fetchone()
        assert row is not None
        end, segment = str(row[0]), str(row[1])

        def archived() -> bool:
            done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
            return done is not None and done[0] is not None and str(done[0])[8:] >= segment[8:]

        pg_ops.wait_for(archived, timeout_s, f"WAL segment {segment} archived")
        return end


def choose_point(ctx: ActionContext, p: RestoreParams, node: str, end: str) -> Point:
    backups = pitr.list_backups(Path(p.backups_dir))
    if isinstance(p.to, datetime):
        return Point(p.to, pitr.backup_for(Path(p.backups_dir), p.to), "the operator's time")
    if isinstance(p.to, str):
        to = restore_point.lsn_value(p.to)
        usable = [b for b in backups if restore_point.lsn_value(pitr.end_lsn_of(b)) < to]
        if not usable:
            raise ActionError(f"no base backup ends before {p.to}", permanent=True)
        return Point(p.to, usable[-1], "the operator's LSN")
    conns = dbs(p, p.nodes[node])
    for backup in reversed(backups):  # newest first: the least WAL to decode
        start = restore_point.backup_start_lsn(Path(backup.path))
        damage = restore_point.find_damage(
            ctx.executor, node, conns, Path(p.archive_dir), start, end
        )
        if damage is None:
            continue  # older than this backup, or in no WAL: an older backup may hold it
        if restore_point.lsn_value(damage.commit_lsn) > restore_point.lsn_value(
            pitr.end_lsn_of(backup)
        ):
            why = (
                f"just before transaction {damage.xid} ({damage.what}, committed "
                f"{damage.committed_at.isoformat()})"
            )
            return Point(damage.commit_lsn, backup, why)
    raise ActionError(
        "no damaging transaction found in the WAL archive since the oldest backup: give `to`",
        permanent=True,
    )


class Restore(Action):
    kind = "restore"
    needs = frozenset({"executor"})
    Params = RestoreParams
    OperatorParams = RestoreOperatorParams

    def __init__(self) -> None:
        super().__init__()
        # A full restore's proof, from this run's precheck to its execute (the engine runs one
        # right after the other, on one instance per run): its scratch instance is kept running
        # so that execute measures the loss again in it, instead of proving the point twice.
        self._proven: tuple[Proof, pitr.Scratch, str] | None = None

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = RestoreParams.model_validate(dict(params))
        point = (
            p.to.isoformat() if isinstance(p.to, datetime) else p.to
        ) or "just before the first damaging commit found in the WAL archive"
        if p.full:
            return [
                f"restore into a scratch instance to {point} and prove it passes the invariants",
                f"refuse unless a full restore to it still discards exactly {p.accept_loss} "
                "order(s)",
                "export the orders it discards, with a command to re-apply them",
                "replace the cluster's data with the restored copy, the old data directory "
                "kept aside until the new one passes its checks (put back if it does not)",
                "write outage: the whole restore",
            ]
        return [
            "check that there is a writable primary and that the data is damaged (else: skipped)",
            f"restore into a scratch instance to {point} and prove it passes the invariants",
            "copy back what the damaged tables lost from that copy; every later write is kept",
            "if the invariants still fail: the run fails, stating what a full restore would "
            "discard (a separate request, with the exported rows); nothing is discarded",
        ]

    def precheck(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes))
        if leader is None:
            return Check.not_now("no writable primary: a failover's job, not a restore's")
        verdict = verdict_of(p, p.nodes[leader.name])
        if not verdict.readable:
            return Check.not_now(f"cannot read the data ({verdict.error}): not a restore")
        if isinstance(p.to, datetime) and p.to >= datetime.now(UTC):
            raise ActionError(
                f"restore point {p.to.isoformat()} is not in the past", permanent=True
            )
        if p.to is None and verdict.is_sound:
            return Check.nothing_to_do("the data is sound: nothing to restore")
        if p.full:
            proof, scratch = self._prove_in_scratch(ctx, p, leader.name)
            if proof.loss.count != p.accept_loss:
                pitr.stop_scratch(ctx.executor, scratch)
                return Check.never(
                    f"a full restore to {proof.point.label} would now discard "
                    f"{proof.loss.describe()}, not the {p.accept_loss} accepted: refused",
                )
            self._proven = (proof, scratch, leader.name)
            return Check.go(f"full restore to {proof.point.label}: {proof.loss.describe()}")
        damage = "; ".join(verdict.problems) or "the operator's point"
        return Check.go(f"{damage}: find the point, prove it, repair in place")

    def _proof_now(self, ctx: ActionContext, p: RestoreParams, node: str) -> Proof:
        """The precheck's proof with its loss measured again now (writes kept coming since),
        in the scratch instance it left running; a proof of its own if there is none (a
        second attempt) or the leader changed."""
        proven, self._proven = self._proven, None
        if proven is None:
            return self._prove(ctx, p, node)
        proof, scratch, proven_on = proven
        if proven_on != node:
            pitr.stop_scratch(ctx.executor, scratch)  # first: a new proof takes its place
            return self._prove(ctx, p, node)
        try:
            loss = restore_export.loss_between(dbs(p, p.nodes[node]), dbs(p, scratch.dsn))
        finally:
            pitr.stop_scratch(ctx.executor, scratch)
        restore_export.export(loss, proof.export, proof.point.label)
        return replace(proof, loss=loss)

    def _prove(self, ctx: ActionContext, p: RestoreParams, node: str) -> Proof:
        proof, scratch = self._prove_in_scratch(ctx, p, node)
        pitr.stop_scratch(ctx.executor, scratch)
        return proof

    def _prove_in_scratch(
        self, ctx: ActionContext, p: RestoreParams, node: str
    ) -> tuple[Proof, pitr.Scratch]:
        """Choose the point, restore it into a scratch instance, check the invariants there,
        measure and export what a full restore would discard. The scratch instance is
        returned running (the caller stops it)."""
        dsn = p.nodes[node]
        end = archive_current_wal(dsn, p.archive_timeout_s)
        point = choose_point(ctx, p, node, end)
        pitr.check_backup(ctx.executor, node, point.backup)
        scratch = pitr.start_scratch(
            ctx.executor,
            node,
            dsn,
            point.backup,
            Path(p.archive_dir),
            Path(p.scratch_dir) / f"restore-{point.backup.label}",
            pitr.free_port(),
            timeout_s=p.restore_timeout_s,
            target=point.target,
        )
        try:
            there = verdict_of(p, scratch.dsn)
            if not there.is_sound:
                raise ActionError(
                    f"restore point {point.label} ({point.why}) is not consistent either: "
                    f"{'; '.join(there.problems) or there.error}; nothing was changed",
                    permanent=True,
                )
            loss = restore_export.loss_between(dbs(p, dsn), dbs(p, scratch.dsn))
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            base = Path(p.export_dir) if p.export_dir else Path(p.scratch_dir).parent / "exports"
            path = restore_export.export(loss, base / f"discarded-{stamp}.json", point.label)
            conns = dbs(p, dsn)
            command = restore_export.reapply_command(
                path, conns[p.orders_db], conns[p.inventory_db]
            )
            proof = Proof(point, loss, path, command)
        except BaseException:
            pitr.stop_scratch(ctx.executor, scratch)
            raise
        return proof, scratch

    def execute(self, ctx: ActionContext) -> Outcome:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes))
        if leader is None:
            raise ActionError("no writable leader to restore")
        if p.full:
            proof = self._proof_now(ctx, p, leader.name)
            if proof.loss.count != p.accept_loss:
                raise ActionError(
                    f"the loss changed: {proof.loss.describe()}, {p.accept_loss} accepted; "
                    "nothing was changed",
                    permanent=True,
                )
            return full_restore.run(ctx, p, proof, leader.name, self._flush_caches)
        return self._repair(ctx, p, leader.name)

    def _repair(self, ctx: ActionContext, p: RestoreParams, node: str) -> Outcome:
        started = time.monotonic()
        dsn = p.nodes[node]
        proof, scratch = self._prove_in_scratch(ctx, p, node)
        report: dict[str, str] = {}
        try:
            for db, tables in p.repair_tables.items():
                done = repair.repair_tables(
                    ctx.executor,
                    node,
                    pitr.dsn_with(scratch.dsn, dbname=db),
                    pitr.dsn_with(dsn, dbname=db),
                    tables,
                    Path(p.scratch_dir),
                )
                report.update({f"{db}.{table}": what for table, what in done.items()})
        finally:
            pitr.stop_scratch(ctx.executor, scratch)
        # The ledgers are whole again: stock changed behind them is set back to their sums.
        rebalanced = repair.rebalance_stock(pitr.dsn_with(dsn, dbname=p.inventory_db))
        if rebalanced:
            report[f"{p.inventory_db}.products"] = (
                f"stock of {len(rebalanced)} products set back to their ledger"
            )
        point = proof.point
        verdict = verdict_of(p, dsn)
        what = ", ".join(f"{t}: {w}" for t, w in report.items())
        if not verdict.is_sound:
            raise ActionError(
                f"repaired from the proven point {point.label} ({point.why}): {what}; the "
                f"invariants still fail ({'; '.join(verdict.problems) or verdict.error}). A full "
                f"restore to that point would discard {proof.loss.describe()}; they are "
                f"exported to {proof.export} (re-apply: {proof.reapply}). Nothing was "
                f'discarded. To accept that loss, request restore with {{"full": true, "to": '
                f'"{point.label}", "accept_loss": {proof.loss.count}}}',
                permanent=True,
            )
        restore_point.mark_repaired(dsn)
        flushed = self._flush_caches(ctx, p)
        seconds = pitr.elapsed_since(started)
        Path(proof.export).unlink(missing_ok=True)  # nothing was discarded
        return Outcome(
            f"repaired in place from {point.backup.label} restored to {point.label} ({point.why}),"
            f" proven consistent in a scratch instance ({what}): 0 orders lost, every write "
            f"since kept; {seconds:.1f}s; caches: {flushed}",
            {
                "restore_point": point.label,
                "restore_point_why": point.why,
                "backup": point.backup.label,
                "node": node,
                "mode": "repair",
                "repair": report,
                "lost_orders": 0,
                "lost_order_ids": [],
                "timings": {"total_s": seconds, "writable_after_s": 0.0},
            },
        )

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
