"""Client-side bound SQL sent as one simple query per round trip, read without cursors."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import psycopg.errors
from psycopg import generators, pq
from psycopg.adapt import Transformer

RESULT_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


def run_batch(conn: psycopg.Connection[Any], query: bytes) -> list[pq.abc.PGresult]:
    """Sends `query` as one simple query and returns each statement's result, or raises the
    error of the statement that failed. Waiting and reading run in psycopg's C generators:
    no cursor, no per-statement Python (psycopg's cursors cost more CPU per order than the
    database's work for it did)."""
    conn.pgconn.send_query(query)
    return results_of(conn)


def results_of(conn: psycopg.Connection[Any]) -> list[pq.abc.PGresult]:
    """Waits for (and sends the rest of) the query sent on `conn`; see run_batch."""
    results: list[pq.abc.PGresult] = conn.wait(generators.execute(conn.pgconn))
    for result in results:
        if result.status not in RESULT_OK:
            raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    return results


class Literals:
    """SQL literals for one connection: text escaped by libpq (PQescapeLiteral)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.escaping = pq.Escaping(conn.pgconn)
        self.encoding = conn.info.encoding

    def text(self, value: str) -> bytes:
        return self.escaping.escape_literal(value.encode(self.encoding))

    @staticmethod
    def uuid(value: uuid.UUID) -> bytes:
        return b"'%s'::uuid" % str(value).encode()


def load_value(conn: psycopg.Connection[Any], result: pq.abc.PGresult) -> Any:
    """The first column of the first row, as psycopg would load it (e.g. a timestamptz)."""
    transformer = Transformer(conn)
    transformer.set_pgresult(result)
    row = transformer.load_row(0, tuple)
    assert row is not None
    return row[0]


def commit_prepared(gid: str) -> bytes:
    # A gid is shop:<instance id>:<hex>:<database>, the instance id [A-Za-z0-9_.-]: no quote.
    assert "'" not in gid and "\\" not in gid
    return f"COMMIT PREPARED '{gid}'".encode()
