"""The backup catalog and schedule. Backups, drills and retention run as actions through the
engine (`remediation.backup`, `drill`, `prune_backups`): claimed by compare-and-set, one run
at a time on the cluster's service, audited, standing aside for a failover. The schedule only
requests those runs; the catalog in the state store mirrors the backup directories, which
describe themselves (`remediation.pitr`), after each of those runs ends."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controlplane import store
from controlplane.config import BackupSettings
from controlplane.models import ActionState
from remediation import pitr

logger = logging.getLogger(__name__)

# The action kinds that change what the backup directory holds.
BACKUP_ACTIONS = frozenset({"backup", "drill", "prune-backups"})
POLICY_OF = {"backup": "scheduled-backup", "drill": "scheduled-drill",
             "prune-backups": "backup-retention"}  # fmt: skip
SCHEDULE = "schedule"  # who requests the scheduled runs, in the audit


def sync_catalog(factory: sessionmaker[Session], backups_dir: Path) -> None:
    """The catalog made to match the backup directories: each backup in it, with its last
    drill's verdict (verified when a drill passed); a backup whose directory is gone, out."""
    if not backups_dir.is_dir():  # unmounted, say: that is no reason to forget every backup
        logger.warning("backup directory %s missing: the catalog is left as it is", backups_dir)
        return
    found = {b.label: b for b in pitr.list_backups(backups_dir)}
    with store.transaction(factory) as s:
        for row in store.list_backups(s):
            if row.label not in found:
                store.delete_backup(s, row.label)
        for label, info in found.items():
            row = store.backup_by_label(s, label) or store.add_backup(
                s,
                label=label,
                path=info.path,
                started_at=info.started_at,
                finished_at=info.finished_at,
                size_bytes=info.size_bytes,
                checksum=info.checksum,
                drill={"source": info.source, "start_wal": info.start_wal},
            )
            verdict = pitr.drill_of(info)
            if not verdict:
                continue
            verified = verdict.get("verified_at")
            row.drill = {
                "source": info.source,
                "start_wal": info.start_wal,
                **{k: v for k, v in verdict.items() if k != "verified_at"},
            }
            row.verified_at = datetime.fromisoformat(verified) if verified else None


def request_scheduled(
    factory: sessionmaker[Session], settings: BackupSettings, actions: list[str], now: datetime
) -> list[int]:
    """Pending runs of `actions` on the cluster's service, in that order (the engine runs
    them one after the other), each under its policy; none for an action that is already
    pending or running there (a slow backup is not queued up behind itself)."""
    created = []
    with store.transaction(factory) as s:
        busy = {
            r.action
            for state in (ActionState.PENDING, ActionState.RUNNING)
            for r in store.runs_in_state(s, state)
            if r.target == settings.service
        }
        for action in actions:
            if action in busy:
                logger.info("scheduled %s skipped: one is pending or running", action)
                continue
            run = store.create_action_run(
                s,
                incident_id=None,
                action=action,
                target=settings.service,
                mode="auto",
                state=ActionState.PENDING,
                requested_by=SCHEDULE,
                reason=f"scheduled ({POLICY_OF[action]})",
                params={"policy": POLICY_OF[action], "params": {}},
                created_at=now,
                try_number=1,
            )
            assert run is not None  # no incident: nothing to collide with
            store.audit(
                s,
                actor=SCHEDULE,
                verb="request",
                at=now,
                action_run_id=run.id,
                message=f"{action} on {settings.service}: scheduled",
                data={"policy": POLICY_OF[action]},
            )
            created.append(run.id)
    return created


def catalog_rows(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    with store.transaction(factory) as s:
        return [
            {
                "label": b.label,
                "started_at": b.started_at.isoformat(),
                "finished_at": b.finished_at.isoformat() if b.finished_at else None,
                "size_bytes": b.size_bytes,
                "checksum": b.checksum,
                "verified_at": b.verified_at.isoformat() if b.verified_at else None,
                "drill": b.drill,
                "path": b.path,
            }
            for b in store.list_backups(s)
        ]
