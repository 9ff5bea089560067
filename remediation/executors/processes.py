"""Process helpers shared by the lab and the local executor: find, stop, kill and start them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# Servers we start outlive whoever asked for them: keep their Popen objects (so that none is
# collected while its process runs) until they have exited and been reaped.
_children: dict[int, subprocess.Popen[bytes]] = {}
# Set by `spawn` to the spawner's pid: a server started by another (a shop the control plane
# restarted) is a process of its own, not a part of its parent.
SPAWNED_BY = "SHOPGUARD_SPAWNED_BY"


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


def started_as(argv: Sequence[str], uid: int | None = None) -> list[int]:
    """Live processes that lead their own process group (as `spawn` starts them) and whose
    command line is exactly `argv` (and, given `uid`, that run as that user): a server
    someone started but nobody recorded. Anyone may run a process with a given command line:
    the owner tells the component's from another user's."""
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
            if uid is not None and entry.stat().st_uid != uid:
                continue
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
    """Send `sig` (and SIGCONT: a stopped process could not act on it), wait for the process
    to go, SIGKILL it after `timeout_s`. This process alone: `stop_tree` stops a server."""
    try:
        os.kill(pid, sig)
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return
    if not wait_for_exit(pid, timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for_exit(pid, 5.0)


def open_log(log_path: Path) -> BinaryIO:
    """A server's log, for appending; the owner's only: it may name its clients, queries
    and configuration."""
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


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
    with open_log(log_path) as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env_overrides or {}), SPAWNED_BY: str(os.getpid())},
            cwd=cwd,
            user=user,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc


def spawn_detached(
    argv: Sequence[str],
    *,
    log_path: Path,
    env_overrides: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    timeout_s: float = 10.0,
) -> int:
    """Start a server that is nobody's child, as a service manager would: a short-lived shell
    starts it in a session of its own and exits, so it is re-parented to init (or the nearest
    subreaper). A control plane that dies, or is killed with its whole process tree, takes
    none of the servers it restarted with it (their environment cannot tell them apart:
    Redis and PostgreSQL write their process titles over it). Returns the server's pid."""
    if shutil.which(argv[0]) is None:  # the shell would only log it, and return a pid
        raise OSError(f"no program {argv[0]!r}")
    with open_log(log_path) as log:
        # The server writes to the log (its stderr too); the shell says its pid on stderr,
        # a pipe that closes when the shell exits: the server does not hold it.
        launcher = subprocess.Popen(
            ["sh", "-c", 'setsid "$@" 2>&1 & echo $! >&2', "spawn", *argv],
            stdout=log,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env_overrides or {}), SPAWNED_BY: str(os.getpid())},
            cwd=cwd,
            user=user,
        )
        try:
            _, said = launcher.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            raise OSError(f"the launcher of {argv[0]} did not return") from None
    text = said.decode(errors="replace").strip()
    if launcher.returncode != 0 or not text.isdigit():
        raise OSError(f"could not start {argv[0]}: {text or launcher.returncode}")
    pid = int(text)
    # `$!` is the shell's child before it has exec'd setsid and then the server: on a busy
    # machine it may still be `sh` or `setsid` when the launcher returns, and whoever asks
    # "does it run?" (`runs_program`) would hear no. The pid is returned once it runs the
    # server's program (or is gone: a server that failed at once).
    deadline = time.monotonic() + timeout_s
    while not runs_program(pid, argv[0]) and is_pid_alive(pid):
        if time.monotonic() > deadline:
            raise OSError(f"{argv[0]} (pid {pid}) did not start within {timeout_s:g}s")
        time.sleep(0.005)
    return pid


# -- every process of an instance --------------------------------------------------------------
# A server's main pid is not all of it: PostgreSQL's backends each call setsid() (no process
# group holds them), and they outlive a killed postmaster, re-parented; a stopped (SIGSTOP)
# gunicorn worker holds the port after its master is gone. So an instance is found as systemd's
# control group would hold it: the main process's descendants, plus every process whose working
# directory is the instance's data directory (PostgreSQL chdir()s into it, and orphaned
# backends keep it).


@dataclass(frozen=True, slots=True)
class Proc:
    """One process, as /proc shows it. `started` (clock ticks after boot) tells it from a
    later process that reuses its pid; `ppid` changes when it is orphaned (not compared)."""

    pid: int
    started: int
    ppid: int = field(default=0, compare=False)
    session: int = field(default=0, compare=False)


Finder = Callable[[Mapping[int, Proc]], set[Proc]]


def read_proc(pid: int) -> Proc | None:
    """`pid` as /proc/<pid>/stat shows it; None when it is gone or a zombie (holds nothing)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    if fields[0] in ("Z", "X", "x"):
        return None
    return Proc(pid, started=int(fields[19]), ppid=int(fields[1]), session=int(fields[3]))


def process_table() -> dict[int, Proc]:
    """Every live process, by pid."""
    table: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (proc := read_proc(int(entry.name))) is not None:
            table[proc.pid] = proc
    return table


def _is_spawned_by(proc: Proc, parent: int) -> bool:
    if proc.session != proc.pid:  # `spawn` starts a session; so does each PostgreSQL backend
        return False
    try:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{SPAWNED_BY}={parent}".encode() in environ  # backends inherit their parent's


def descendants(pids: Iterable[int], table: Mapping[int, Proc]) -> set[Proc]:
    """The processes `pids` (those alive) and all their descendants, except servers one of them
    started with `spawn` (and theirs): those are stopped on their own."""
    children: dict[int, list[Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found = {table[pid] for pid in pids if pid in table}
    todo = list(found)
    while todo:
        parent = todo.pop().pid
        for child in children.get(parent, []):
            if child not in found and not _is_spawned_by(child, parent):
                found.add(child)
                todo.append(child)
    return found


def ancestors(pid: int, table: Mapping[int, Proc]) -> set[Proc]:
    """`pid` and the processes above it."""
    found = set()
    while pid in table and table[pid] not in found:
        found.add(table[pid])
        pid = table[pid].ppid
    return found


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:  # gone, or another user's (when not root)
        return None


def in_directory(directory: str | Path) -> Finder:
    """A finder of the processes whose working directory is `directory`."""
    real = os.path.realpath(directory)
    return lambda table: {proc for proc in table.values() if _cwd(proc.pid) == real}


def _is_path_under(arg: str, root: str, cwd: str | None) -> bool:
    if arg.startswith("-") and "=" in arg:
        arg = arg.split("=", 1)[1]  # --storage.tsdb.path=DIR/...
    if not arg.startswith("/"):
        if cwd is None or "/" not in arg:
            return False
        arg = os.path.join(cwd, arg)
    return os.path.normpath(arg).startswith(root + os.sep)


def under_directory(root: str | Path, *, spare: Collection[int] = ()) -> Finder:
    """A finder of the processes that work in `root` or below it, or name a path below it on
    their command line (a `postgres -D ROOT/pg/pg0`); never this process, its ancestors (the
    shell that runs `shoplab down --data-dir ROOT`) or the pids in `spare`."""
    tops = {os.path.realpath(root), os.path.normpath(os.path.abspath(root))}
    if os.sep in tops:
        raise ValueError("refusing to look for processes under /")

    def find(table: Mapping[int, Proc]) -> set[Proc]:
        skip = set(spare) | {proc.pid for proc in ancestors(os.getpid(), table)}
        found = set()
        for proc in table.values():
            if proc.pid in skip:
                continue
            cwd = _cwd(proc.pid)
            if cwd is not None and any(cwd == top or cwd.startswith(top + os.sep) for top in tops):
                found.add(proc)
                continue
            try:
                argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [arg.decode(errors="replace") for arg in argv if arg]
            if any(_is_path_under(arg, top, cwd) for arg in args for top in tops):
                found.add(proc)
        return found

    return find


def instance_processes(pid: int | None, data_dir: str | Path | None = None) -> set[Proc]:
    """Every process of one server: `pid` and its descendants, and whatever works in its data
    directory (a dead postmaster's backends). Take it before killing any: an orphan is
    re-parented."""
    table = process_table()
    found = descendants([pid] if pid is not None else [], table)
    if data_dir is not None:
        found |= in_directory(data_dir)(table)
    return {proc for proc in found if proc.pid != os.getpid()}


def is_alive(proc: Proc) -> bool:
    if not is_pid_alive(proc.pid):  # reaps it if it is our zombie child
        return False
    now = read_proc(proc.pid)
    return now is not None and now.started == proc.started


def signal_all(procs: Iterable[Proc], sig: int) -> None:
    for proc in procs:
        if is_alive(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, sig)


def describe_processes(procs: Iterable[Proc]) -> str:
    """For logs and errors: "pid 12 (postgres: checkpointer), pid 13 (...)"."""
    named = []
    for proc in sorted(procs, key=lambda p: p.pid):
        try:
            raw = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        except OSError:
            raw = b""
        command = raw.replace(b"\0", b" ").decode(errors="replace").strip()[:80]
        named.append(f"pid {proc.pid} ({command or '?'})")
    return ", ".join(named)


def kill_tree(
    procs: Iterable[Proc], *, find: Finder | None = None, timeout_s: float = 10.0
) -> set[Proc]:
    """SIGKILL every one of `procs` (a stopped process dies of it too), then look again (their
    descendants, and what `find` turns up) and kill what is found, until nothing is left or
    `timeout_s` passes. Returns the survivors: none, unless something resists SIGKILL."""
    known = set(procs)
    deadline = time.monotonic() + timeout_s
    while True:
        known = {proc for proc in known if is_alive(proc)}
        table = process_table()
        known |= descendants([proc.pid for proc in known], table)
        if find is not None:
            known |= find(table)
        known = {proc for proc in known if proc.pid != os.getpid()}
        if not known or time.monotonic() >= deadline:
            return known
        signal_all(known, signal.SIGKILL)
        time.sleep(0.02)


def stop_tree(
    pid: int,
    *,
    sig: int,
    timeout_s: float,
    data_dir: str | Path | None = None,
) -> set[Proc]:
    """Stop a server as systemd does: `sig` to its main process and SIGCONT to every process of
    it (a stopped one could not act on its signal), wait up to `timeout_s` for the main process
    to exit, then SIGKILL whatever is left of it (kill_tree). Returns the survivors."""
    members = instance_processes(pid, data_dir)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    signal_all(members, signal.SIGCONT)
    main = [proc for proc in members if proc.pid == pid]
    deadline = time.monotonic() + timeout_s
    while main and is_alive(main[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return kill_tree(members, find=in_directory(data_dir) if data_dir is not None else None)
