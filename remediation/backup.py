"""Backup: an operator's "take a backup now", through the engine like any other action: a base
backup of the leader (checked with pg_verifybackup), then a drill of it (restored into a
scratch instance, the archive replayed, the shop's invariants run there). The same steps as
the scheduled backups (`remediation.pitr`); a failed drill fails the run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pgcluster.nodes import leader_of
from remediation import pg_ops, pitr
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params


class BackupParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=1)
    backups_dir: str
    archive_dir: str
    scratch_dir: str
    orders_db: str = "orders"
    inventory_db: str = "inventory"
    drill_timeout_s: float = Field(default=300, gt=0)


def params_of(ctx: ActionContext) -> BackupParams:
    return parse_params(BackupParams, ctx, "backup")


class Backup(Action):
    kind = "backup"
    needs = frozenset({"executor"})
    # A backup or drill in flight never holds up what changes the cluster: it stops, cleanly.
    yields_to = frozenset({"failover", "rejoin", "switchover", "restore"})
    Params = BackupParams

    def __init__(self) -> None:
        self.taken: pitr.Drill | None = None

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = BackupParams.model_validate(dict(params))
        return [
            f"take a base backup of the leader into {p.backups_dir}, checked with pg_verifybackup",
            f"drill it: restore it into a scratch instance under {p.scratch_dir}, replay the "
            f"WAL archive, run the shop's invariants there (within {p.drill_timeout_s:g} s)",
            "a failed drill fails the run; the shop is not touched",
        ]

    def precheck(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes))
        if leader is None:
            return Check.not_now("no writable leader to back up")
        return Check.go(f"back up {leader.name}")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = params_of(ctx)
        leader = leader_of(pg_ops.views(p.nodes))
        if leader is None:
            raise ActionError("no writable leader to back up")
        node = leader.name
        info = pitr.take_base_backup(
            ctx.executor, node, p.nodes[node], Path(p.backups_dir), cancel=ctx.cancel
        )
        drill = pitr.drill_backup(
            ctx.executor,
            node,
            p.nodes[node],
            info,
            Path(p.archive_dir),
            Path(p.scratch_dir) / f"drill-{info.label}-{os.getpid()}",
            orders_db=p.orders_db,
            inventory_db=p.inventory_db,
            timeout_s=p.drill_timeout_s,
            cancel=ctx.cancel,
        )
        data = {
            **info.to_json(),
            "drill": {"passed": drill.passed, "summary": drill.summary},
        }
        if not drill.passed:
            raise ActionError(f"drill of {info.label} failed: {drill.summary}")
        self.taken = drill
        return Outcome(f"{info.label} of {node} taken and drilled: {drill.summary}", data)

    def verify(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        if self.taken is None or not self.taken.passed:
            return Check(False, "no drilled backup yet")
        labels = {b.label for b in pitr.list_backups(Path(p.backups_dir))}
        if self.taken.label not in labels:
            return Check(False, f"{self.taken.label} is gone from {p.backups_dir}")
        return Check(True, f"{self.taken.label} taken, verified and drilled")
