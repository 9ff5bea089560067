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


def is_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def terminate_pid(pid: int, *, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig`, wait for the process to go, SIGKILL it after `timeout_s`."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    try:
        wait_until(lambda: not is_pid_alive(pid), timeout_s=timeout_s, what=f"exit of pid {pid}")
    except NotReadyError:
        logger.warning("pid %d ignored signal %d for %.1fs; killing it", pid, sig, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not is_pid_alive(pid), timeout_s=5.0, what=f"death of pid {pid}")


@dataclass(slots=True)
class ServerProcess:
    """One server process: its command, log file, readiness check and stop signal."""

    name: str
    argv: Sequence[str]
    log_path: Path
    ready: Callable[[], bool]
    env: Mapping[str, str] | None = None
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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = dict(os.environ if self.env is None else self.env)
        try:
            # A new session: the server outlives a detached `controlplane up`, and a Ctrl-C
            # in the terminal reaches only the supervisor, which stops servers in order.
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                user=self.user,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise LabError(f"{self.name}: cannot run {self.argv[0]!r}: {exc.strerror}") from exc
        finally:
            log.close()
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
        if self.popen is None or self.popen.poll() is not None:
            return
        terminate_pid(self.popen.pid, timeout_s=self.stop_timeout_s, sig=self.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Fault injection: signal the server without waiting for a clean stop."""
        if self.popen is not None and self.popen.poll() is None:
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
