"""LabExecutor: acts on the local processes described in a lab's stack.json."""

from __future__ import annotations

import fcntl
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from remediation.executors.base import ExecutorError
from remediation.executors.processes import runs_program, spawn, terminate_pid


class LabExecutor:
    def __init__(self, stack_file: Path) -> None:
        self.stack_file = stack_file

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

    def _component(self, component: str) -> dict[str, Any]:
        description = json.loads(self.stack_file.read_text())
        try:
            comp: dict[str, Any] = description["components"][component]
        except KeyError:
            raise ExecutorError(f"the stack has no component {component!r}") from None
        return comp

    def record_pid(self, component: str, pid: int) -> None:
        """Record a component's new pid (under the same lock as restarts)."""
        with self._locked() as description:
            description["components"][component]["pid"] = pid

    def components(self) -> list[str]:
        return sorted(json.loads(self.stack_file.read_text())["components"])

    def is_running(self, component: str) -> bool:
        comp = self._component(component)
        pid = comp.get("pid")
        return isinstance(pid, int) and runs_program(pid, comp.get("argv0", ""))

    def restart(self, component: str) -> int:
        with self._locked() as description:
            comp = description["components"].get(component)
            if comp is None or "start" not in comp:
                raise ExecutorError(f"no start recipe for {component!r} in {self.stack_file}")
            pid = comp.get("pid")
            if isinstance(pid, int) and runs_program(pid, comp.get("argv0", "")):
                sig = signal.SIGINT if comp["role"] in ("primary", "standby") else signal.SIGTERM
                terminate_pid(pid, timeout_s=10, sig=sig)
            start = comp["start"]
            try:
                proc = spawn(
                    start["argv"],
                    log_path=Path(comp["log"]),
                    env_overrides=start.get("env") or {},
                    cwd=Path(start["cwd"]) if start.get("cwd") else None,
                    user=start.get("user"),
                )
            except OSError as exc:
                raise ExecutorError(f"cannot start {component}: {exc}") from exc
            comp["pid"] = proc.pid
            return proc.pid
