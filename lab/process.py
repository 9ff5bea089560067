"""ServerProcess: start a server, poll it ready with a deadline, stop it; plus process helpers."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import LabError, NotReadyError
from remediation.executors.processes import (
    describe_processes,
    instance_processes,
    kill_tree,
    signal_all,
    spawn,
    stop_tree,
)

logger = logging.getLogger(__name__)


def wait_until(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    interval_s: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll `check` until it returns True; raise NotReadyError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            if check():
                return
        except Exception as exc:  # a poll that raises is simply "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise NotReadyError(f"{what} not reached within {timeout_s:.1f}s{detail}")
        time.sleep(interval_s)


def is_port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        return sock.connect_ex((host, port)) == 0


def is_port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(slots=True)
class ServerProcess:
    """One server process: its command, log file, readiness check and stop signal."""

    name: str
    argv: Sequence[str]
    log_path: Path
    ready: Callable[[], bool]
    env_overrides: Mapping[str, str] | None = None  # on top of this process's environment
    user: str | None = None
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    ready_timeout_s: float = 30.0
    stop_timeout_s: float = 15.0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> ServerProcess:
        try:
            # A new session: the server outlives a detached `shoplab up`, and a Ctrl-C
            # in the terminal reaches only the supervisor, which stops servers in order.
            self.popen = spawn(
                self.argv,
                log_path=self.log_path,
                env_overrides=self.env_overrides,
                cwd=self.cwd,
                user=self.user,
            )
        except FileNotFoundError as exc:
            raise LabError(f"{self.name}: cannot run {self.argv[0]!r}: {exc.strerror}") from exc
        logger.info("%s started (pid %d), log %s", self.name, self.popen.pid, self.log_path)
        return self

    def wait_ready(self) -> ServerProcess:
        def check() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise LabError(
                    f"{self.name} exited with code {self.popen.returncode} before it was ready; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            return self.ready()

        try:
            wait_until(check, timeout_s=self.ready_timeout_s, what=f"{self.name} ready")
        except NotReadyError as exc:
            raise NotReadyError(
                f"{exc}; last lines of {self.log_path}:\n{tail(self.log_path)}"
            ) from None
        return self

    def is_running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        """The stop signal to the server, SIGCONT to all of it (a stopped process could not act
        on it), SIGKILL to whatever of it is left after `stop_timeout_s`: its workers too."""
        if self.popen is None or self.popen.poll() is not None:
            return
        survivors = stop_tree(self.popen.pid, sig=self.stop_signal, timeout_s=self.stop_timeout_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1)
        if survivors:
            raise LabError(f"{self.name} survived SIGKILL: {describe_processes(survivors)}")

    def kill(self, sig: int = signal.SIGKILL, *, whole_tree: bool = False) -> None:
        """Fault injection: signal the server without waiting for a clean stop. The main
        process alone (a crash of it), or with `whole_tree` every process of it (a hang:
        SIGSTOP; SIGKILL then waits until none is left)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        if whole_tree:
            members = instance_processes(self.popen.pid)
            if sig == signal.SIGKILL:
                kill_tree(members)
            else:
                signal_all(members, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
        if sig == signal.SIGKILL:
            self.popen.wait(timeout=10)


def tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "(no log yet)"
        raise
    return "\n".join(text.splitlines()[-lines:])
