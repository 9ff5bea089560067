"""Engines for the two databases, and what counts as a transient database error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.pool import PoolProxiedConnection

from shop.config import ShopSettings
from shop.deadline import PrimaryRace, Watchdog

# One watchdog per process: a thread that wakes every 50 ms, whatever the number of engines.
WATCHDOG = Watchdog()


def make_engine(
    url: str, settings: ShopSettings, *, role: str, with_deadline: bool = True
) -> Engine:
    """An engine whose connections time out fast and carry the shop's lock/statement limits.

    `url` may name several hosts (`?host=a:1&host=b:2&target_session_attrs=read-write`) so
    that new connections follow the primary after a failover; they race to it (PrimaryRace).
    With `with_deadline`, every checkout of a connection is bounded by `db_deadline_s` on
    the client's clock (Watchdog): a hung server costs a request that long, not as long as
    it hangs. (`shop init-db` goes without: a schema load may take longer.)
    """
    options = (
        f"-c lock_timeout={settings.db_lock_timeout_ms} "
        f"-c statement_timeout={settings.db_statement_timeout_ms}"
    )
    engine = create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=5,
        pool_recycle=600,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_s,
            "options": options,
            "application_name": f"{settings.instance_id}/{role}",
            # A host that is gone (no FIN, no RST): the kernel gives up on it in seconds.
            "keepalives": 1,
            "keepalives_idle": 1,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": settings.db_tcp_user_timeout_ms,
        },
    )
    race = PrimaryRace(race_after_s=settings.db_race_after_s)

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        return race.connect(cparams)

    if with_deadline:
        deadline_s = settings.db_deadline_s

        @event.listens_for(engine, "checkout")
        def arm(dbapi_conn: Any, record: Any, proxy: Any) -> None:
            WATCHDOG.arm(dbapi_conn, deadline_s)

        for name in ("checkin", "invalidate", "soft_invalidate", "close", "detach"):
            event.listen(engine, name, _disarm)
    return engine


def _disarm(dbapi_conn: Any, *args: Any) -> None:
    if dbapi_conn is not None:
        WATCHDOG.disarm(dbapi_conn)


def forget_connections(*engines: Engine) -> None:
    """After a connection failed: its pooled siblings most likely lead to the same dead or
    demoted node, and each would cost a deadline to find out. Start every engine afresh
    (connections still checked out are dropped when they come back)."""
    for engine in engines:
        engine.dispose(close=False)


def unwrap(exc: BaseException) -> BaseException:
    """SQLAlchemy wraps driver errors; decisions are made on the driver's own."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def is_busy(exc: BaseException) -> bool:
    """A lock or statement timeout: the row is held (e.g. by an in-doubt transaction)."""
    return isinstance(unwrap(exc), psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled)


def is_connection_lost(exc: BaseException) -> bool:
    """The node is gone, hung, or no longer the primary: no pooled connection to it is good."""
    err = unwrap(exc)
    if is_busy(err) or isinstance(err, psycopg.errors.TransactionRollback):
        return False
    return isinstance(err, psycopg.OperationalError | psycopg.errors.ReadOnlySqlTransaction)


def is_transient(exc: BaseException) -> bool:
    """Worth a retry on a new connection: the server went away, restarted or was demoted."""
    err = unwrap(exc)
    if is_busy(err):
        return False
    if isinstance(err, psycopg.errors.ReadOnlySqlTransaction | psycopg.errors.SerializationFailure):
        return True
    if isinstance(err, psycopg.errors.DeadlockDetected):
        return True
    return isinstance(err, psycopg.OperationalError)


@contextlib.contextmanager
def raw_connection(
    engine: Engine, *, autocommit: bool = False
) -> Iterator[psycopg.Connection[Any]]:
    """A pooled psycopg connection; discarded from the pool if anything goes wrong on it."""
    proxy: PoolProxiedConnection = engine.raw_connection()
    conn: psycopg.Connection[Any] = proxy.driver_connection  # type: ignore[assignment]
    try:
        conn.autocommit = autocommit
        yield conn
    except BaseException:
        # The connection may sit inside a failed or two-phase transaction: never reuse it.
        proxy.invalidate()
        raise
    else:
        if conn.autocommit != autocommit or conn.info.transaction_status:
            proxy.invalidate()
        else:
            conn.autocommit = False
            proxy.close()
