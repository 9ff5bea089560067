"""LocalExecutor: acts on processes of this host, each started from a recipe in the targets
file (`[executors.NAME] kind = "local"`), as a service manager would: its command line, OS
user, environment, log and data directory. A process it did not start is found by its exact
command line (it leads its own session: `spawn_detached`); a PostgreSQL instance's every
process, by its data directory. The lab's executor (`lab.py`) is the same, its recipes and
pids kept in the lab's stack.json."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from remediation.executors.base import Cancel, ExecutorError
from remediation.executors.params import LocalComponent, LocalParams
from remediation.executors.processes import (
    Finder,
    Proc,
    describe_processes,
    in_directory,
    instance_processes,
    is_pid_alive,
    kill_tree,
    runs_program,
    spawn_detached,
    started_as,
    stop_tree,
)

logger = logging.getLogger(__name__)


POSTGRES_ROLES = ("primary", "standby")


def instance_dir(comp: Mapping[str, Any]) -> str | None:
    """The directory whose every process belongs to the component (it is killed with it): a
    PostgreSQL node's data directory (its backends each call setsid(): no process tree or
    group holds them). For any other role, none: a shared working directory is no proof."""
    data_dir = comp.get("data_dir")
    return str(data_dir) if data_dir and comp.get("role") in POSTGRES_ROLES else None


def uid_of(user: str | None) -> int:
    """The uid a component runs as: its recipe's user, else this process's."""
    if user is None:
        return os.geteuid()
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ExecutorError(f"no OS user {user!r} on this host") from None


def running_pid(comp: Mapping[str, Any]) -> int | None:
    """A component's live pid: the recorded one if it still runs the recorded program, else
    the one process started from the component's own command line by its user (started but
    never recorded here); None when neither runs. ExecutorError if its user is gone."""
    pid = comp.get("pid")
    if isinstance(pid, int) and runs_program(pid, comp.get("argv0", "")):
        return pid
    start = comp.get("start") or {}
    argv = start.get("argv")
    found = started_as(argv, uid=uid_of(start.get("user"))) if argv else []
    return found[0] if len(found) == 1 else None


def stop_signal(role: str) -> int:
    """PostgreSQL stops "fast" on SIGINT (SIGTERM would be "smart": wait for every client)."""
    return signal.SIGINT if role in POSTGRES_ROLES else signal.SIGTERM


def restart_stop_timeout_s(role: str) -> float:
    """How long a restart waits for a clean stop before SIGKILL. What is restarted does not
    serve (it may hang: a SIGSTOPped gunicorn), so not long; PostgreSQL longer, as its fast
    shutdown writes a checkpoint and a SIGKILL costs a crash recovery."""
    return 10.0 if role in POSTGRES_ROLES else 3.0


class LocalExecutor:
    """Recipes from its params; the pids it started, in memory (a control plane started
    again finds them by their command line)."""

    Params = LocalParams

    def __init__(self, params: LocalParams) -> None:
        self.params = params
        self._pids: dict[str, int] = {}
        self._pids_lock = threading.Lock()

    @classmethod
    def from_params(cls, params: LocalParams) -> LocalExecutor:
        return cls(params)

    # -- what the recipes are, and where pids are kept (LabExecutor: its stack.json) ----------
    def _component(self, component: str) -> dict[str, Any]:
        recipe: LocalComponent | None = self.params.components.get(component)
        if recipe is None:
            raise ExecutorError(f"no component {component!r} in this executor's recipes")
        with self._pids_lock:
            pid = self._pids.get(component)
        return {
            "role": recipe.role,
            "pid": pid,
            "argv0": recipe.argv[0],
            "start": {
                "argv": list(recipe.argv),
                "env": dict(recipe.env),
                "cwd": str(recipe.cwd) if recipe.cwd else None,
                "user": recipe.user,
            },
            "log": str(recipe.log),
            "data_dir": str(recipe.data_dir) if recipe.data_dir else None,
        }

    def knows(self, component: str) -> bool:
        """Is `component` one of its recipes? (`check-config` asks.)"""
        return component in self.params.components

    def record_pid(self, component: str, pid: int) -> None:
        with self._pids_lock:
            self._pids[component] = pid

    def _tools(self) -> tuple[str | None, str | None]:
        """PostgreSQL's tools' directory, and the passfile they read (None: none)."""
        p = self.params
        return (
            str(p.tools_dir) if p.tools_dir else None,
            str(p.passfile) if p.passfile else None,
        )

    # -- processes ------------------------------------------------------------------------------
    def is_running(self, component: str) -> bool:
        return self._adopt(component) is not None

    def _adopt(self, component: str) -> int | None:
        """The component's live pid. When the recorded one is dead but a process started from
        the component's own command line runs (a control plane killed between starting it
        and recording it), that one is recorded: else it would serve unseen, and outlive the
        stack."""
        comp = self._component(component)
        pid = running_pid(comp)
        if pid is None or pid == comp.get("pid"):
            return pid
        logger.warning("%s runs as pid %d, which was never recorded: adopted", component, pid)
        self.record_pid(component, pid)
        return pid

    def restart(self, component: str) -> int:
        # Outside the lock: a shop's graceful stop takes seconds, and a fence must not wait.
        # (One action at a time per target: nobody else restarts this component meanwhile.)
        comp = self._component(component)
        if "start" not in comp:
            raise ExecutorError(f"no start recipe for {component!r}")
        start = comp["start"]
        uid_of(start.get("user"))  # a recipe that cannot start stops nothing first
        self.stop(component, timeout_s=restart_stop_timeout_s(comp["role"]))
        try:
            pid = spawn_detached(
                start["argv"],
                log_path=Path(comp["log"]),
                env_overrides=start.get("env") or {},
                cwd=Path(start["cwd"]) if start.get("cwd") else None,
                user=start.get("user"),
            )
        except OSError as exc:
            raise ExecutorError(f"cannot start {component}: {exc}") from exc
        self.record_pid(component, pid)
        return pid

    def fence(self, component: str) -> bool:
        pid = self._adopt(component)
        comp = self._component(component)
        data_dir = instance_dir(comp)
        # Found before any is killed: once the postmaster is dead, its backends (each in a
        # session of its own, so no process group holds them) are found by their directory.
        found = instance_processes(pid, data_dir)
        if found:
            logger.info("fencing %s: %s", component, describe_processes(found))
        # kill_tree returns only once a fresh look finds none of them, no descendant and
        # nothing in the data directory: what it returns still runs.
        self._verify_gone(component, kill_tree(found, find=self._finder(comp)))
        self._clear_stale_pid_file(comp)
        return bool(found)

    @staticmethod
    def _finder(comp: dict[str, Any]) -> Finder | None:
        data_dir = instance_dir(comp)
        return in_directory(data_dir) if data_dir else None

    @staticmethod
    def _verify_gone(component: str, survivors: set[Proc]) -> None:
        if survivors:
            raise ExecutorError(
                f"{component} survived SIGKILL: {describe_processes(survivors)} still run"
            )

    @staticmethod
    def _clear_stale_pid_file(comp: dict[str, Any]) -> None:
        """A killed postmaster whose parent has not reaped it yet is a zombie, and PostgreSQL
        (kill(pid, 0) succeeds on a zombie) would refuse its data directory: "lock file
        postmaster.pid already exists". Remove the file when its process is dead."""
        data_dir = comp.get("data_dir")
        if not data_dir:
            return
        pid_file = Path(data_dir) / "postmaster.pid"
        try:
            owner = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        if not is_pid_alive(owner):
            pid_file.unlink(missing_ok=True)

    def stop(self, component: str, timeout_s: float = 30) -> None:
        pid = self._adopt(component)
        comp = self._component(component)
        if pid is not None:
            survivors = stop_tree(
                pid,
                sig=stop_signal(comp["role"]),
                timeout_s=timeout_s,
                data_dir=instance_dir(comp),
            )
        else:  # nothing to stop cleanly; what a dead postmaster left in its directory goes
            survivors = kill_tree(
                instance_processes(None, instance_dir(comp)), find=self._finder(comp)
            )
        self._verify_gone(component, survivors)
        self._clear_stale_pid_file(comp)

    def run_tool(
        self,
        component: str,
        tool: str,
        args: Sequence[str],
        *,
        stdin: str | None = None,
        timeout_s: float = 300,
        cancel: Cancel | None = None,
    ) -> str:
        comp = self._component(component)
        bin_dir, passfile = self._tools()
        if not bin_dir or "/" in tool:
            raise ExecutorError(f"no tool {tool!r} for {component}")
        start = comp.get("start", {})
        env = dict(os.environ)
        if passfile:  # for a tool given no DSN that names it (every lab DSN does)
            env["PGPASSFILE"] = str(passfile)
        if cancel is not None:
            cancel.check()
        try:
            # A session of its own: a cancel kills the tool and what it forked (pg_basebackup's
            # WAL streamer) as one process group.
            proc = subprocess.Popen(
                [str(Path(bin_dir) / tool), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                user=start.get("user"),
                cwd=start.get("cwd"),
                start_new_session=True,
            )
        except OSError as exc:
            raise ExecutorError(f"{tool} for {component}: {exc}") from exc

        def kill() -> None:
            if proc.returncode is None:  # not reaped yet: its pid is still its group's
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

        with cancel.on_cancel(kill) if cancel is not None else contextlib.nullcontext():
            try:
                stdout, stderr = proc.communicate(stdin or "", timeout=timeout_s)
            except subprocess.TimeoutExpired as exc:
                kill()
                proc.communicate()
                raise ExecutorError(f"{tool} for {component}: {exc}") from exc
            except BaseException:  # interrupted: the tool must not outlive its caller
                kill()
                proc.wait()
                raise
        if cancel is not None and cancel.reason is not None:
            # Killed by it: stopped, not failed. What the tool forked (pg_basebackup's WAL
            # streamer) may outlive its parent by a moment: none of it may write after the
            # caller cleans up, so wait until the whole group is gone.
            _wait_group_gone(proc.pid)
            cancel.check()
        if proc.returncode != 0:
            tail = (stderr or stdout).strip()[-1500:]
            raise ExecutorError(f"{tool} for {component} failed ({proc.returncode}): {tail}")
        return stdout + stderr

    def data_dir(self, component: str) -> str:
        path = self._component(component).get("data_dir")
        if not path:
            raise ExecutorError(f"{component} has no data directory")
        return str(path)

    def log_tail(self, component: str, max_chars: int = 1000) -> str:
        log = self._component(component).get("log")
        if not log:
            return ""
        try:
            with Path(log).open("rb") as fh:
                fh.seek(max(0, Path(log).stat().st_size - max_chars))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-6:] if line.strip())

    def reset_data_dir(self, component: str) -> None:
        if self.is_running(component):
            raise ExecutorError(f"{component} runs: stop it before emptying its data directory")
        path = Path(self.data_dir(component))
        owner = path.stat()
        shutil.rmtree(path)
        path.mkdir(mode=0o700)
        os.chown(path, owner.st_uid, owner.st_gid)

    def put_files(
        self,
        component: str,
        dest_dir: str,
        *,
        source_dir: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        own = Path(self.data_dir(component))
        dest = Path(dest_dir)
        if dest == own and self.is_running(component):
            raise ExecutorError(f"{component} runs: stop it before replacing its data directory")
        owner = own.parent.stat()  # the data directory itself may be gone mid-restore
        if dest.exists() and source_dir is not None:
            shutil.rmtree(dest)
        if source_dir is not None:
            # cp as the component's OS user: the copy is its own without a chown walk, and
            # at cp's speed (a restore waits on this copy).
            user = self._component(component).get("start", {}).get("user")
            prefix = ["runuser", "-u", user, "--"] if user and os.geteuid() == 0 else []
            done = subprocess.run(
                [*prefix, "cp", "-a", "--", source_dir, str(dest)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise ExecutorError(f"copy of {source_dir} failed: {done.stderr.strip()[-500:]}")
        dest.mkdir(mode=0o700, exist_ok=True)
        os.chown(dest, owner.st_uid, owner.st_gid)
        os.chmod(dest, 0o700)
        for name, text in (files or {}).items():
            (dest / name).write_text(text)
            os.chown(dest / name, owner.st_uid, owner.st_gid)


def _wait_group_gone(pgid: int, timeout_s: float = 5.0) -> None:
    """Until no process of the group is left (each was sent SIGKILL), within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.01)
