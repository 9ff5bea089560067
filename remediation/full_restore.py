"""The full restore an operator accepted: the leader's data directory replaced by a backup
recovered to the proven point, the 2PC transactions it brings back prepared finished, the
standby rebuilt. The data directory it replaces stays aside until the restored cluster passes
its checks; if it does not, it is put back and the cluster is left as it was found."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psycopg

from pgcluster import invariants
from pgcluster.nodes import leader_of
from remediation import facts, pg_ops, pitr
from remediation.base import ActionContext, ActionError, Outcome
from remediation.executors.base import ExecutorError
from remediation.in_doubt import InDoubt
from remediation.restore_model import Proof, RestoreParams

logger = logging.getLogger(__name__)


def stop_all(ctx: ActionContext, names: list[str]) -> None:
    for name in names:
        try:
            ctx.executor.stop(name)
        except ExecutorError:
            ctx.executor.fence(name)


def restored_is_sound(p: RestoreParams, dsn: str) -> str:
    """Why the restored leader is not fit to keep ("" if it is)."""
    verdict = invariants.check(
        pitr.dsn_with(dsn, dbname=p.orders_db),
        pitr.dsn_with(dsn, dbname=p.inventory_db),
        timeout_s=30,
    )
    if not verdict.is_sound:
        return "; ".join(verdict.problems) or verdict.error
    try:
        pg_ops.commit_a_write(dsn)
    except ActionError as exc:
        return str(exc)
    return ""


def put_back(ctx: ActionContext, p: RestoreParams, target: str, data_dir: Path, aside: Path) -> str:
    """The pre-restore data directory back in place, the nodes as they were."""
    stop_all(ctx, [target])
    shutil.rmtree(data_dir, ignore_errors=True)
    os.rename(aside, data_dir)
    ctx.executor.restart(target)
    for name in p.nodes:
        if name != target:
            ctx.executor.restart(name)
    pg_ops.wait_for(
        lambda: leader_of(pg_ops.views({target: p.nodes[target]})) is not None,
        p.restore_timeout_s,
        f"{target} writable again",
    )
    pg_ops.restore_sync(ctx.facts, target, p.nodes[target], p.restore_timeout_s)
    return f"the pre-restore data directory of {target} is back"


def run(
    ctx: ActionContext,
    p: RestoreParams,
    proof: Proof,
    target: str,
    flush: Callable[[ActionContext, RestoreParams], str],
) -> Outcome:
    point, timings = proof.point, {}
    started = time.monotonic()
    facts.not_synchronous(ctx.facts)
    stop_all(ctx, list(p.nodes))
    data_dir = Path(ctx.executor.data_dir(target))
    aside = data_dir.with_name(f"{data_dir.name}.before-restore")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(data_dir, aside)
    try:
        pitr.prepare_recovery(
            ctx.executor, target, data_dir, point.backup, Path(p.archive_dir), point.target
        )
        ctx.executor.restart(target)
        try:
            pitr.wait_promoted(
                p.nodes[target], p.restore_timeout_s, alive=lambda: ctx.executor.is_running(target)
            )
        except ActionError as exc:
            # "See its log" helps nobody once the log is gone with the stack: its last lines.
            raise ActionError(f"{exc}: {ctx.executor.log_tail(target)}") from exc
        timeline = pg_ops.views({target: p.nodes[target]})[0].timeline
        others = [n for n in p.nodes if n != target]
        facts.promoted(ctx.facts, ctx.facts.read(), target, others, timeline, "full restore")
        pitr.reset_recovery_settings(p.nodes[target])
        params = {
            "orders_dsn": pitr.dsn_with(p.nodes[target], dbname=p.orders_db),
            "inventory_dsn": pitr.dsn_with(p.nodes[target], dbname=p.inventory_db),
            "min_age_s": 0,
        }
        in_doubt = InDoubt().execute(replace(ctx, component=None, params=params)).summary
        why_not = restored_is_sound(p, p.nodes[target])
        if why_not:
            raise ActionError(f"the restored cluster fails its checks: {why_not}")
    # psycopg.Error too: a server that dies between promotion and its checks fails a query,
    # not only a connection, and the old data directory must come back all the same.
    except (ActionError, ExecutorError, OSError, psycopg.Error) as exc:
        logger.warning("full restore failed, putting the data directory back: %s", exc)
        try:
            back = put_back(ctx, p, target, data_dir, aside)
        except (ActionError, ExecutorError, OSError, psycopg.Error) as put_exc:
            raise ActionError(
                f"full restore failed ({exc}), and putting the old data directory back failed "
                f"too ({put_exc}): it is at {aside if aside.exists() else data_dir}",
                permanent=True,
            ) from exc
        raise ActionError(f"full restore failed ({exc}); {back}", permanent=True) from exc
    timings["writable_after_s"] = pitr.elapsed_since(started)
    shutil.rmtree(aside, ignore_errors=True)  # the restored cluster passed: the old one goes
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
        pg_ops.restore_sync(ctx.facts, target, p.nodes[target], p.restore_timeout_s)
    flushed = flush(ctx, p)
    timings["total_s"] = pitr.elapsed_since(started)
    loss = proof.loss
    return Outcome(
        f"restored {target} from {point.backup.label} to {point.label} ({point.why}), as "
        f"accepted: discarded {loss.describe()}, exported to {proof.export} (re-apply: "
        f"{proof.reapply}); writable after {timings['writable_after_s']:.1f}s; in doubt: "
        f"{in_doubt}; standby: {'; '.join(rebuilt) or 'none'}; caches: {flushed}",
        {
            "restore_point": point.label,
            "backup": point.backup.label,
            "node": target,
            "mode": "full",
            "lost_orders": loss.count,
            "lost_order_ids": list(loss.order_ids),
            "lost_total_cents": loss.total_cents,
            "export": str(proof.export),
            "reapply": proof.reapply,
            "standby": rebuilt,
            "timings": timings,
        },
    )
