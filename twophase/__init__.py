"""The shop's two-phase commit, resolved in one place: the shop (at its start, and `shop
resolve-in-doubt`) and the control plane's in-doubt action (remediation/in_doubt.py) both
finish a prepared transaction here. A leaf: it imports only psycopg, so both may use it
while neither imports the other.

Each prepared transaction is `<txid>:<database>` (the shop's coordinator prepares one on
each database). The decision log (`tx_decisions` in the orders database) decides: the first
decision written wins, so 'abort' is written first unless 'commit' is there already (and a
slow coordinator can then never commit it), and the prepared half is committed or rolled
back as the log says. Resolving again is harmless."""

from __future__ import annotations

from typing import Any, Literal

import psycopg
import psycopg.errors

Decision = Literal["commit", "abort"]

IN_DOUBT = (
    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE %s"
    " AND prepared <= now() - make_interval(secs => %s) ORDER BY prepared"
)


def in_doubt(conn: psycopg.Connection[Any], pattern: str, min_age_s: float) -> list[str]:
    """The prepared transactions of `conn`'s database whose gid is LIKE `pattern`, prepared at
    least `min_age_s` ago (younger ones may belong to a coordinator still at work), oldest
    first."""
    return [str(r[0]) for r in conn.execute(IN_DOUBT, (pattern, min_age_s))]


def txid_of(gid: str) -> str:
    """The distributed transaction a prepared half belongs to (`<txid>:<database>`)."""
    return gid.rsplit(":", 1)[0]


def participant_gid(txid: str, database: str) -> str:
    return f"{txid}:{database}"


def decision_or_abort(log: psycopg.Connection[Any], txid: str, decided_by: str) -> Decision:
    """The logged decision for `txid`; 'abort', written now, if there was none. `log` is an
    autocommit connection to the orders database."""
    log.execute(
        "INSERT INTO tx_decisions (gid, decision, decided_by) VALUES (%s, 'abort', %s)"
        " ON CONFLICT (gid) DO NOTHING",
        (txid, decided_by),
    )
    row = log.execute("SELECT decision FROM tx_decisions WHERE gid = %s", (txid,)).fetchone()
    return "commit" if row is not None and row[0] == "commit" else "abort"


def finish(conn: psycopg.Connection[Any], gid: str, decision: Decision) -> bool:
    """COMMIT or ROLLBACK PREPARED `gid` as decided; False if someone finished it first."""
    was = conn.autocommit
    conn.autocommit = False  # tpc_* on a connection outside a transaction
    try:
        if decision == "commit":
            conn.tpc_commit(gid)
        else:
            conn.tpc_rollback(gid)
    except psycopg.errors.UndefinedObject:
        conn.rollback()
        return False
    finally:
        if conn.autocommit != was and not conn.info.transaction_status:
            conn.autocommit = was
    return True


def resolve(
    log: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
    gid: str,
    decided_by: str,
) -> Decision | None:
    """One prepared half on `conn` finished as the log (on `log`) decides: the decision, or
    None when someone else finished it first."""
    decision = decision_or_abort(log, txid_of(gid), decided_by)
    return decision if finish(conn, gid, decision) else None
