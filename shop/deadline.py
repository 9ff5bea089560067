"""Client-side deadlines for database connections, and the race to the primary.

A server's own timeouts (`statement_timeout`, `lock_timeout`) cannot fire when the server
does not run: a SIGSTOPped or hung PostgreSQL keeps its sockets open, its kernel acknowledges
every byte, and a pooled connection waits on it for as long as it hangs. So the shop keeps
its own clock:

- `Watchdog`: every connection checked out of the pool is armed with a deadline; one that
  overruns it has its socket shut down, so the call blocked on it returns at once with a
  connection error (retried elsewhere by the caller) and the connection leaves the pool.
  TCP keepalives and `tcp_user_timeout` cover the host that is gone altogether (no FIN).
- `PrimaryRace`: a new connection goes first to the node that accepted writes last time; if
  that one has not answered within `race_after_s`, every other node is tried beside it
  (happy eyeballs, RFC 8305) and the first that accepts writes wins. A hung node then costs a
  fraction of a second per new connection, not libpq's connect timeout (2 s at least).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import psycopg

logger = logging.getLogger(__name__)


class Watchdog:
    """Shuts down the socket of any armed connection whose deadline has passed."""

    def __init__(self, *, tick_s: float = 0.05) -> None:
        self.tick_s = tick_s
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, psycopg.Connection[Any]]] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.cut_total = 0

    def arm(self, conn: psycopg.Connection[Any], deadline_s: float) -> None:
        with self._lock:
            self._armed[id(conn)] = (time.monotonic() + deadline_s, conn)
            # Started lazily, and again in a forked child (threads do not survive a fork).
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._watch, name="db-deadline-watchdog", daemon=True
                )
                self._thread.start()

    def disarm(self, conn: Any) -> None:
        """Before the connection is closed or reused: the watchdog never touches a socket
        number that may already belong to someone else."""
        with self._lock:
            self._armed.pop(id(conn), None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.tick_s)
            now = time.monotonic()
            with self._lock:
                expired = [c for key, (at, c) in list(self._armed.items()) if at <= now]
                for conn in expired:
                    del self._armed[id(conn)]
                    self._cut(conn)

    def _cut(self, conn: psycopg.Connection[Any]) -> None:
        try:
            fd = conn.pgconn.socket
        except psycopg.Error:
            return  # already closed: nothing waits on it
        self.cut_total += 1
        logger.warning(
            "database call on %s:%s overran its deadline: connection cut",
            conn.info.host,
            conn.info.port,
        )
        # shutdown() acts on the socket, not the descriptor: a duplicate reaches it.
        with (
            contextlib.suppress(OSError),
            socket.socket(fileno=os.dup(fd)) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)


class PrimaryRace:
    """Connects to whichever of several hosts accepts writes, the last one that did first."""

    def __init__(self, *, race_after_s: float) -> None:
        self.race_after_s = race_after_s
        self._preferred: tuple[str, str] | None = None

    def connect(self, cparams: Mapping[str, Any]) -> psycopg.Connection[Any]:
        hosts = str(cparams.get("host", "")).split(",")
        ports = str(cparams.get("port", "")).split(",")
        if len(hosts) < 2:
            return psycopg.connect(**cparams)
        if len(ports) == 1:
            ports *= len(hosts)
        candidates = list(zip(hosts, ports, strict=True))
        if self._preferred in candidates:
            candidates.remove(self._preferred)
            candidates.insert(0, self._preferred)
        return self._race(cparams, candidates)

    def _race(
        self, cparams: Mapping[str, Any], candidates: list[tuple[str, str]]
    ) -> psycopg.Connection[Any]:
        results: queue.Queue[tuple[tuple[str, str], psycopg.Connection[Any] | Exception]]
        results = queue.Queue()
        won = threading.Event()
        lock = threading.Lock()

        def attempt(host: tuple[str, str]) -> None:
            try:
                conn = psycopg.connect(**{**cparams, "host": host[0], "port": host[1]})
            except Exception as exc:
                results.put((host, exc))
                return
            with lock:
                late = won.is_set()
                won.set()
            if late:  # another node won the race: this connection is not wanted
                conn.close()
                return
            results.put((host, conn))

        def start(host: tuple[str, str]) -> None:
            threading.Thread(target=attempt, args=(host,), daemon=True).start()

        start(candidates[0])
        pending, started = 1, 1
        errors: list[Exception] = []
        timeout_s: float | None = self.race_after_s
        while pending:
            try:
                host, outcome = results.get(timeout=timeout_s)
            except queue.Empty:
                pass  # the first has not answered in time: race the others beside it
            else:
                pending -= 1
                if isinstance(outcome, psycopg.Connection):
                    self._preferred = host
                    return outcome
                errors.append(outcome)
            if started < len(candidates):
                for other in candidates[started:]:
                    start(other)
                pending += len(candidates) - started
                started = len(candidates)
                timeout_s = None  # each attempt ends within its own connect timeout
        raise errors[-1] if errors else psycopg.OperationalError("no host to connect to")
