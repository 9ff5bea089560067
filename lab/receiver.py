"""The lab's webhook recorder: every JSON POST it receives, whatever its path, appended as one
line to a JSON Lines file, with the time received. What a human would have been told.

Run as a server of the stack (`python -m lab.receiver --port P --out FILE`); the control plane's
notifications reach it at `/controlplane`. Bodies above `--max-body-bytes` are refused (413),
a body that is not JSON too (400): nothing half-read is recorded."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lab.layout import HOST, StackLayout
from lab.monitoring import http_ok
from lab.process import ServerProcess

MAX_BODY_BYTES = 256 * 1024
# The path each sender posts to: the record says who spoke.
CONTROLPLANE_PATH = "/controlplane"


def receiver_url(layout: StackLayout, path: str) -> str:
    return f"http://{HOST}:{layout.receiver_port}{path}"


def receiver_server(layout: StackLayout) -> ServerProcess:
    """The recorder as one of the stack's servers, writing DIR/notifications.jsonl."""
    return ServerProcess(
        name="receiver",
        argv=[
            sys.executable,
            "-m",
            "lab.receiver",
            "--port",
            str(layout.receiver_port),
            "--out",
            str(layout.notifications),
        ],
        log_path=layout.logs / "receiver.log",
        ready=lambda: http_ok(receiver_url(layout, "/healthz")),
    )


class Recorder:
    """Appends one JSON line per record to `path` (created 0600), one writer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        self._fd = fd

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)  # O_APPEND: one write, one whole line

    def close(self) -> None:
        os.close(self._fd)


def make_handler(recorder: Recorder, max_body_bytes: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lab-receiver"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._answer(HTTPStatus.OK, {"status": "ok"})
            else:
                self._answer(HTTPStatus.NOT_FOUND, {"error": "POST JSON to any path"})

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
                return
            if int(length) > max_body_bytes:
                self.close_connection = True  # the body is left unread
                self._answer(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"over {max_body_bytes} bytes"}
                )
                return
            raw = self.rfile.read(int(length))
            try:
                body = json.loads(raw)
            except ValueError:
                self._answer(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
                return
            recorder.append(
                {"received_at": datetime.now(UTC).isoformat(), "path": self.path, "body": body}
            )
            self._answer(HTTPStatus.OK, {"recorded": True})

        def _answer(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def serve(host: str, port: int, out: Path, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    recorder = Recorder(out)
    server = ThreadingHTTPServer((host, port), make_handler(recorder, max_body_bytes))
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        recorder.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.out, args.max_body_bytes)


if __name__ == "__main__":
    main()
