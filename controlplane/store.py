"""All SQL of the control plane, as small named functions over a Session.

Reads run in `read(factory)`: a plain (deferred) transaction, which on SQLite in WAL mode never
waits for the write lock nor holds it. Writes run in `transaction(factory)`: `BEGIN IMMEDIATE`
on SQLite, so a writer waits for the lock (busy timeout) instead of failing when it upgrades.
On PostgreSQL both are ordinary transactions. `with_retries` retries a whole write transaction
on "database is locked" and other operational errors.

State changes are compare-and-set (`UPDATE ... WHERE id = ? AND state = ?`, go on only if one
row changed) or guarded by a unique constraint, so two workers, two control planes or two
deliveries of one webhook can never do one thing twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Engine,
    Row,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from controlplane.models import (
    UNMATCHED,
    ActionRun,
    ActionState,
    Alert,
    AuditEntry,
    Backup,
    ClusterFacts,
    Incident,
    IncidentState,
    Lease,
    ProbeRun,
    Silence,
    TimelineEvent,
)
from controlplane.sources import ALERT_PREFIX, AlertStatus, Source
from probes.base import Health

logger = logging.getLogger(__name__)
T = TypeVar("T")
READ_ONLY = "shopguard_read_only"  # an execution option: this connection only reads
LOCK_WAIT_MS = "shopguard_lock_wait_ms"  # an execution option: how long a writer waits
DEFAULT_LOCK_WAIT_MS = 30_000


# -- engine and schema --------------------------------------------------------------------------
def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _make_private(make_url(url).database)
        engine = create_engine(
            url,
            connect_args={"timeout": DEFAULT_LOCK_WAIT_MS / 1000, "check_same_thread": False},
            pool_size=10,
        )

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_conn: Any, record: Any) -> None:
            dbapi_conn.isolation_level = None  # we send BEGIN ourselves, below
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def on_begin(conn: Any) -> None:
            options = conn.get_execution_options()
            if options.get(READ_ONLY):
                # A reader: WAL gives it a snapshot, with no lock that a writer waits for.
                conn.exec_driver_sql("BEGIN")
            else:
                wait_ms = options.get(LOCK_WAIT_MS, DEFAULT_LOCK_WAIT_MS)
                if conn.info.get(LOCK_WAIT_MS, DEFAULT_LOCK_WAIT_MS) != wait_ms:
                    conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(wait_ms)}")
                    conn.info[LOCK_WAIT_MS] = wait_ms
                # IMMEDIATE: take the write lock up front, so a writer waits (busy timeout)
                # instead of failing when it upgrades a read lock.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def _make_private(path: str | None) -> None:
    """The state store is readable by its owner only: created 0600 before SQLite opens it
    (SQLite gives its -wal and -shm files the database file's mode)."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return  # SQLite will say what is wrong with it
    try:
        with suppress(PermissionError):  # not ours to change
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("controlplane") / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(
    factory: sessionmaker[Session], *, lock_wait_s: float | None = None
) -> Iterator[Session]:
    """A write transaction: keep it short, it holds SQLite's one write lock. It waits up to
    `lock_wait_s` for that lock (30 s if None), then raises OperationalError ("database is
    locked"): work that can wait for a later turn asks for a short wait, so that others'
    writes never hold it up for long (SQLite's busy handler sleeps in growing steps, up to
    100 ms, so a waiter among many short writers may wait much longer than any one holds it).
    On PostgreSQL, there is no such lock: `lock_wait_s` changes nothing."""
    waits: dict[str, Any] = {}  # the factory's own bind, unless this one waits less
    if lock_wait_s is not None:
        options = {LOCK_WAIT_MS: round(lock_wait_s * 1000)}
        waits["bind"] = factory.kw["bind"].execution_options(**options)
    with factory(**waits) as session, session.begin():
        yield session


@contextmanager
def read(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A read transaction: never takes nor waits for the write lock (do not write in it)."""
    bind = factory.kw["bind"]
    with factory(bind=bind.execution_options(**{READ_ONLY: True})) as session, session.begin():
        yield session


def is_locked(exc: OperationalError) -> bool:
    """SQLite's answer to a writer that waited its whole busy timeout."""
    return "database is locked" in str(exc.orig)


def with_retries(call: Callable[[], T], *, what: str, deadline_s: float = 120.0) -> T:
    """Run `call` (a whole write transaction) again on "database is locked", a lost
    connection or any other operational error, with jittered backoff, up to `deadline_s`."""
    retrying = Retrying(
        stop=stop_after_delay(deadline_s),
        wait=wait_random_exponential(multiplier=0.05, max=2),
        retry=retry_if_exception_type(OperationalError),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            return call()
    raise AssertionError(f"unreachable: {what}")  # Retrying either returns or re-raises


def _upsert(session: Session) -> Any:
    return postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert  # type: ignore[union-attr]


# -- probe runs ---------------------------------------------------------------------------------
def record_probe_runs(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Probe runs in one statement (the probe runner's batch): each row a ProbeRun's columns
    (probe, kind, target, health, latency_ms, summary, details, at)."""
    if rows:
        session.execute(insert(ProbeRun), [{**r, "details": dict(r["details"])} for r in rows])


def recent_probe_runs(session: Session, probe: str, limit: int) -> list[ProbeRun]:
    """Newest first. In the order of the (probe, at) index, so that reading a probe's last
    few runs costs the same however long its history is; the statement is built once (the
    loop reads every probe's runs each cycle: a thousand calls at a thousand targets)."""
    return list(session.scalars(_recent_probe_runs(), {"probe": probe, "limit": limit}))


@lru_cache(maxsize=1)
def _recent_probe_runs() -> Any:
    return (
        select(ProbeRun)
        .where(ProbeRun.probe == bindparam("probe"))
        .order_by(ProbeRun.at.desc(), ProbeRun.id.desc())
        .limit(bindparam("limit"))
    )


def last_good_before_incident(session: Session, incident_id: int | None) -> datetime | None:
    """When the incident's probe last started a passing check before the failure was seen:
    the state it read then was sound (damage made before it would have shown)."""
    incident = session.get(Incident, incident_id) if incident_id is not None else None
    if incident is None:
        return None
    # An alert on a probe's metric (cp_probe_up) carries the probe's name as a label.
    probe = incident.kind if incident.source == Source.PROBE else incident.labels.get("probe")
    if not probe:
        return None
    run = session.scalars(
        select(ProbeRun)
        .where(
            ProbeRun.probe == probe,
            ProbeRun.health == Health.UP,
            ProbeRun.at < incident.detected_at,
        )
        .order_by(ProbeRun.at.desc())
        .limit(1)
    ).first()
    return None if run is None else run.at - timedelta(milliseconds=run.latency_ms)


def prune_probe_runs(session: Session, keep_per_probe: int) -> int:
    """Bounded history: keep the newest `keep_per_probe` runs of each probe. Walks the
    (probe, at) index: a probe's cut-off costs `keep_per_probe` index steps, not a sort of
    its history."""
    removed = 0
    for probe in session.scalars(select(ProbeRun.probe).distinct()):
        cutoff = session.execute(
            select(ProbeRun.at, ProbeRun.id)
            .where(ProbeRun.probe == probe)
            .order_by(ProbeRun.at.desc(), ProbeRun.id.desc())
            .offset(keep_per_probe)
            .limit(1)
        ).first()
        if cutoff is not None:
            at, run_id = cutoff
            result = session.execute(
                delete(ProbeRun).where(
                    ProbeRun.probe == probe,
                    (ProbeRun.at < at) | ((ProbeRun.at == at) & (ProbeRun.id <= run_id)),
                )
            )
            removed += result.rowcount  # type: ignore[attr-defined]
    return removed


# -- alerts -------------------------------------------------------------------------------------
def upsert_alert(session: Session, alert: Mapping[str, Any], received_at: datetime) -> None:
    """The latest status of an alert by fingerprint; a repeated delivery only counts."""
    upsert_alerts(session, [alert], received_at)


def upsert_alerts(
    session: Session, alerts: Sequence[Mapping[str, Any]], received_at: datetime
) -> None:
    """Many alerts in one statement, run for each (a webhook delivery holds the write lock
    once, briefly: the statement is compiled once and cached, the rows go to the driver's
    executemany). A fingerprint twice in one delivery: its last status wins."""
    if not alerts:
        return
    latest = {a["fingerprint"]: a for a in alerts}
    values = [{**a, "received_at": received_at, "deliveries": 1} for a in latest.values()]
    session.execute(_alert_upsert(session.bind.dialect.name), values)  # type: ignore[union-attr]


@lru_cache(maxsize=2)
def _alert_upsert(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Alert.metadata.tables[Alert.__tablename__])
    return stmt.on_conflict_do_update(
        index_elements=[Alert.fingerprint],
        set_={
            "status": stmt.excluded.status,
            "labels": stmt.excluded.labels,
            "annotations": stmt.excluded.annotations,
            "starts_at": stmt.excluded.starts_at,
            "ends_at": stmt.excluded.ends_at,
            "received_at": stmt.excluded.received_at,
            "deliveries": Alert.deliveries + 1,
        },
    )


def _incident_of(alert: Any) -> Any:
    return Incident.fingerprint == literal(ALERT_PREFIX) + alert.fingerprint


def _with_open_incident() -> Any:
    return (
        select(Incident.id)
        .where(_incident_of(Alert), Incident.state == IncidentState.OPEN)
        .exists()
    )


ALERT_COLUMNS = (
    Alert.fingerprint,
    Alert.alertname,
    Alert.status,
    Alert.labels,
    Alert.annotations,
    Alert.starts_at,
)


def alerts_to_open(session: Session, limit: int) -> list[Row[Any]]:
    """Firing alerts without an open incident (at most `limit`): what a cycle may open."""
    query = (
        select(*ALERT_COLUMNS)
        .where(Alert.status == AlertStatus.FIRING, ~_with_open_incident())
        .order_by(Alert.received_at)
        .limit(limit)
    )
    return list(session.execute(query))


def alerts_to_close(session: Session, since: datetime, limit: int) -> list[Row[Any]]:
    """Alerts resolved since `since` whose incident is still open (at most `limit`). Walked
    from the open alert incidents (by the alerts' key), not from the resolved alerts: a flood
    of resolutions for alerts never opened costs nothing here."""
    prefix = len(ALERT_PREFIX) + 1
    query = (
        select(*ALERT_COLUMNS)
        .select_from(Incident)
        .join(Alert, Alert.fingerprint == func.substr(Incident.fingerprint, prefix))
        .where(
            Incident.state == IncidentState.OPEN,
            Incident.source == Source.ALERT,
            Alert.status == AlertStatus.RESOLVED,
            Alert.received_at >= since,
        )
        .limit(limit)
    )
    return list(session.execute(query))


def alerts_by_fingerprint(session: Session, fingerprints: Sequence[str]) -> list[Row[Any]]:
    if not fingerprints:
        return []
    return list(session.execute(select(*ALERT_COLUMNS).where(Alert.fingerprint.in_(fingerprints))))


def alert(session: Session, fingerprint: str) -> Alert | None:
    return session.get(Alert, fingerprint)


# -- incidents ----------------------------------------------------------------------------------
def open_incidents(session: Session) -> list[Incident]:
    return list(session.scalars(select(Incident).where(Incident.state == IncidentState.OPEN)))


def escalated_incidents(session: Session) -> list[Incident]:
    """The open incidents a human was told about."""
    return list(
        session.scalars(
            select(Incident).where(
                Incident.state == IncidentState.OPEN, Incident.escalated_at.is_not(None)
            )
        )
    )


def count_open_incidents(session: Session) -> int:
    return int(
        session.scalar(select(func.count()).where(Incident.state == IncidentState.OPEN)) or 0
    )


def incidents_to_plan(
    session: Session, fingerprints: Sequence[str], limit: int
) -> tuple[list[Incident], bool]:
    """The open incidents a cycle looks at, and whether `limit` left some out: every probe
    incident; the alert incidents some policy may act on (or not matched yet, at most
    `limit`) that its policy has not acted on, or whose runs all ended to be tried again;
    those of `fingerprints`."""
    is_open = Incident.state == IncidentState.OPEN
    acted = (
        select(ActionRun.id)
        .where(
            ActionRun.incident_id == Incident.id,
            ActionRun.requested_by == literal("policy:") + Incident.policy,
            ActionRun.retry.is_(False),
        )
        .exists()
    )
    found = {
        i.id: i
        for i in session.scalars(select(Incident).where(is_open, Incident.source != "alert"))
    }
    matched = session.scalars(
        select(Incident).where(
            is_open,
            Incident.source == Source.ALERT,
            Incident.policy.is_not(None),
            Incident.policy != UNMATCHED,
            ~acted,
        )
    )
    found.update({i.id: i for i in matched})
    unmatched = list(
        session.scalars(
            select(Incident)
            .where(is_open, Incident.source == Source.ALERT, Incident.policy == UNMATCHED)
            .limit(limit)
        )
    )
    found.update({i.id: i for i in unmatched})
    for start in range(0, len(fingerprints), 500):
        chunk = fingerprints[start : start + 500]
        found.update(
            {
                i.id: i
                for i in session.scalars(
                    select(Incident).where(is_open, Incident.fingerprint.in_(chunk))
                )
            }
        )
    return list(found.values()), len(unmatched) >= limit


def open_incident(session: Session, **values: Any) -> Incident | None:
    """None when an open incident with this fingerprint exists already (deduplicated)."""
    try:
        with session.begin_nested():
            incident = Incident(state=IncidentState.OPEN, **values)
            session.add(incident)
            session.flush()
    except IntegrityError:
        return None
    return incident


def open_incidents_many(session: Session, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Many incidents in one statement; an open one with the same fingerprint is kept (the
    unique index). Returns fingerprint -> id of those opened."""
    if not rows:
        return {}
    stmt = (  # the table, not the class: a None (no policy) stays None, not the default
        _upsert(session)(Incident.__table__)
        .on_conflict_do_nothing()
        .returning(Incident.fingerprint, Incident.id)
    )
    values = [{"state": IncidentState.OPEN, "flapping": False, **row} for row in rows]
    return {fp: incident_id for fp, incident_id in session.execute(stmt, values)}


def resolve_incidents(session: Session, incident_ids: Sequence[int], now: datetime) -> list[int]:
    """Those of `incident_ids` still open become resolved (compare-and-set); returns them."""
    if not incident_ids:
        return []
    result = session.execute(
        update(Incident)
        .where(Incident.id.in_(incident_ids), Incident.state == IncidentState.OPEN)
        .values(state=IncidentState.RESOLVED, resolved_at=now)
        .returning(Incident.id)
        .execution_options(synchronize_session=False)
    )
    return list(result.scalars())


def set_incident_policies(session: Session, policies: Mapping[int, str | None]) -> None:
    """The policy matched to each incident not matched yet (a statement per policy)."""
    by_policy: dict[str | None, list[int]] = {}
    for incident_id, policy in policies.items():
        by_policy.setdefault(policy, []).append(incident_id)
    for policy, ids in by_policy.items():
        session.execute(
            update(Incident)
            .where(Incident.id.in_(ids), Incident.policy == UNMATCHED)
            .values(policy=policy)
            .execution_options(synchronize_session=False)
        )


def unmatch_open_incidents(session: Session) -> None:
    """Every open incident is matched against the policies anew (they may have changed)."""
    session.execute(
        update(Incident).where(Incident.state == IncidentState.OPEN).values(policy=UNMATCHED)
    )


def resolve_incident(session: Session, incident_id: int, now: datetime) -> bool:
    result = session.execute(
        update(Incident)
        .where(Incident.id == incident_id, Incident.state == IncidentState.OPEN)
        .values(state=IncidentState.RESOLVED, resolved_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def mark_escalated(session: Session, incident_id: int, now: datetime) -> bool:
    """Compare-and-set: True only for the one caller that escalated the open incident first."""
    result = session.execute(
        update(Incident)
        .where(
            Incident.id == incident_id,
            Incident.state == IncidentState.OPEN,
            Incident.escalated_at.is_(None),
        )
        .values(escalated_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def set_flapping(session: Session, incident_id: int, flapping: bool) -> None:
    session.execute(update(Incident).where(Incident.id == incident_id).values(flapping=flapping))


def mark_incident(session: Session, incident_id: int, **values: Any) -> None:
    session.execute(update(Incident).where(Incident.id == incident_id).values(**values))


def add_timelines(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Many timeline events in one statement (rows: incident_id, kind, message, at, data)."""
    if rows:
        session.execute(insert(TimelineEvent), [{"data": {}, **row} for row in rows])


def add_timeline(
    session: Session,
    incident_id: int,
    kind: str,
    message: str,
    at: datetime,
    data: Mapping[str, Any] | None = None,
) -> None:
    session.add(
        TimelineEvent(
            incident_id=incident_id, kind=kind, message=message, at=at, data=dict(data or {})
        )
    )


def incident_timeline(session: Session, incident_id: int) -> list[TimelineEvent]:
    return list(
        session.scalars(
            select(TimelineEvent)
            .where(TimelineEvent.incident_id == incident_id)
            .order_by(TimelineEvent.id)
        )
    )


def list_incidents(session: Session, *, state: str | None, limit: int) -> list[Incident]:
    query = select(Incident).order_by(Incident.id.desc()).limit(limit)
    if state:
        query = query.where(Incident.state == state)
    return list(session.scalars(query))


# -- action runs --------------------------------------------------------------------------------
def create_action_run(session: Session, **values: Any) -> ActionRun | None:
    """None when this action already exists for this incident (never twice)."""
    try:
        with session.begin_nested():
            run = ActionRun(**values)
            session.add(run)
            session.flush()
    except IntegrityError:
        return None
    return run


def change_run_state(
    session: Session,
    run_id: int,
    expected: ActionState | Sequence[ActionState],
    new: ActionState,
    **values: Any,
) -> bool:
    """Compare-and-set: True only for the one caller that moved it from `expected`."""
    allowed = [expected] if isinstance(expected, ActionState) else list(expected)
    result = session.execute(
        update(ActionRun)
        .where(ActionRun.id == run_id, ActionRun.state.in_(allowed))
        .values(state=new, **values)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def mark_run(session: Session, run_id: int, **values: Any) -> None:
    session.execute(update(ActionRun).where(ActionRun.id == run_id).values(**values))


def claim_run(session: Session, run_id: int, owner: str, now: datetime) -> bool:
    """pending -> running, only if this run is still pending (compare-and-set) and no other
    action runs on its target (the partial unique index): the per-target lock."""
    try:
        with session.begin_nested():
            return change_run_state(
                session,
                run_id,
                ActionState.PENDING,
                ActionState.RUNNING,
                owner=owner,
                started_at=now,
            )
    except IntegrityError:
        return False


def expire_unapproved_runs(session: Session, incident_id: int, now: datetime) -> list[int]:
    """The incident's runs still awaiting approval become skipped; returns their ids."""
    return [run_id for _, run_id in expire_unapproved_runs_of(session, [incident_id], now)]


def expire_unapproved_runs_of(
    session: Session, incident_ids: Sequence[int], now: datetime
) -> list[tuple[int, int]]:
    """The incidents' runs still awaiting approval become skipped; returns (incident, run)."""
    if not incident_ids:
        return []
    found = session.execute(
        select(ActionRun.incident_id, ActionRun.id).where(
            ActionRun.incident_id.in_(incident_ids),
            ActionRun.state == ActionState.AWAITING_APPROVAL,
        )
    )
    return [
        (incident_id, run_id)
        for incident_id, run_id in found
        if incident_id is not None
        and change_run_state(
            session,
            run_id,
            ActionState.AWAITING_APPROVAL,
            ActionState.SKIPPED,
            finished_at=now,
            output={"skipped": "the incident resolved before approval"},
        )
    ]


def runs_in_state(session: Session, state: ActionState) -> list[ActionRun]:
    return list(session.scalars(select(ActionRun).where(ActionRun.state == state)))


def runs_since(session: Session, since: datetime) -> list[ActionRun]:
    return list(session.scalars(select(ActionRun).where(ActionRun.created_at >= since)))


def runs_of_incidents(session: Session, incident_ids: Sequence[int]) -> list[ActionRun]:
    if not incident_ids:
        return []
    return list(session.scalars(select(ActionRun).where(ActionRun.incident_id.in_(incident_ids))))


def list_runs(
    session: Session, *, incident_id: int | None, limit: int, action: str | None = None
) -> list[ActionRun]:
    query = select(ActionRun).order_by(ActionRun.id.desc()).limit(limit)
    if incident_id is not None:
        query = query.where(ActionRun.incident_id == incident_id)
    if action is not None:
        query = query.where(ActionRun.action == action)
    return list(session.scalars(query))


def count_runs_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(ActionRun.state, func.count()).group_by(ActionRun.state))
    return {state: count for state, count in rows}


# -- audit --------------------------------------------------------------------------------------
def audit(
    session: Session,
    *,
    actor: str,
    verb: str,
    message: str,
    at: datetime,
    action_run_id: int | None = None,
    incident_id: int | None = None,
    data: Mapping[str, Any] | None = None,
    duration_ms: float | None = None,
) -> None:
    session.add(
        AuditEntry(
            actor=actor,
            verb=verb,
            message=message,
            at=at,
            action_run_id=action_run_id,
            incident_id=incident_id,
            data=dict(data or {}),
            duration_ms=duration_ms,
        )
    )


def audit_of_run(session: Session, run_id: int) -> list[AuditEntry]:
    return list(
        session.scalars(
            select(AuditEntry).where(AuditEntry.action_run_id == run_id).order_by(AuditEntry.id)
        )
    )


# -- silences -----------------------------------------------------------------------------------
def create_silence(session: Session, **values: Any) -> Silence:
    silence = Silence(**values)
    session.add(silence)
    session.flush()
    return silence


def active_silences(session: Session, now: datetime) -> list[Silence]:
    return list(
        session.scalars(select(Silence).where(Silence.starts_at <= now, Silence.ends_at > now))
    )


def expire_silence(session: Session, silence_id: int, now: datetime) -> bool:
    result = session.execute(
        update(Silence).where(Silence.id == silence_id, Silence.ends_at > now).values(ends_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


# -- leadership ---------------------------------------------------------------------------------
def hold_lease(session: Session, name: str, owner: str, ttl_s: float, now: datetime) -> bool:
    """Take or renew the lease: only if free, expired, or already ours (compare-and-set)."""
    until = now + timedelta(seconds=ttl_s)
    result = session.execute(
        update(Lease)
        .where(Lease.name == name, (Lease.owner == owner) | (Lease.until < now))
        .values(owner=owner, until=until)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return True
    try:
        with session.begin_nested():
            session.add(Lease(name=name, owner=owner, until=until))
            session.flush()
    except IntegrityError:
        return False  # someone else holds it
    return True


def lease_holder(session: Session, name: str) -> Lease | None:
    return session.get(Lease, name)


# -- backup catalog -----------------------------------------------------------------------------
def add_backup(session: Session, **values: Any) -> Backup:
    backup = Backup(**values)
    session.add(backup)
    session.flush()
    return backup


def list_backups(session: Session) -> list[Backup]:
    """Newest first."""
    return list(session.scalars(select(Backup).order_by(Backup.started_at.desc())))


def backup_by_label(session: Session, label: str) -> Backup | None:
    return session.scalars(select(Backup).where(Backup.label == label)).first()


def delete_backup(session: Session, label: str) -> None:
    session.execute(delete(Backup).where(Backup.label == label))


# -- cluster facts: changed by compare-and-set only ------------------------------------------
FACT_FIELDS = frozenset({"synchronous", "leader", "roles", "history", "last_good_primary"})


def cluster_facts(session: Session, cluster: str) -> ClusterFacts | None:
    return session.get(ClusterFacts, cluster)


def change_facts(
    session: Session,
    cluster: str,
    *,
    version: int,
    changes: Mapping[str, Any],
    by: str,
    now: datetime,
) -> int | None:
    """Write `changes` if the cluster's facts are still at `version` (0: none recorded yet);
    returns the new version, or None when someone changed them first (nothing written)."""
    unknown = set(changes) - FACT_FIELDS
    if unknown:
        raise ValueError(f"no such cluster facts: {sorted(unknown)}")
    values = {**changes, "updated_at": now, "updated_by": by[:200]}
    if version == 0:
        try:
            with session.begin_nested():
                unset = {f: None for f in ("synchronous", "leader", "last_good_primary")}
                fresh = {**unset, "roles": {}, "history": [], **values}
                session.add(ClusterFacts(cluster=cluster, version=1, **fresh))
        except IntegrityError:
            return None
        return 1
    done = session.execute(
        update(ClusterFacts)
        .where(ClusterFacts.cluster == cluster, ClusterFacts.version == version)
        .values(version=version + 1, **values)
    )  # the session's copy of the row, if it holds one, is brought up to date too
    return version + 1 if done.rowcount == 1 else None  # type: ignore[attr-defined]


def untouched_since(session: Session, target: str, since: datetime) -> bool:
    """No run on `target` has been running at any moment since `since` (one running now, or
    one that finished after it, might have changed what a look begun then saw)."""
    busy = session.execute(
        select(ActionRun.id)
        .where(
            ActionRun.target == target,
            ActionRun.started_at.is_not(None),
            (ActionRun.finished_at.is_(None)) | (ActionRun.finished_at >= since),
            ActionRun.state.not_in([ActionState.SKIPPED, ActionState.DRY_RUN]),
        )
        .limit(1)
    ).first()
    return busy is None
