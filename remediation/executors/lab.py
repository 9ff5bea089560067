"""LabExecutor: acts on the local processes described in a lab's stack.json."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from remediation.executors.base import Cancel, ExecutorError
from remediation.executors.params import LabParams
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


def stop_signal(role: str) -> int:
    """PostgreSQL stops "fast" on SIGINT (SIGTERM would be "smart": wait for every client)."""
    return signal.SIGINT if role in ("primary", "standby") else signal.SIGTERM


def restart_stop_timeout_s(role: str) -> float:
    """How long a restart waits for a clean stop before SIGKILL. What is restarted does not
    serve (it may hang: a SIGSTOPped gunicorn), so not long; PostgreSQL longer, as its fast
    shutdown writes a checkpoint and a SIGKILL costs a crash recovery."""
    return 10.0 if role in ("primary", "standby") else 3.0


class LabExecutor:
    Params = LabParams

    def __init__(self, stack_file: Path) -> None:
        self.stack_file = stack_file

    @classmethod
    def from_params(cls, params: LabParams) -> LabExecutor:
        return cls(params.stack_file)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of stack.json under an exclusive lock (the lab writes it too)."""
        lock_path = self.stack_file.with_suffix(".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                description: dict[str, Any] = json.loads(self.stack_file.read_text())
            except FileNotFoundError:
                raise ExecutorError(f"no stack described at {self.stack_file}") from None
            yield description
            tmp = self.stack_file.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(description, fh, indent=2)
            os.replace(tmp, self.stack_file)

    def _description(self) -> dict[str, Any]:
        try:
            description: dict[str, Any] = json.loads(self.stack_file.read_text())
        except FileNotFoundError:
            raise ExecutorError(f"no stack described at {self.stack_file}") from None
        return description

    def _component(self, component: str) -> dict[str, Any]:
        description = self._description()
        try:
            comp: dict[str, Any] = description["components"][component]
        except KeyError:
            raise ExecutorError(f"the stack has no component {component!r}") from None
        return comp

    def record_pid(self, component: str, pid: int) -> None:
        """Record a component's new pid (under the same lock as restarts)."""
        with self._locked() as description:
            description["components"][component]["pid"] = pid

    def is_running(self, component: str) -> bool:
        return self._adopt(component) is not None

    def _adopt(self, component: str) -> int | None:
        """The component's live pid. When the recorded one is dead but a process started from
        the component's own command line runs (a control plane killed between starting it
        and recording it), that one is recorded: else it would serve unseen, and outlive the
        stack."""
        comp = self._component(component)
        pid = comp.get("pid")
        if isinstance(pid, int) and runs_program(pid, comp.get("argv0", "")):
            return pid
        argv = comp.get("start", {}).get("argv")
        found = started_as(argv) if argv else []
        if len(found) != 1:
            return None
        logger.warning("%s runs as pid %d, which was never recorded: adopted", component, found[0])
        self.record_pid(component, found[0])
        return found[0]

    def restart(self, component: str) -> int:
        # Outside the lock: a shop's graceful stop takes seconds, and a fence must not wait.
        # (One action at a time per target: nobody else restarts this component meanwhile.)
        comp = self._component(component)
        if "start" not in comp:
            raise ExecutorError(f"no start recipe for {component!r} in {self.stack_file}")
        self.stop(component, timeout_s=restart_stop_timeout_s(comp["role"]))
        start = comp["start"]
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
        data_dir = comp.get("data_dir")
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
        data_dir = comp.get("data_dir")
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
                data_dir=comp.get("data_dir"),
            )
        else:  # nothing to stop cleanly; what a dead postmaster left in its directory goes
            survivors = kill_tree(
                instance_processes(None, comp.get("data_dir")), find=self._finder(comp)
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
        description = self._description()
        comp = self._component(component)
        bin_dir = description.get("postgres", {}).get("bin_dir")
        if not bin_dir or "/" in tool:
            raise ExecutorError(f"no tool {tool!r} for {component}")
        start = comp.get("start", {})
        env = dict(os.environ)
        passfile = description.get("postgres", {}).get("passfile")
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
