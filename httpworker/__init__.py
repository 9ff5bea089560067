"""A gunicorn worker that reads each request whole before a thread serves it.

Gunicorn's `gthread` worker gives a connection a thread as soon as its first byte arrives and
reads the rest in that thread, blocking. Twenty clients that send a byte every two seconds held
all sixteen of the shop's threads: `/readyz` went unanswered and the control plane restarted a
healthy shop; the same clients silenced the control plane's API and webhook. Here the worker's
event loop gathers each request (head and body, non-blocking, bounded in size and time) and
only a complete one goes to a thread; a client too slow (408) or too large (413/431) is
answered, in JSON, and closed by the loop, without ever holding a thread.

Both services subclass `WholeRequestWorker` (shop/worker.py, web/worker.py), setting their
body limit, their memory budget and what they say while stopping. It leans on gthread's
internals (`enqueue_req`, the connection's parser and unreader): gunicorn is pinned to the
major version it was written for."""

from __future__ import annotations

import contextlib
import json
import re
import selectors
import time
from collections import deque
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

HEAD_MAX_BYTES = 32 * 1024  # request line and headers (gunicorn refuses far less per line)
READ_TIMEOUT_S = 10.0  # from the first byte asked for to the last byte of the request
CHUNK_BYTES = 64 * 1024
DRAIN_FACTOR = 4  # a body announced up to this many times the limit is read and dropped
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([^\r\n]*)", re.IGNORECASE)
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue", re.IGNORECASE)


