"""Prune backups: retention. Keep the newest `keep_count` backups, any younger than
`max_age_s`, and the newest verified one whatever its age; delete the rest, then the archived
WAL only they needed (pg_archivecleanup up to the oldest remaining backup's start)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from remediation import pitr
from remediation.backup import CLUSTER_CHANGES, leader_name
from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params
from remediation.executors.base import ExecutorError


class PruneParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=1)  # whose tools clean the archive (the leader)
    backups_dir: str
    archive_dir: str
    keep_count: int = Field(default=3, ge=1)
    max_age_s: float = Field(default=7 * 24 * 3600, ge=0)  # 0: by count alone


class PruneBackups(Action):
    kind = "prune-backups"
    needs = frozenset({"executor"})
    yields_to = CLUSTER_CHANGES
    Params = PruneParams

    def __init__(self) -> None:
        self.deleted: list[str] | None = None

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = PruneParams.model_validate(dict(params))
        return [
            f"in {p.backups_dir}, keep the newest {p.keep_count} backups, any younger than "
            f"{p.max_age_s:g} s and the newest verified one; delete the others",
            f"drop the WAL in {p.archive_dir} older than the oldest remaining backup's start",
        ]

    def precheck(self, ctx: ActionContext) -> Check:
        p = parse_params(PruneParams, ctx, "prune-backups")
        doomed = pitr.past_retention(
            pitr.list_backups(Path(p.backups_dir)), datetime.now(UTC), p.keep_count, p.max_age_s
        )
        if not doomed:
            return Check.nothing_to_do("no backup past retention")
        return Check.go(f"delete {', '.join(b.label for b in doomed)}")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = parse_params(PruneParams, ctx, "prune-backups")
        backups_dir = Path(p.backups_dir)
        doomed = pitr.past_retention(
            pitr.list_backups(backups_dir), datetime.now(UTC), p.keep_count, p.max_age_s
        )
        for backup in doomed:
            if ctx.cancel is not None:
                ctx.cancel.check()
            # Its description first: half deleted, it is no longer a backup anybody restores.
            # (list_backups gave only real directories under backups_dir, no link.)
            (Path(backup.path) / pitr.META_FILE).unlink(missing_ok=True)
            try:
                shutil.rmtree(backup.path)
            except OSError as exc:
                raise ActionError(f"{backup.label} could not be deleted whole: {exc}") from exc
        remaining = pitr.list_backups(backups_dir)
        pruned = "the WAL archive untouched"
        if doomed and remaining:
            try:
                pitr.prune_archive(
                    ctx.executor, leader_name_or_any(p), Path(p.archive_dir), remaining[0],
                    ctx.cancel,
                )  # fmt: skip
            except ExecutorError as exc:
                raise ActionError(f"backups deleted, WAL archive not pruned: {exc}") from exc
            pruned = f"WAL archive pruned up to {remaining[0].start_wal}"
        self.deleted = [b.label for b in doomed]
        return Outcome(
            f"deleted {len(doomed)} backup(s) ({', '.join(self.deleted) or 'none'}); {pruned}",
            {"deleted": self.deleted, "kept": [b.label for b in remaining]},
        )

    def verify(self, ctx: ActionContext) -> Check:
        return Check(self.deleted is not None, "retention applied")


def leader_name_or_any(p: PruneParams) -> str:
    """pg_archivecleanup reads files only: the leader's host if one leads, else any node's."""
    try:
        return leader_name(p.nodes)
    except ActionError:
        return next(iter(p.nodes))
