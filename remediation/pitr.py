"""Base backups and point-in-time recovery with PostgreSQL's own tools: pg_basebackup (with a
SHA-256 manifest), pg_verifybackup, recovery from the WAL archive, pg_archivecleanup.

Each backup directory carries its own description (`controlplane-backup.json`), so a restore
needs only the directory; the control plane's catalog indexes them and records the drills."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from pgcluster import invariants
from remediation import pg_ops, restore_point
from remediation.base import ActionError
from remediation.executors.base import Cancel, Cancelled, Executor, ExecutorError

logger = logging.getLogger(__name__)

META_FILE = "controlplane-backup.json"
# The last drill's verdict, beside the backup it judged: the backup directory describes
# itself whole, and the control plane's catalog mirrors it (controlplane.backups).
DRILL_FILE = "controlplane-drill.json"
DRILL_TMP = f".{DRILL_FILE}.tmp"  # written first, renamed over it
# Not copied into a data directory: ours, and pg_basebackup's manifest (meaningless there).
NOT_DATA = (META_FILE, DRILL_FILE, "backup_manifest")
LABEL = re.compile(r"[A-Za-z0-9_.-]{1,100}")
WAL_NAME = re.compile(r"[0-9A-F]{24}")
START_WAL = re.compile(r"^START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)", re.M)

Progress = Callable[[str], None]


def no_progress(_: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class BackupInfo:
    label: str
    path: str
    source: str  # the node it was taken from
    started_at: datetime
    finished_at: datetime
    start_wal: str  # the first WAL segment a restore of it needs
    checksum: str  # SHA-256 of its backup_manifest, which holds every file's own SHA-256
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackupInfo:
        """Raises ValueError (TypeError, KeyError) for a description that is not one: the
        file is outside input (whoever writes in the backup directory wrote it)."""
        info = cls(
            **{
                **data,
                "started_at": datetime.fromisoformat(data["started_at"]),
                "finished_at": datetime.fromisoformat(data["finished_at"]),
            }
        )
        texts = (info.label, info.path, info.source, info.start_wal, info.checksum)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("a text field is not text")
        if not LABEL.fullmatch(info.label) or not WAL_NAME.fullmatch(info.start_wal):
            raise ValueError(f"label {info.label!r} or start WAL {info.start_wal!r} malformed")
        if not re.fullmatch(r"[0-9a-f]{64}", info.checksum):
            raise ValueError("checksum is not a SHA-256")
        size = info.size_bytes
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**62:
            raise ValueError(f"size_bytes {size!r} out of range")
        return info


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def verify_args(path: Path) -> list[str]:
    """pg_verifybackup's: every file but the control plane's own, which no manifest lists."""
    ours = (META_FILE, DRILL_FILE, DRILL_TMP)
    return [arg for name in ours for arg in ("--ignore", name)] + [str(path)]


def take_base_backup(
    executor: Executor,
    node: str,
    dsn: str,
    backups_dir: Path,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    progress: Progress = no_progress,
    cancel: Cancel | None = None,
    max_rate: str | None = None,
) -> BackupInfo:
    """pg_basebackup of `node` (its WAL streamed in, so the backup restores on its own), then
    pg_verifybackup against its manifest before it is described as a backup at all. Failed
    or cancelled (`Cancelled`, the tool killed), it leaves no directory behind. `max_rate`
    (pg_basebackup's --max-rate, e.g. "10M") spares the leader's disk."""
    started_at = now()
    label = started_at.strftime("base-%Y%m%dT%H%M%S%fZ")
    dest = backups_dir / label
    progress(f"pg_basebackup of {node} into {dest}")
    try:
        executor.run_tool(
            node,
            "pg_basebackup",
            [
                "-D",
                str(dest),
                "-d",
                dsn,
                "-X",
                "stream",
                "--checkpoint=fast",
                "-l",
                label,
                "--manifest-checksums=SHA256",
                *([f"--max-rate={max_rate}"] if max_rate else []),
            ],
            timeout_s=3600,
            cancel=cancel,
        )
        progress("pg_verifybackup: every file against its SHA-256, and the WAL")
        executor.run_tool(node, "pg_verifybackup", verify_args(dest), timeout_s=3600, cancel=cancel)
    except Cancelled:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except ExecutorError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise ActionError(f"base backup of {node} failed: {exc}") from exc
    found = START_WAL.search((dest / "backup_label").read_text())
    if found is None:
        raise ActionError(f"{dest}/backup_label names no start WAL segment")
    info = BackupInfo(
        label=label,
        path=str(dest),
        source=node,
        started_at=started_at,
        finished_at=now(),
        start_wal=found.group(1),
        checksum=sha256_of(dest / "backup_manifest"),
        size_bytes=size_of(dest),
    )
    (dest / META_FILE).write_text(json.dumps(info.to_json(), indent=2))
    progress(f"{label}: {info.size_bytes / 1e6:.1f} MB, manifest sha256 {info.checksum[:16]}…")
    return info


def list_backups(backups_dir: Path) -> list[BackupInfo]:
    """The finished backups in the directory, oldest first (a half-written one has no meta).
    A backup is the directory its description is in, whatever path the description names
    (retention deletes it, a drill writes beside it); a description that does not read, or
    whose label is not its directory's name, or whose times have no zone, is skipped."""
    found = []
    for meta in backups_dir.glob(f"*/{META_FILE}"):
        try:
            # The control plane (root, often) deletes and writes in these directories: a link
            # planted there would aim that elsewhere. Only real directories and files count.
            if meta.parent.is_symlink() or meta.is_symlink():
                raise ValueError("a symbolic link")
            info = BackupInfo.from_json(json.loads(meta.read_text()))
            if info.label != meta.parent.name:
                raise ValueError(f"labelled {info.label!r}")
            if info.started_at.tzinfo is None or info.finished_at.tzinfo is None:
                raise ValueError("times without a zone")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.warning("%s is not a backup description, skipped: %s", meta, exc)
            continue
        found.append(replace(info, path=str(meta.parent)))
    return sorted(found, key=lambda b: b.finished_at)


def end_lsn_of(backup: BackupInfo) -> str:
    """Where the backup ends (its manifest's last WAL range): a restore cannot stop before."""
    ranges = json.loads((Path(backup.path) / "backup_manifest").read_text())["WAL-Ranges"]
    return str(ranges[-1]["End-LSN"])


def backup_for(backups_dir: Path, target: datetime | None) -> BackupInfo:
    """The newest backup that finished before `target` (a restore cannot stop inside one)."""
    usable = [b for b in list_backups(backups_dir) if target is None or b.finished_at < target]
    if not usable:
        when = f" finished before {target.isoformat()}" if target else ""
        raise ActionError(f"no base backup{when} in {backups_dir}", permanent=True)
    return usable[-1]


def check_backup(
    executor: Executor, node: str, backup: BackupInfo, cancel: Cancel | None = None
) -> None:
    """Its manifest is the one cataloged, and every file matches the manifest."""
    path = Path(backup.path)
    if sha256_of(path / "backup_manifest") != backup.checksum:
        raise ActionError(f"{backup.label}: backup_manifest checksum differs", permanent=True)
    try:
        executor.run_tool(node, "pg_verifybackup", verify_args(path), timeout_s=3600, cancel=cancel)
    except ExecutorError as exc:
        raise ActionError(f"{backup.label} fails verification: {exc}", permanent=True) from exc


Target = datetime | str  # a time, or an LSN ("0/3000160"): recovery stops just before it


def recovery_conf(archive_dir: Path, target: Target | None, extra: dict[str, str]) -> str:
    """Settings appended to the copy's postgresql.auto.conf (later lines win)."""
    settings = {
        "restore_command": f"cp {archive_dir}/%f %p",
        "recovery_target_action": "promote",
        "recovery_target_timeline": "latest",
        # A restored cluster stands alone until its standby is rebuilt.
        "synchronous_standby_names": "",
        "primary_conninfo": "",
        **extra,
    }
    if isinstance(target, str):
        settings["recovery_target_lsn"] = target
        settings["recovery_target_inclusive"] = "off"
    elif target is not None:
        settings["recovery_target_time"] = target.isoformat()
        settings["recovery_target_inclusive"] = "off"
    lines = [f"{k} = '{v}'" for k, v in settings.items()]
    return "\n# restore by the control plane\n" + "\n".join(lines) + "\n"


RECOVERY_SETTINGS = (
    "restore_command",
    "recovery_target_action",
    "recovery_target_timeline",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_inclusive",
    "primary_conninfo",
)


def prepare_recovery(
    executor: Executor,
    node: str,
    dest: Path,
    backup: BackupInfo,
    archive_dir: Path,
    target: Target | None,
    extra: dict[str, str] | None = None,
) -> None:
    """`dest` becomes a copy of the backup set to recover up to `target` and promote."""
    source = Path(backup.path)
    auto_conf = (source / "postgresql.auto.conf").read_text()
    executor.put_files(
        node,
        str(dest),
        source_dir=str(source),
        files={
            "postgresql.auto.conf": auto_conf + recovery_conf(archive_dir, target, extra or {}),
            "recovery.signal": "",
        },
    )
    for name in (*NOT_DATA, "standby.signal"):
        (dest / name).unlink(missing_ok=True)
    keep_ancestor_wal(dest, source, archive_dir)


def keep_ancestor_wal(dest: Path, backup_path: Path, archive_dir: Path) -> list[str]:
    """Put in `dest`/pg_wal, under the old timelines' names, the WAL of the timelines the
    newest one descends from, from the backup's start to each switch
    (`restore_point.ancestor_segments`). A recovery that crosses a switch (a failover, an
    earlier restore) with two-phase commits prepared before it reads their state from pg_wal
    by the old timeline's name, not through restore_command, and PostgreSQL 15 stops with
    "requested WAL segment ... has already been removed" without it. Returns the names."""
    histories = [
        int(h.stem, 16)
        for h in archive_dir.glob("*.history")
        if re.fullmatch("[0-9A-F]{8}", h.stem)
    ]
    if not histories:
        return []
    start = restore_point.backup_start_lsn(backup_path)
    pieces = restore_point.timeline_ranges(archive_dir, start, 2**64 - 1, max(histories))
    wal_dir = dest / "pg_wal"
    owner = wal_dir.stat()
    kept = []
    for name, source in restore_point.ancestor_segments(archive_dir, pieces).items():
        target = wal_dir / name
        if not target.exists():
            shutil.copyfile(source, target)
            os.chown(target, owner.st_uid, owner.st_gid)
            kept.append(name)
    return kept


def wait_promoted(
    dsn: str,
    timeout_s: float,
    alive: Callable[[], bool] | None = None,
    cancel: Cancel | None = None,
) -> None:
    """Recovery reached its target (or the archive's end) and the server took the primary's
    role: it accepts connections and is out of recovery. A server that stops meanwhile (e.g.
    "recovery ended before configured recovery target was reached") fails it at once."""

    def promoted() -> bool:
        if cancel is not None:
            cancel.check()
        if alive is not None and not alive():
            raise ActionError("the server stopped during recovery (see its log)")
        try:
            with pg_ops.connect(dsn, timeout_s=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                return row is not None and not row[0]
        except ActionError:
            return False

    pg_ops.wait_for(promoted, timeout_s, "recovery finished and promoted")


def reset_recovery_settings(dsn: str) -> None:
    """A restored node keeps no recovery target: as a standby later it would stop there."""
    with pg_ops.connect(dsn) as conn:
        for name in RECOVERY_SETTINGS:
            conn.execute(f"ALTER SYSTEM RESET {name}")
        conn.execute("SELECT pg_reload_conf()")


def dsn_with(dsn: str, **changes: Any) -> str:
    return make_conninfo(dsn, **changes)


@dataclass(frozen=True, slots=True)
class Scratch:
    """A throw-away instance restored from a backup, for a drill."""

    node: str  # whose OS user and tools run it
    data_dir: Path
    port: int
    dsn: str


def start_scratch(
    executor: Executor,
    node: str,
    node_dsn: str,
    backup: BackupInfo,
    archive_dir: Path,
    scratch_dir: Path,
    port: int,
    *,
    timeout_s: float,
    target: Target | None = None,
    cancel: Cancel | None = None,
) -> Scratch:
    """Restore `backup` into `scratch_dir`, replay the archive (to its end, or to `target`),
    promote, and start it on `port` (never archiving: its WAL must not mix with the
    cluster's). Cancelled, it stops the instance and removes its directory."""
    extra = {
        "port": str(port),
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(scratch_dir),
        "archive_mode": "off",
        "cluster_name": f"{node}-drill",
    }
    scratch = Scratch(node, scratch_dir, port, dsn_with(node_dsn, host="127.0.0.1", port=port))
    try:
        prepare_recovery(executor, node, scratch_dir, backup, archive_dir, target, extra)
        if cancel is not None:
            cancel.check()
        # The start itself is not cut short: killing pg_ctl leaves its postmaster (a session
        # of its own), and one that had not written its pid file yet could not be stopped: it
        # would run on a deleted directory. `pg_ctl -w` returns once recovery is consistent
        # (seconds); the wait for the promotion below stops at once.
        executor.run_tool(
            node,
            "pg_ctl",
            [
                "start",
                "-D",
                str(scratch_dir),
                "-l",
                str(scratch_dir / "drill.log"),
                "-w",
                "-t",
                str(round(timeout_s)),
            ],
            timeout_s=timeout_s + 10,
        )
        wait_promoted(scratch.dsn, timeout_s, cancel=cancel)
    except Cancelled:
        stop_scratch(executor, scratch)
        raise
    except (ExecutorError, ActionError) as exc:
        # pg_ctl says "examine the log output", and the log goes with the scratch directory:
        # its last lines go into the error instead.
        said = log_tail(scratch_dir / "drill.log")
        stop_scratch(executor, scratch)
        raise ActionError(f"drill restore of {backup.label} failed: {exc}{said}") from exc
    return scratch


def log_tail(path: Path, lines: int = 3) -> str:
    """A server log's last FATAL or PANIC lines (else its last lines), as a suffix for an
    error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    every = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in every if "FATAL:" in line or "PANIC:" in line]
    tail = (fatal or every)[-lines:]
    return f" (its log: {' | '.join(tail)})" if tail else ""


def stop_scratch(executor: Executor, scratch: Scratch) -> None:
    with contextlib.suppress(ExecutorError):  # not running
        executor.run_tool(
            scratch.node, "pg_ctl", ["stop", "-D", str(scratch.data_dir), "-m", "immediate"]
        )
    shutil.rmtree(scratch.data_dir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Drill:
    """What a drill found: `passed` only if the restored copy passed the shop's invariants."""

    label: str
    passed: bool
    summary: str
    details: dict[str, Any]


def drill_backup(
    executor: Executor,
    node: str,
    node_dsn: str,
    backup: BackupInfo,
    archive_dir: Path,
    scratch_dir: Path,
    *,
    orders_db: str,
    inventory_db: str,
    timeout_s: float,
    progress: Progress = no_progress,
    cancel: Cancel | None = None,
) -> Drill:
    """Check `backup` against its manifest, restore it into a scratch instance on a free port,
    replay the archive to its end, and run the shop's invariants there. Never raises for a
    failed drill: that is its finding. Cancelled (`Cancelled`), it finds nothing, and leaves
    no scratch instance or directory behind; an invariants check under way when the cancel
    comes (seconds at most: its statement timeout) finishes first."""
    progress(f"drill of {backup.label}: verify, restore into {scratch_dir}, replay the archive")
    try:
        check_backup(executor, node, backup, cancel)
        scratch = start_scratch(
            executor,
            node,
            node_dsn,
            backup,
            archive_dir,
            scratch_dir,
            free_port(),
            timeout_s=timeout_s,
            cancel=cancel,
        )
    except (ActionError, ExecutorError) as exc:
        return Drill(backup.label, False, f"restore failed: {exc}", {})
    try:
        progress(f"restored on port {scratch.port}; checking the shop's invariants")
        verdict = invariants.check(
            dsn_with(scratch.dsn, dbname=orders_db),
            dsn_with(scratch.dsn, dbname=inventory_db),
            timeout_s=30,
        )
    finally:
        stop_scratch(executor, scratch)
    if cancel is not None:
        cancel.check()  # the step under way at the cancel counts for nothing
    if not verdict.readable:
        return Drill(backup.label, False, f"invariants not readable: {verdict.error}", {})
    if verdict.problems:
        return Drill(backup.label, False, "; ".join(verdict.problems), verdict.details)
    return Drill(
        backup.label, True, f"{verdict.details['orders']} orders consistent", verdict.details
    )


def record_drill(
    backup: BackupInfo, drill: Drill, at: datetime, duration_s: float
) -> dict[str, Any]:
    """Write the drill's verdict beside the backup; returns it. A pass verifies the backup; a
    failure takes an earlier verification back (whatever made it fail, it is not restorable
    now, and the backup probe must not count it)."""
    verified_at = at.isoformat() if drill.passed else None
    verdict = {
        "at": at.isoformat(),
        "passed": drill.passed,
        "summary": drill.summary,
        "duration_s": duration_s,
        "orders": drill.details.get("orders"),
        "verified_at": verified_at,
    }
    write_no_follow(Path(backup.path) / DRILL_FILE, json.dumps(verdict, indent=2))
    return verdict


def write_no_follow(path: Path, text: str) -> None:
    """Replace `path` with `text` without following a link planted at its name (or at its
    temporary's): written beside it, then renamed over it (a rename replaces a link, never
    its target)."""
    tmp = path.with_name(DRILL_TMP if path.name == DRILL_FILE else f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def drill_of(backup: BackupInfo) -> dict[str, Any]:
    """The backup's last drill verdict ({} when it was never drilled, or the file does not
    read as one)."""
    path = Path(backup.path) / DRILL_FILE
    if path.is_symlink():
        return {}
    try:
        verdict = json.loads(path.read_text())
        if not isinstance(verdict, dict) or not isinstance(verdict.get("passed"), bool):
            return {}
        verified = verdict.get("verified_at")
        if verified is not None and datetime.fromisoformat(verified).tzinfo is None:
            return {}
    except (OSError, ValueError, TypeError):
        return {}
    return verdict


def past_retention(
    backups: list[BackupInfo], now: datetime, keep_count: int, max_age_s: float
) -> list[BackupInfo]:
    """What retention deletes: beyond the newest `keep_count`, those older than `max_age_s`,
    except the newest verified one whatever its age (a restore needs one proven good)."""
    newest_first = sorted(backups, key=lambda b: b.finished_at, reverse=True)
    verified = next((b.label for b in newest_first if drill_of(b).get("verified_at")), None)
    return [
        b
        for i, b in enumerate(newest_first)
        if i >= keep_count
        and (now - b.started_at).total_seconds() > max_age_s
        and b.label != verified
    ]


def prune_archive(
    executor: Executor,
    node: str,
    archive_dir: Path,
    oldest: BackupInfo,
    cancel: Cancel | None = None,
) -> str:
    """Drop the archived WAL no remaining backup needs (older than the oldest's start). Cut
    short, it has dropped some of it: the rest goes next time."""
    return executor.run_tool(
        node, "pg_archivecleanup", [str(archive_dir), oldest.start_wal], cancel=cancel
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def elapsed_since(start: float) -> float:
    return round(time.monotonic() - start, 3)
