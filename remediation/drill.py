"""Drill: prove a backup restores. The newest backup (or the one an operator names) is checked
against its manifest, restored into a scratch instance, the WAL archive replayed, and the
shop's invariants run there; the verdict is written beside it (a pass verifies it). A failed
drill fails the run: a backup nobody can restore is found before a restore needs it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pgcluster.nodes import leader_of
from remediation import pg_ops, pitr
from remediation.backup import CLUSTER_CHANGES, BackupParams, drill, leader_name
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params

LABEL = r"^[A-Za-z0-9_.-]{1,100}$"


class DrillParams(BackupParams):
    label: str | None = Field(default=None, pattern=LABEL)  # None: the newest backup


class DrillOperatorParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str | None = Field(default=None, pattern=LABEL)


class Drill(Action):
    kind = "drill"
    needs = frozenset({"executor"})
    yields_to = CLUSTER_CHANGES
    Params = DrillParams
    OperatorParams = DrillOperatorParams

    def __init__(self) -> None:
        self.drilled: str | None = None  # the label of the backup that passed

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = DrillParams.model_validate(dict(params))
        which = p.label or f"the newest backup in {p.backups_dir}"
        return [
            f"check {which} against its manifest (pg_verifybackup)",
            f"restore it into a scratch instance under {p.scratch_dir}, replay the WAL archive, "
            f"run the shop's invariants there (within {p.drill_timeout_s:g} s)",
            "write the verdict beside the backup; a failed drill fails the run",
        ]

    @staticmethod
    def _backup(p: DrillParams, found: list[pitr.BackupInfo] | None = None) -> pitr.BackupInfo:
        """The backup to drill, of `found` (default: the backups directory, listed now)."""
        listed = pitr.list_backups(Path(p.backups_dir)) if found is None else found
        backups = {b.label: b for b in listed}
        if not backups:
            raise ActionError(f"no backup in {p.backups_dir} to drill", permanent=True)
        info = backups.get(p.label) if p.label else list(backups.values())[-1]
        if info is None:
            raise ActionError(f"no backup labelled {p.label!r}", permanent=True)
        return info

    def precheck(self, ctx: ActionContext) -> Check:
        p = parse_params(DrillParams, ctx, "drill")
        found = pitr.list_backups(Path(p.backups_dir))
        if not found:
            return Check.nothing_to_do(f"no backup in {p.backups_dir} to drill yet")
        if leader_of(pg_ops.views(p.nodes)) is None:
            return Check.not_now("no writable leader: its tools drill, its archive is replayed")
        return Check.go(f"drill {self._backup(p, found).label}")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = parse_params(DrillParams, ctx, "drill")
        info = self._backup(p)
        found = drill(ctx, p, leader_name(p.nodes), info)
        if not found.passed:
            raise ActionError(f"drill of {info.label} FAILED: {found.summary}", permanent=True)
        self.drilled = info.label
        return Outcome(
            f"drill of {info.label} passed: {found.summary}",
            {"label": info.label, "passed": True, "summary": found.summary},
        )

    def verify(self, ctx: ActionContext) -> Check:
        return Check(self.drilled is not None, f"{self.drilled} drilled")
