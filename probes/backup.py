"""BackupProbe: the age of the newest verified backup in the control plane's backup catalog
(a backup is verified only by a passing restore drill)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from probes.base import Health, Params, Probe, ProbeResult, describe, down


class BackupParams(Params):
    database_url: str  # the control plane's state store (SQLAlchemy URL)
    max_age_s: float = Field(default=26 * 3600, gt=0)


def as_utc(value: Any) -> datetime:
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(stamp, datetime)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


class BackupProbe(Probe):
    kind = "backup"
    Params = BackupParams

    def check(self) -> ProbeResult:
        p: BackupParams = self.params  # type: ignore[assignment]
        connect_args: dict[str, Any] = (
            {"timeout": self.timeout_s}
            if p.database_url.startswith("sqlite")
            else {"connect_timeout": max(1, round(self.timeout_s))}
        )
        engine = create_engine(p.database_url, poolclass=NullPool, connect_args=connect_args)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    text(
                        "SELECT max(verified_at), count(*) FROM backups"
                        " WHERE verified_at IS NOT NULL"
                    )
                ).one()
        except SQLAlchemyError as exc:
            return down(describe(getattr(exc, "orig", None) or exc))
        finally:
            engine.dispose()
        if row[0] is None:
            return down("no verified backup", verified_backups=0)
        newest = as_utc(row[0])
        age_s = (datetime.now(UTC) - newest).total_seconds()
        details = {
            "newest_verified_at": newest.isoformat(),
            "age_s": round(age_s),
            "verified_backups": int(row[1]),
        }
        if age_s > p.max_age_s:
            return ProbeResult(
                Health.DOWN, f"newest verified backup is {age_s / 3600:.1f} h old", details=details
            )
        return ProbeResult(Health.UP, f"verified backup {age_s / 60:.0f} min old", details=details)
