"""Backup: a base backup of the leader (pg_basebackup, checked with pg_verifybackup), then a
drill of it (restored into a scratch instance, the archive replayed, the shop's invariants run
there), its verdict written beside it. The scheduled backups run it, and so do an operator's
"take a backup now" and the `controlplane backup` command: one code path. A failed drill
fails the run (the backup stays, marked failed)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pgcluster.nodes import leader_of
from remediation import pg_ops, pitr
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params

# What changes the cluster a backup is taken from: a backup or drill in flight stands aside.
CLUSTER_CHANGES = frozenset({"failover", "rejoin", "switchover", "restore"})


class BackupParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=1)
    backups_dir: str
    archive_dir: str
    scratch_dir: str
    orders_db: str = "orders"
    inventory_db: str = "inventory"
    drill_timeout_s: float = Field(default=300, gt=0)
    max_rate: str | None = Field(default=None, pattern=r"^[0-9]+[kM]?$")  # pg_basebackup's


def params_of(ctx: ActionContext) -> BackupParams:
    return parse_params(BackupParams, ctx, "backup")


def leader_name(nodes: Mapping[str, str]) -> str:
    leader = leader_of(pg_ops.views(dict(nodes)))
    if leader is None:
        raise ActionError("no writable leader to back up or drill from")
    return leader.name


def drill(ctx: ActionContext, p: BackupParams, node: str, info: pitr.BackupInfo) -> pitr.Drill:
    """Drill `info` from `node`'s tools and record the verdict beside it. Cancelled, nothing
    is recorded (the next drill takes it)."""
    started = time.monotonic()
    found = pitr.drill_backup(
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
    pitr.record_drill(info, found, datetime.now(UTC), pitr.elapsed_since(started))
    return found


class Backup(Action):
    kind = "backup"
    needs = frozenset({"executor"})
    # A backup or drill in flight never holds up what changes the cluster: it stops, cleanly.
    yields_to = CLUSTER_CHANGES
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
        node = leader_name(p.nodes)
        info = pitr.take_base_backup(
            ctx.executor,
            node,
            p.nodes[node],
            Path(p.backups_dir),
            cancel=ctx.cancel,
            max_rate=p.max_rate,
        )
        found = drill(ctx, p, node, info)
        data = {**info.to_json(), "drill": {"passed": found.passed, "summary": found.summary}}
        taken = f"{info.label}: pg_basebackup of {node}, checked by pg_verifybackup"
        if not found.passed:
            raise ActionError(f"{taken}; drill FAILED: {found.summary}", permanent=True)
        self.taken = found
        return Outcome(f"{taken}; drill passed: {found.summary}", data)

    def verify(self, ctx: ActionContext) -> Check:
        p = params_of(ctx)
        if self.taken is None or not self.taken.passed:
            return Check(False, "no drilled backup yet")
        labels = {b.label for b in pitr.list_backups(Path(p.backups_dir))}
        if self.taken.label not in labels:
            return Check(False, f"{self.taken.label} is gone from {p.backups_dir}")
        return Check(True, f"{self.taken.label} taken, verified and drilled")
