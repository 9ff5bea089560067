"""What the restore (restore.py) and its full variant (full_restore.py) share: the params an
action and an operator give, the point a restore goes back to, and its proof."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pgcluster import invariants
from remediation import pitr, restore_export, restore_point
from remediation.base import ActionContext, ActionError, parse_params


class RestoreParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: dict[str, str] = Field(min_length=1)
    backups_dir: str
    archive_dir: str
    scratch_dir: str
    to: datetime | str | None = None  # the operator's point: an aware time or an LSN
    full: bool = False  # a full restore to `to`, discarding `accept_loss` orders
    accept_loss: int | None = Field(default=None, ge=0)
    export_dir: str | None = None  # default: beside the scratch directory
    orders_db: str = "orders"
    inventory_db: str = "inventory"
    cache: dict[str, Any] | None = None  # cache_flush params, to drop what the damage cached
    restore_timeout_s: float = Field(default=600, gt=0)
    repair_tables: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "orders": ["orders", "tx_decisions"],
            "inventory": ["stock_movements", "stock_adjustments"],
        }
    )
    archive_timeout_s: float = Field(default=30, gt=0)

    @field_validator("to", mode="before")
    @classmethod
    def _point(cls, to: Any) -> Any:
        return point_of(to)


class RestoreOperatorParams(BaseModel):
    """What an operator may give: a point, and for a full restore the loss accepted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    to: datetime | str | None = None
    full: bool = False
    accept_loss: int | None = Field(default=None, ge=0)

    @field_validator("to", mode="before")
    @classmethod
    def _point(cls, to: Any) -> Any:
        return point_of(to)


def point_of(to: Any) -> Any:
    """An LSN stays text; any other text is an ISO time, which must carry its zone."""
    if not isinstance(to, str):
        return to
    if restore_point.LSN.match(to):
        return to
    try:
        when = datetime.fromisoformat(to.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("`to` is neither a time nor an LSN (e.g. 0/3000160)") from None
    if when.tzinfo is None:
        raise ValueError("`to` needs a time zone (e.g. 2026-11-25T13:00:00Z)")
    return when


def params_of(ctx: ActionContext) -> RestoreParams:
    p = parse_params(RestoreParams, ctx, "restore")
    if p.full and (p.to is None or p.accept_loss is None):
        raise ActionError(
            "a full restore needs `to` and `accept_loss` (the loss an incident's restore "
            "reported for that point)",
            permanent=True,
        )
    return p


@dataclass(frozen=True, slots=True)
class Point:
    target: pitr.Target  # what recovery stops just before
    backup: pitr.BackupInfo
    why: str

    @property
    def label(self) -> str:
        return self.target if isinstance(self.target, str) else self.target.isoformat()


@dataclass(frozen=True, slots=True)
class Proof:
    """The point, proven in a scratch copy, and what a full restore to it would discard."""

    point: Point
    loss: restore_export.Loss
    export: Path
    reapply: str


def dbs(p: RestoreParams, dsn: str) -> dict[str, str]:
    return {
        p.orders_db: pitr.dsn_with(dsn, dbname=p.orders_db),
        p.inventory_db: pitr.dsn_with(dsn, dbname=p.inventory_db),
    }


def verdict_of(p: RestoreParams, dsn: str) -> invariants.Verdict:
    conns = dbs(p, dsn)
    return invariants.check(conns[p.orders_db], conns[p.inventory_db], timeout_s=10)