class Refused(Exception):
    def __init__(self, status: str, message: str, drain: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.drain = drain  # bytes of body still coming, to read and drop after the answer


def is_complete(data: bytes, body_max: int) -> tuple[bool, bool]:
    """(whole request here, head complete and asking for 100-continue). Raises Refused for a
    request that could never be served whole. Anything malformed counts as complete: gunicorn's
    parser then refuses it as it always did."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > HEAD_MAX_BYTES:
            raise Refused("431 Request Header Fields Too Large", "the request head is too large")
        return False, False
    head, body = data[: end + 2], data[end + 4 :]
    lengths = CONTENT_LENGTH.findall(head)
    if CHUNKED.search(head):
        return _chunked_complete(body, body_max), bool(EXPECT_CONTINUE.search(head))
    if not lengths:
        return True, False
    if len(lengths) > 1 or not lengths[0].strip().isdigit():
        return True, False
    length = int(lengths[0].strip())
    if length > body_max:
        # A client sends its whole body before it reads the answer: one a few times too large
        # is read and dropped (so that it gets its 413, not a reset); a huge one is not.
        drain = length - len(body) if length <= DRAIN_FACTOR * body_max else 0
        raise Refused("413 Content Too Large", f"the body is larger than {body_max} bytes", drain)
    return len(body) >= length, bool(EXPECT_CONTINUE.search(head))


def _chunked_complete(body: bytes, body_max: int) -> bool:
    at = 0
    while True:
        if at > body_max + HEAD_MAX_BYTES:
            raise Refused("413 Content Too Large", f"the body is larger than {body_max} bytes")
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            return False
        try:
            size = int(body[at:line_end].split(b";")[0].strip(), 16)
        except ValueError:
            return True  # malformed: the parser says so
        if size == 0:
            rest = body[line_end + 2 :]
            return rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
        at = line_end + 2 + size + 2
        if at > len(body):
            return False


def answer(status: str, message: str) -> bytes:
    """A whole response that closes the connection, its body `{"error": message}`."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own answer to a request its parser refuses (a control character in a
    header, two Content-Lengths, a head too large), in JSON like every other error of the
    services, instead of an HTML page."""
    util.write_nonblock(sock, answer(f"{status_int} {reason}", mesg or reason))


class WholeRequestWorker(ThreadWorker):  # type: ignore[misc]
    """`gthread`, but a connection reaches a thread only with a whole request in hand."""

    body_max_bytes: int  # a body beyond it is a 413
    # All requests being gathered at once, in bytes: beyond it a connection is answered 503
    # rather than let many half-sent bodies take the service's memory.
    gather_budget_bytes: int
    stopping_message = "the service is stopping"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        util.write_error = write_json_error  # this worker process answers in JSON only
        self.gathering: deque[Any] = deque()  # oldest first: each waits READ_TIMEOUT_S
        self.gathered_bytes = 0

    def enqueue_req(self, conn: Any) -> None:
        # Every way to a thread passes here: a new connection, a kept-alive one readable
        # again, one whose next request was read ahead with the last.
        if getattr(conn, "whole", False):
            conn.whole = False
            super().enqueue_req(conn)
            return
        conn.gathered = bytearray()
        conn.continued = False
        conn.timeout = time.monotonic() + READ_TIMEOUT_S
        conn.sock.setblocking(False)
        if self._verdict(conn) == "wait":
            self.gathering.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: Any, client: Any) -> None:
        try:
            data = conn.sock.recv(CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # gone before its request was whole
            self._stop_gathering(conn)
            self.nr_conns -= 1
            conn.close()
            return
        if getattr(conn, "draining", 0):  # answered already: the rest of its body is dropped
            conn.draining = max(0, conn.draining - len(data))
            if not conn.draining:
                self._stop_gathering(conn)
                self.nr_conns -= 1
                conn.close()
            return
        conn.gathered += data
        self.gathered_bytes += len(data)
        if len(conn.gathered) > HEAD_MAX_BYTES + self.body_max_bytes + CHUNK_BYTES:
            self._stop_gathering(conn)
            self._refuse(conn, "413 Content Too Large", "the request is too large")
            return
        if self.gathered_bytes > self.gather_budget_bytes:
            self._stop_gathering(conn)
            self._refuse(conn, "503 Service Unavailable", "too many requests in flight")
            return
        self._verdict(conn, gathering=True)

    def _verdict(self, conn: Any, gathering: bool = False) -> str:
        """ "wait" for more, or the connection leaves the loop: to a thread with its whole
        request ("whole"), or answered and closed ("refused")."""
        ahead = conn.parser.unreader.buf.getvalue() if conn.parser is not None else b""
        try:
            whole, expects = is_complete(ahead + bytes(conn.gathered), self.body_max_bytes)
        except Refused as exc:
            if exc.drain:
                self._send(conn, answer(exc.status, exc.message))
                self.gathered_bytes -= len(conn.gathered) if gathering else 0
                conn.gathered, conn.draining = bytearray(), exc.drain
                return "wait"
            if gathering:
                self._stop_gathering(conn)
            self._refuse(conn, exc.status, exc.message)
            return "refused"
        if whole:
            if gathering:
                self._stop_gathering(conn)
            conn.prefix, conn.gathered = bytes(conn.gathered), None
            conn.whole = conn.data_ready = True
            self.enqueue_req(conn)
            return "whole"
        if expects and not conn.continued:  # the client waits for it to send its body
            conn.continued = True
            self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        return "wait"

    def _stop_gathering(self, conn: Any) -> None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.poller.unregister(conn.sock)
        with contextlib.suppress(ValueError):
            self.gathering.remove(conn)
            self.gathered_bytes -= len(conn.gathered or b"")

    def _send(self, conn: Any, data: bytes) -> None:
        with contextlib.suppress(OSError):  # non-blocking, best effort: never waits on a client
            conn.sock.send(data)

    def _refuse(self, conn: Any, status: str, message: str) -> None:
        if not getattr(conn, "draining", 0):  # else it has its answer already
            self._send(conn, answer(status, message))
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.gathering and (self.gathering[0].timeout <= now or not self.alive):
            conn = self.gathering[0]
            self._stop_gathering(conn)
            if self.alive:
                self._refuse(conn, "408 Request Timeout", "the request took too long to arrive")
            else:  # stopping: a request not yet whole is not waited for
                self._refuse(conn, "503 Service Unavailable", self.stopping_message)

    def handle(self, conn: Any) -> Any:
        prefix, conn.prefix = getattr(conn, "prefix", b""), b""
        if prefix:
            conn.sock.setblocking(True)
            conn.init()
            unreader = conn.parser.unreader
            unreader.unread(unreader.take_buffered() + prefix)  # after what it read ahead
        return super().handle(conn)
