"""PgArchiveProbe: does the leader's WAL archive keep up? Read from `pg_stat_archiver`.

The archiver retries a failing `archive_command` by itself, for ever, and says so only in the
server's log: here, a last attempt that failed (`last_failed_time` newer than
`last_archived_time`) is DOWN, naming the segment that fails and the failures counted; more
segments between the last archived one and the one being written than
`max_segments_behind`, or failed attempts since the last look while archiving succeeds
otherwise, is DEGRADED. It judges the archive, not the server: a node that cannot be reached
is UNKNOWN (the primary's probe reports it), and so is a standby (it archives nothing)."""

from __future__ import annotations

import re
import threading
from datetime import datetime
from typing import Any, ClassVar

import psycopg
from pydantic import Field

from pgcluster.nodes import session
from probes.base import Health, Params, Probe, ProbeResult, describe

ARCHIVER = (
    "SELECT archived_count, last_archived_wal, last_archived_time,"
    " failed_count, last_failed_wal, last_failed_time,"
    " current_setting('archive_mode'), pg_walfile_name(pg_current_wal_lsn()),"
    " pg_size_bytes(current_setting('wal_segment_size'))"
    " FROM pg_stat_archiver"
)
SEGMENT = re.compile(r"^[0-9A-F]{8}([0-9A-F]{8})([0-9A-F]{8})")


class PgArchiveParams(Params):
    dsn: str  # the leader's: e.g. every node, with target_session_attrs=read-write
    max_segments_behind: int = Field(default=8, ge=1)


class PgArchiveProbe(Probe):
    kind = "pg_archive"
    Params = PgArchiveParams
    unreachable: ClassVar[Health] = Health.UNKNOWN

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._failed_count: int | None = None  # at the last look

    def check(self) -> ProbeResult:
        p: PgArchiveParams = self.params  # type: ignore[assignment]
        try:
            with session(p.dsn, self.timeout_s) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row and row[0]:
                    return ProbeResult(Health.UNKNOWN, "a standby: its primary archives")
                found = conn.execute(ARCHIVER).fetchone()
        except psycopg.Error as exc:
            return ProbeResult(self.unreachable, f"cannot read pg_stat_archiver: {describe(exc)}")
        assert found is not None  # one row, always
        return self._judge(p, *found)

    def _judge(
        self,
        p: PgArchiveParams,
        archived: int,
        archived_wal: str | None,
        archived_at: datetime | None,
        failed: int,
        failed_wal: str | None,
        failed_at: datetime | None,
        mode: str,
        current_wal: str,
        segment_bytes: int,
    ) -> ProbeResult:
        with self._lock:
            before, self._failed_count = self._failed_count, failed
        behind = segments_behind(archived_wal, current_wal, segment_bytes)
        details: dict[str, Any] = {
            "archived_count": archived,
            "last_archived_wal": archived_wal,
            "last_archived_at": archived_at.isoformat() if archived_at else None,
            "failed_count": failed,
            "last_failed_wal": failed_wal,
            "last_failed_at": failed_at.isoformat() if failed_at else None,
            "current_wal": current_wal,
            "segments_behind": behind,
        }
        waiting = f"; {behind} segments wait" if behind else ""
        if mode == "off":
            return ProbeResult(
                Health.DEGRADED, "archive_mode is off: nothing is archived", details=details
            )
        if failed_at is not None and (archived_at is None or failed_at > archived_at):
            since = f"the last archived at {archived_at:%H:%M:%S}" if archived_at else "none yet"
            return ProbeResult(
                Health.DOWN,
                f"WAL archiving fails: segment {failed_wal} failed at {failed_at:%H:%M:%S} "
                f"({failed} failures in all; {since}){waiting}",
                details=details,
            )
        if behind is not None and behind > p.max_segments_behind:
            return ProbeResult(
                Health.DEGRADED,
                f"WAL archiving falls behind: {behind} segments wait (more than "
                f"{p.max_segments_behind}); the last archived {archived_wal}",
                details=details,
            )
        if before is not None and failed > before:
            return ProbeResult(
                Health.DEGRADED,
                f"{failed - before} archive attempts failed since the last look (the last: "
                f"{failed_wal}); it archives again, the last {archived_wal}",
                details=details,
            )
        if archived_wal is None:
            return ProbeResult(Health.UP, "nothing archived yet, nothing failed", details=details)
        return ProbeResult(
            Health.UP, f"archiving keeps up: the last {archived_wal}", details=details
        )


def segments_behind(archived_wal: str | None, current_wal: str, segment_bytes: int) -> int | None:
    """Whole segments written but not archived: between the last archived one and the one being
    written (which is archived once it is full). None when the last archived file is not a
    segment (a timeline's history file, a backup label) or nothing was archived."""
    last, now = _segno(archived_wal, segment_bytes), _segno(current_wal, segment_bytes)
    if last is None or now is None:
        return None
    return max(0, now - last - 1)


def _segno(name: str | None, segment_bytes: int) -> int | None:
    found = SEGMENT.match(name or "")
    if found is None or name is None or len(name) != 24:
        return None
    per_log = 0x1_0000_0000 // segment_bytes
    return int(found[1], 16) * per_log + int(found[2], 16)
