"""Engines for the two databases, and what counts as a transient database error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors
import sqlalchemy.exc
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import PoolProxiedConnection

from shop.config import ShopSettings


def make_engine(url: str, settings: ShopSettings, *, role: str) -> Engine:
    """An engine whose connections time out fast and carry the shop's lock/statement limits.

    `url` may name several hosts (`?host=a:1&host=b:2&target_session_attrs=read-write`) so
    that new connections follow the primary after a failover.
    """
    options = (
        f"-c lock_timeout={settings.db_lock_timeout_ms} "
        f"-c statement_timeout={settings.db_statement_timeout_ms}"
    )
    return create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=5,
        pool_recycle=600,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_s,
            "options": options,
            "application_name": f"{settings.instance_id}/{role}",
        },
    )


def unwrap(exc: BaseException) -> BaseException:
    """SQLAlchemy wraps driver errors; decisions are made on the driver's own."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def is_busy(exc: BaseException) -> bool:
    """A lock or statement timeout: the row is held (e.g. by an in-doubt transaction)."""
    return isinstance(unwrap(exc), psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled)


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
