"""Process helpers shared by the lab and the local executor: is it alive, stop it, start it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# Servers we start outlive whoever asked for them: keep their Popen objects (so that none is
# collected while its process runs) until they have exited and been reaped.
_children: dict[int, subprocess.Popen[bytes]] = {}


def is_pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:  # ours: let Popen reap it, so that it knows it has exited
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):  # reap it if it is our zombie child
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def runs_program(pid: int, program: str) -> bool:
    """Is `pid` alive and running `program`? (Some servers rewrite their title: compare names.)"""
    if not is_pid_alive(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return not program or Path(raw.split(" ", 1)[0]).name == Path(program).name


def started_as(argv: Sequence[str]) -> list[int]:
    """Live processes that lead their own process group (as `spawn` starts them) and whose
    command line is exactly `argv`: a server someone started but nobody recorded."""
    want = [a.encode() for a in argv]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0") != want:
                continue
            if os.getpgid(pid) != pid:
                continue  # a worker forked by the server, not the server
        except (OSError, ProcessLookupError):
            continue
        found.append(pid)
    return found


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_pid_alive(pid):
            return True
        time.sleep(0.05)
    return not is_pid_alive(pid)


def terminate_pid(pid: int, *, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig`, wait for the process to go, SIGKILL it after `timeout_s`."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    if not wait_for_exit(pid, timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for_exit(pid, 5.0)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env_overrides: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session, appending to its log."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env_overrides or {})},
            cwd=cwd,
            user=user,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc
