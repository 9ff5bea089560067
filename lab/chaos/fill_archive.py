"""fill-archive: the WAL archive's disk full. A small tmpfs, filled to its last byte, is
mounted over the stack's archive directory for the trial, so archive_command fails; then the
WAL it took is copied to the real directory and the tmpfs unmounted, always."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import ClassVar

from lab.chaos.base import BaseFault, ChaosError, FaultRecord, Stamp, record, wait_s
from lab.observe import StackView

FILLER = ".chaos-filler"
TMPFS_SIZE = "4m"


class FillArchive(BaseFault):
    kind: ClassVar[str] = "fill-archive"
    # Detected there (the pg_archive probe); healed by PostgreSQL's archiver once the disk has
    # room (bench/goals.toml: heals = "itself"): no action of the control plane's frees it.
    target: ClassVar[str] = "shop-db-archive"
    default_duration_s: ClassVar[float] = 15.0

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        archive = Path(view.description()["postgres"]["wal_archive"])
        owner = archive.stat()
        if _is_mountpoint(archive):
            raise ChaosError(f"{archive} is already a mount point: a fault left over?")
        options = f"size={TMPFS_SIZE},uid={owner.st_uid},gid={owner.st_gid},mode=0700"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(archive)], check=True)
        failed_before = _failed_count(view)
        try:
            with (archive / FILLER).open("wb") as fh:  # ENOSPC ends the fill: the disk is full
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                except OSError:
                    pass
            started = Stamp.now()
            # A segment switch makes the archiver try (and fail) at once, load or not.
            with view.leader_db("postgres") as conn:
                conn.execute("SELECT pg_switch_wal()")
            wait_s(duration_s)
            failures = _failed_count(view) - failed_before
        finally:
            kept = _unmount_keeping_wal(archive)
        ended = Stamp.now()
        return record(
            self.kind, str(archive), started, ended, archive_failures=failures, wal_kept=kept
        )

    def is_recovered(self, view: StackView) -> bool:
        """The archiver has archived something since its last failure."""
        with view.leader_db("postgres") as conn:
            row = conn.execute(
                "SELECT last_failed_time IS NULL OR last_archived_time > last_failed_time "
                "FROM pg_stat_archiver"
            ).fetchone()
        return bool(row and row[0])


def _is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def _failed_count(view: StackView) -> int:
    with view.leader_db("postgres") as conn:
        row = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()
    return int(row[0]) if row else 0


def _unmount_keeping_wal(archive: Path) -> list[str]:
    """What was archived into the tmpfs survives it: copied aside, unmounted, copied back."""
    (archive / FILLER).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as aside:
        names = [p.name for p in archive.iterdir()]
        for name in names:
            shutil.copy2(archive / name, Path(aside) / name)
        subprocess.run(["umount", str(archive)], check=True)
        for name in names:
            target = archive / name
            if not target.exists():
                shutil.copy2(Path(aside) / name, target)
                shutil.chown(target, archive.stat().st_uid, archive.stat().st_gid)
    return names
