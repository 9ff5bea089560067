"""Each node's state (primary, standby, refused, unanswered) and the leader: the writable node
on the highest timeline, as after a promotion; and a held session that tells when it drops."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import pq


class NodeState(StrEnum):
    PRIMARY = "primary"  # accepts writes
    STANDBY = "standby"  # in recovery
    REFUSED = "refused"  # nothing listens, or it is starting or stopping: a definite "down"
    UNANSWERED = "unanswered"  # no answer within the timeout: hung, stopped or partitioned


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    state: NodeState
    detail: str = ""
    timeline: int | None = None  # a primary's; a standby's received timeline
    receiving: str | None = None  # a standby's WAL receiver status ("streaming")
    standbys: tuple[tuple[str, str, str], ...] = ()  # a primary's (name, state, sync_state)
    sync_names: str = ""
    # A primary's (standby name, bytes of WAL it has yet to replay; None: unknown yet)
    lag_bytes: tuple[tuple[str, int | None], ...] = ()
    # A standby's: seconds since its WAL receiver last heard from its primary (None: unknown).
    heard_s_ago: float | None = None

    @property
    def sync_standbys(self) -> list[str]:
        return [n for n, state, sync in self.standbys if state == "streaming" and sync == "sync"]


# Observations run here so that one can be given up on at `timeout_s`, below libpq's 2 s
# connect minimum. Each still ends on its own within ~2 s (connect timeout, or its socket cut
# by its deadline), so the pool cannot fill up with observations of a hung node.
_OBSERVERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="pg-observe")
LOOK_DEADLINE_S = 2.5


def observe(name: str, dsn: str, timeout_s: float) -> NodeView:
    """The node's state within `timeout_s` on our own clock: a stopped server (whose own
    statement_timeout cannot fire) is UNANSWERED then, whatever the connect minimum."""
    future = _OBSERVERS.submit(_observe, name, dsn, timeout_s)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        return NodeView(name, NodeState.UNANSWERED, f"no answer within {timeout_s:g}s")


def session(
    dsn: str, timeout_s: float, application_name: str | None = None
) -> psycopg.Connection[Any]:
    """An autocommit session whose connect and every statement end within about `timeout_s`
    (libpq takes whole seconds for the connect, at least one; a server that stops answering
    once connected needs `deadline` as well). Raises psycopg.Error (`state_of` tells a
    refusal from no answer)."""
    return psycopg.connect(
        dsn,
        connect_timeout=max(1, round(timeout_s)),
        autocommit=True,
        options=f"-c statement_timeout={int(timeout_s * 1000)}",
        application_name=application_name,  # None: the DSN's, or libpq's default
    )


def _observe(name: str, dsn: str, timeout_s: float) -> NodeView:
    cut = Cut()
    try:
        with (
            session(dsn, timeout_s) as conn,
            deadline(max(timeout_s, LOOK_DEADLINE_S), conn, cut=cut),
        ):
            return _look(name, conn)
    except psycopg.Error as exc:
        text = str(exc)
        return NodeView(
            name,
            state_of(exc, cut=cut.fired),
            text.strip().splitlines()[0] if text.strip() else type(exc).__name__,
        )


def state_of(exc: psycopg.Error, *, cut: bool = False) -> NodeState:
    """What a failed look says: no answer in time (a timeout, or `cut`: our own deadline cut
    the session), so hung, stopped or partitioned; else a definite refusal: nothing listens,
    it is starting or stopping, or it closed the session itself (its process died: a hung
    server closes nothing)."""
    timed_out = cut or "timeout" in str(exc).lower()
    return NodeState.UNANSWERED if timed_out else NodeState.REFUSED


@dataclass(slots=True)
class Cut:
    fired: bool = False  # the deadline passed and the sessions were cut


@contextlib.contextmanager
def deadline(
    seconds: float, *conns: psycopg.Connection[Any], cut: Cut | None = None
) -> Iterator[Cut]:
    """Connected, then the server stops: its statement_timeout cannot fire, and only a cut
    socket frees the caller. Cut them all at `seconds` on our own clock (and say so in
    `cut`: an error after it is no answer, not the server's doing)."""
    cut = cut or Cut()

    def cut_all() -> None:
        cut.fired = True
        for conn in conns:
            _cut(conn)

    timer = threading.Timer(seconds, cut_all)
    timer.daemon = True
    timer.start()
    try:
        yield cut
    finally:
        timer.cancel()


def _cut(conn: psycopg.Connection[Any]) -> None:
    """shutdown() of the socket (through a duplicate descriptor): the blocked read returns."""
    with (
        contextlib.suppress(OSError, psycopg.Error),
        socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock,
    ):
        sock.shutdown(socket.SHUT_RDWR)


def _look(name: str, conn: psycopg.Connection[Any]) -> NodeView:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row and row[0]:
        # received_tli: a standby stuck on an old timeline "streams" in a loop, to no end.
        wal = conn.execute(
            "SELECT status, received_tli,"
            " extract(epoch FROM clock_timestamp() - last_msg_receipt_time)"
            " FROM pg_stat_wal_receiver"
        ).fetchone()
        if wal is None:
            return NodeView(name, NodeState.STANDBY)
        return NodeView(
            name,
            NodeState.STANDBY,
            timeline=int(wal[1] or 0),
            receiving=str(wal[0]),
            heard_s_ago=None if wal[2] is None else float(wal[2]),
        )
    row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    timeline = int(str(row[0])[:8], 16) if row else None
    rows = conn.execute(
        "SELECT application_name, state, sync_state,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) FROM pg_stat_replication"
    ).fetchall()
    standbys = tuple((str(r[0]), str(r[1]), str(r[2])) for r in rows)
    lag_bytes = tuple((str(r[0]), None if r[3] is None else int(r[3])) for r in rows)
    names = conn.execute("SHOW synchronous_standby_names").fetchone()
    return NodeView(
        name,
        NodeState.PRIMARY,
        timeline=timeline,
        standbys=standbys,
        sync_names=str(names[0]) if names else "",
        lag_bytes=lag_bytes,
    )


def observe_all(nodes: Mapping[str, str], timeout_s: float) -> list[NodeView]:
    """Every node at once: a hung node costs its timeout, not the sum of them."""
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        futures = [pool.submit(observe, name, dsn, timeout_s) for name, dsn in nodes.items()]
        return [f.result() for f in futures]


def leader_of(views: Sequence[NodeView]) -> NodeView | None:
    """The writable node on the highest timeline; None if there is none or it is a tie."""
    writable = sorted(
        (v for v in views if v.state is NodeState.PRIMARY),
        key=lambda v: v.timeline or 0,
        reverse=True,
    )
    if not writable or (len(writable) > 1 and writable[0].timeline == writable[1].timeline):
        return None
    return writable[0]


def follows(view: NodeView, leader: NodeView) -> bool:
    """A standby streaming the leader's timeline."""
    return (
        view.state is NodeState.STANDBY
        and view.receiving == "streaming"
        and view.timeline == leader.timeline
    )


def is_writable(conn: psycopg.Connection[Any], timeout_s: float) -> bool:
    """Not in recovery (False too when it closes the session). Raises psycopg.Error when the
    node does not answer within `timeout_s` on our own clock (a stopped server's
    statement_timeout cannot fire)."""
    with deadline(max(timeout_s, LOOK_DEADLINE_S), conn) as cut:
        try:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error as exc:
            if state_of(exc, cut=cut.fired) is NodeState.UNANSWERED:
                raise
            return False  # it closed the session: it does not lead, whatever it was
    return row is not None and not row[0]


def wait_dropped(conn: psycopg.Connection[Any], keep_on: Callable[[], bool], poll_s: float) -> bool:
    """Wait, on an idle session, until the server closes it (True: its process died, or the
    server ended it) or `keep_on()` turns false (False), looking every `poll_s`. A node that
    stops answering (SIGSTOP, a partition) closes nothing and sends nothing: it is no drop."""
    while keep_on():
        try:
            ready, _, _ = select.select([conn.pgconn.socket], [], [], poll_s)
            if ready:
                # EOF or a reset raises; a message (a notice, a parameter's new value) does not.
                conn.pgconn.consume_input()
        except (psycopg.OperationalError, OSError, ValueError):
            return True
        if conn.pgconn.status != pq.ConnStatus.OK:
            return True
    return False
