"""The control plane's state: probe runs, incidents and their timelines, alerts, action runs,
the audit log, silences and the leader lease (SQLAlchemy 2.0; SQLite or PostgreSQL)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on SQLite too (which stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: the control plane stores UTC-aware datetimes only")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        from datetime import UTC

        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


UNMATCHED = "?"  # Incident.policy of an incident no policy has been matched against yet


class IncidentState(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class ActionState(StrEnum):
    PENDING = "pending"  # waiting for the loop to start it
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # gave up: escalated
    SKIPPED = "skipped"  # precheck said no (nothing to do, or unsafe)
    DRY_RUN = "dry_run"
    ABANDONED = "abandoned"  # the control plane died mid-action: marked failed-safe, not re-run
    REJECTED = "rejected"  # an operator said no to a run awaiting approval


TERMINAL_ACTION_STATES = frozenset(
    {ActionState.SUCCEEDED, ActionState.FAILED, ActionState.SKIPPED, ActionState.DRY_RUN,
     ActionState.ABANDONED, ActionState.REJECTED}
)  # fmt: skip


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class ProbeRun(Base):
    __tablename__ = "probe_runs"
    __table_args__ = (Index("ix_probe_runs_probe_at", "probe", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    probe: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(100))
    health: Mapped[str] = mapped_column(String(10))
    latency_ms: Mapped[float]
    summary: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime]


class Incident(Base):
    __tablename__ = "incidents"
    # At most one open incident per fingerprint: deduplication enforced by the database.
    __table_args__ = (
        Index(
            "uq_incidents_open_fingerprint",
            "fingerprint",
            unique=True,
            sqlite_where=text("state = 'open'"),
            postgresql_where=text("state = 'open'"),
        ),
        Index(
            "ix_incidents_open_policy",
            "policy",
            sqlite_where=text("state = 'open'"),
            postgresql_where=text("state = 'open'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(20))  # probe | alert
    target: Mapped[str] = mapped_column(String(100))
    severity: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), default=IncidentState.OPEN)
    summary: Mapped[str] = mapped_column(Text)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    flapping: Mapped[bool] = mapped_column(default=False)
    detected_at: Mapped[datetime]  # first failure seen (probe) or startsAt (alert)
    opened_at: Mapped[datetime]
    action_started_at: Mapped[datetime | None]
    recovered_at: Mapped[datetime | None]  # verified recovered
    resolved_at: Mapped[datetime | None]
    # When a human was told that healing did not work (a limit held it, a precheck found it
    # unsafe, or nothing succeeded within the policy's `escalate_after_s`): told once.
    escalated_at: Mapped[datetime | None]
    # The policy that may act on it, matched when it opened: None for none, UNMATCHED until
    # the loop has matched it (the loop reads only open incidents some policy may act on).
    policy: Mapped[str | None] = mapped_column(
        String(100), default=UNMATCHED, server_default=UNMATCHED
    )


class TimelineEvent(Base):
    __tablename__ = "timeline_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), index=True)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Alert(Base):
    """The latest state of each Alertmanager alert, by fingerprint."""

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_status_received_at", "status", "received_at"),)

    fingerprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    alertname: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # firing | resolved
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    annotations: Mapped[dict[str, Any]] = mapped_column(default=dict)
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime | None]
    received_at: Mapped[datetime]
    deliveries: Mapped[int] = mapped_column(default=1)


class ActionRun(Base):
    __tablename__ = "action_runs"
    # One run per try of a remediation for one incident: enforced by the database, so two
    # cycles (or two control planes) deciding the same retry write it once.
    __table_args__ = (
        UniqueConstraint("incident_id", "action", "try_number", name="uq_action_try_per_incident"),
        # One action at a time per target: a lock the database enforces, even across
        # concurrent transactions on PostgreSQL.
        Index(
            "uq_action_running_per_target",
            "target",
            unique=True,
            sqlite_where=text("state = 'running'"),
            postgresql_where=text("state = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"), index=True)
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), index=True)
    requested_by: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    output: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(default=0)
    owner: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Which try of this action for its incident (1, 2, ...): a run that ended with `retry`
    # set (declined "not now", or failed in a way a new start may mend) is followed, after a
    # backoff and while its incident lasts, by the next try, a run of its own.
    try_number: Mapped[int] = mapped_column(default=1, server_default="1")
    retry: Mapped[bool] = mapped_column(default=False, server_default=false())


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(100))
    verb: Mapped[str] = mapped_column(String(40))
    action_run_id: Mapped[int | None] = mapped_column(ForeignKey("action_runs.id"), index=True)
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    duration_ms: Mapped[float | None]


class Silence(Base):
    __tablename__ = "silences"

    id: Mapped[int] = mapped_column(primary_key=True)
    matchers: Mapped[dict[str, Any]] = mapped_column(default=dict)  # label -> exact value
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(100))
    comment: Mapped[str] = mapped_column(Text, default="")


class Lease(Base):
    """Leader election: the row's owner acts; it renews before `until`, others wait it out."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    until: Mapped[datetime]


class ClusterFacts(Base):
    """What a safe action on a database cluster depends on, kept as Patroni keeps `/sync`,
    `/leader` and `/history` in its DCS: whether every acknowledged commit is on a standby
    (`synchronous`; None: unknown, so no failover may promote), who leads, each node's role,
    the timeline history and the last primary known good (writable, synchronous). One row per
    cluster (the actions' target), changed only by compare-and-set on `version`
    (`store.change_facts`), never through an executor."""

    __tablename__ = "cluster_facts"

    cluster: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int]
    synchronous: Mapped[bool | None]
    leader: Mapped[str | None] = mapped_column(String(100))
    roles: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # [{"timeline": n, "leader": name, "at": iso time, "why": text}, ...], oldest first
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)
    last_good_primary: Mapped[str | None] = mapped_column(String(100))
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(200))


class Backup(Base):
    """The backup catalog: a backup counts as verified only after a passing restore drill."""

    __tablename__ = "backups"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(128))
    verified_at: Mapped[datetime | None] = mapped_column(index=True)
    drill: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Role(StrEnum):
    """What a dashboard user or API token may do; each includes the ones before it."""

    VIEWER = "viewer"  # read
    OPERATOR = "operator"  # request, approve, reject, silence, back up
    ADMIN = "admin"  # users and API tokens


class User(Base):
    """A dashboard login: a password hash (werkzeug scrypt), never the password."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime]
    disabled: Mapped[bool] = mapped_column(default=False)
    # A session that began before this is void (logged out, disabled, a new password).
    sessions_valid_after: Mapped[datetime | None] = mapped_column(default=None)


class ApiToken(Base):
    """A named API token: its SHA-256 only (shown once, when created), revoked by an admin."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
