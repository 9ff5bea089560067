"""Backups as the control plane keeps them: take one from the leader, drill it (restore into a
scratch instance, replay the archive, check the shop's invariants there), retire old ones.
Scheduled by the runtime; also run by the `controlplane backup` command. The catalog is in the
state store; each backup directory describes itself too (see remediation.pitr).

A scheduled job can be stopped (`Backups.cancel`, when a failover or another change of the
cluster starts): the step under way is undone (its tool killed, its directory removed, a
scratch instance stopped) and records nothing; what finished before stays (a backup taken
and checked stays in the catalog, undrilled, for the next drill)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controlplane import store
from controlplane.config import BackupSettings
from controlplane.engine import utcnow
from pgcluster.nodes import leader_of, observe_all
from remediation import pitr
from remediation.base import ActionError
from remediation.executors.base import Cancel, Cancelled, Executor, ExecutorError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
Clock = Callable[[], datetime]


class BackupError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class DrillResult:
    label: str
    passed: bool
    summary: str
    duration_s: float


class Backups:
    def __init__(
        self,
        settings: BackupSettings,
        executor: Executor,
        factory: sessionmaker[Session],
        *,
        clock: Clock = utcnow,
        max_rate: str | None = None,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.factory = factory
        self.clock = clock
        self.max_rate = max_rate  # pg_basebackup's --max-rate (None: as fast as it goes)
        self.lock = threading.Lock()  # the scheduled jobs one at a time (a drill never races)
        self.in_flight: Cancel | None = None  # the running scheduled job's token

    def cancel(self, reason: str) -> bool:
        """Stop the scheduled backup or drill in flight, if there is one; returns at once
        (whether one was). Its running tool is killed now; the job then removes what it had
        half made and logs one line with `reason`. The next job runs as usual."""
        token = self.in_flight
        if token is None:
            return False
        token.cancel(reason)
        return True

    def _leader(self) -> str:
        leader = leader_of(observe_all(self.settings.nodes, 3))
        if leader is None:
            raise BackupError("no writable leader to back up")
        return leader.name

    # -- take --------------------------------------------------------------------------------
    def take(
        self, progress: Progress = pitr.no_progress, cancel: Cancel | None = None
    ) -> pitr.BackupInfo:
        node = self._leader()
        try:
            info = pitr.take_base_backup(
                self.executor,
                node,
                self.settings.nodes[node],
                self.settings.backups_dir,
                now=self.clock,
                progress=progress,
                cancel=cancel,
                max_rate=self.max_rate,
            )
        except ActionError as exc:
            raise BackupError(str(exc)) from exc
        self._add(info)
        logger.info("backup %s of %s taken (%d bytes)", info.label, node, info.size_bytes)
        return info

    # -- drill -------------------------------------------------------------------------------
    def drill(
        self,
        label: str | None = None,
        progress: Progress = pitr.no_progress,
        cancel: Cancel | None = None,
    ) -> DrillResult:
        """Restore a backup (default: the newest) into a scratch instance, replay the WAL
        archive, and check the shop's invariants there; the result goes in the catalog, and
        a pass marks the backup verified. Cancelled, nothing goes in the catalog."""
        infos = {b.label: b for b in pitr.list_backups(self.settings.backups_dir)}
        if not infos:
            raise BackupError(f"no backup in {self.settings.backups_dir} to drill")
        info = infos.get(label) if label else list(infos.values())[-1]
        if info is None:
            raise BackupError(f"no backup labelled {label!r}")
        node = self._leader()
        if cancel is not None:
            cancel.check()
        started = time.monotonic()
        found = pitr.drill_backup(
            self.executor,
            node,
            self.settings.nodes[node],
            info,
            self.settings.archive_dir,
            self.settings.scratch_dir / f"drill-{info.label}-{os.getpid()}",
            orders_db=self.settings.orders_db,
            inventory_db=self.settings.inventory_db,
            timeout_s=self.settings.drill_timeout_s,
            progress=progress,
            cancel=cancel,
        )
        result = DrillResult(
            info.label, found.passed, found.summary, round(time.monotonic() - started, 3)
        )
        self._record_drill(result, found.details)
        verdict = "passed" if found.passed else "FAILED"
        progress(f"drill {verdict} in {result.duration_s:.1f}s: {found.summary}")
        return result

    def catalogue(self, taken: Mapping[str, Any]) -> None:
        """A backup taken and drilled outside the schedule (the `backup` action, from the
        dashboard or the API): into the catalog, verified when its drill passed."""
        info = pitr.BackupInfo.from_json({k: v for k, v in taken.items() if k != "drill"})
        drill = taken.get("drill") or {}
        self._add(info)
        self._record_drill(
            DrillResult(info.label, bool(drill.get("passed")), str(drill.get("summary", "")), 0.0),
            {},
        )

    def _add(self, info: pitr.BackupInfo) -> None:
        with store.transaction(self.factory) as s:
            if store.backup_by_label(s, info.label) is None:
                store.add_backup(
                    s,
                    label=info.label,
                    path=info.path,
                    started_at=info.started_at,
                    finished_at=info.finished_at,
                    size_bytes=info.size_bytes,
                    checksum=info.checksum,
                    drill={"source": info.source, "start_wal": info.start_wal},
                )

    def _record_drill(self, result: DrillResult, details: dict[str, Any]) -> None:
        now = self.clock()
        with store.transaction(self.factory) as s:
            backup = store.backup_by_label(s, result.label)
            if backup is None:
                return
            backup.drill = {
                **backup.drill,
                "at": now.isoformat(),
                "passed": result.passed,
                "summary": result.summary,
                "duration_s": result.duration_s,
                "orders": details.get("orders"),
            }
            backup.verified_at = now if result.passed else backup.verified_at

    # -- retention ---------------------------------------------------------------------------
    def apply_retention(
        self, progress: Progress = pitr.no_progress, cancel: Cancel | None = None
    ) -> list[str]:
        """Keep the newest `keep_count` backups, and any younger than `max_age_s`, and the
        newest verified one whatever its age; delete the rest, and the archived WAL that only
        they needed."""
        if cancel is not None:
            cancel.check()
        now = self.clock()
        with store.transaction(self.factory) as s:
            catalog = store.list_backups(s)  # newest first
            verified = next((b.label for b in catalog if b.verified_at is not None), None)
            doomed = [
                b.label
                for i, b in enumerate(catalog)
                if i >= self.settings.keep_count
                and now - b.started_at > timedelta(seconds=self.settings.max_age_s)
                and b.label != verified
            ]
            for label in doomed:
                store.delete_backup(s, label)
        for label in doomed:
            shutil.rmtree(self.settings.backups_dir / label, ignore_errors=True)
            progress(f"deleted {label}")
        remaining = pitr.list_backups(self.settings.backups_dir)
        if doomed and remaining:
            try:
                pitr.prune_archive(
                    self.executor, self._leader(), self.settings.archive_dir, remaining[0], cancel
                )
                progress(f"WAL archive pruned up to {remaining[0].start_wal}")
            except (ExecutorError, BackupError) as exc:
                logger.warning("WAL archive not pruned: %s", exc)
        return doomed

    # -- the scheduled job -------------------------------------------------------------------
    @contextmanager
    def _job(self, name: str) -> Iterator[Cancel]:
        """One scheduled job at a time, with a token `cancel` stops it by. Its end is one log
        line: failed (an error), or cancelled and why (a failure once the cancel has come is
        its doing: the leader killed under pg_basebackup, say)."""
        with self.lock:
            token = Cancel()
            self.in_flight = token
            try:
                yield token
            except Cancelled as exc:
                logger.warning("scheduled %s cancelled: %s", name, exc)
            except BackupError as exc:
                if token.reason is None:
                    logger.error("scheduled %s failed: %s", name, exc)
                else:
                    logger.warning("scheduled %s cancelled: %s (%s)", name, token.reason, exc)
            finally:
                self.in_flight = None

    def scheduled_backup(self) -> None:
        """Take, drill, retire: one job, so that a drill never races its own backup."""
        with self._job("backup") as cancel:
            info = self.take(cancel=cancel)
            result = self.drill(info.label, cancel=cancel)
            if not result.passed:
                logger.error("drill of %s failed: %s", info.label, result.summary)
            self.apply_retention(cancel=cancel)

    def scheduled_drill(self) -> None:
        with self._job("drill") as cancel:
            self.drill(cancel=cancel)


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
