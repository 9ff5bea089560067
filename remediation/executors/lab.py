"""LabExecutor: the local executor (`local.py`) for a lab stack, whose recipes and pids are
kept in the lab's stack.json (the lab's own commands read and write it too)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from remediation.executors.base import ExecutorError
from remediation.executors.local import LocalExecutor
from remediation.executors.params import LabParams


class LabExecutor(LocalExecutor):
    Params = LabParams  # type: ignore[assignment]

    def __init__(self, stack_file: Path) -> None:  # recipes and pids: stack.json, no params
        self.stack_file = stack_file

    @classmethod
    def from_params(cls, params: LabParams) -> LabExecutor:  # type: ignore[override]
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

    def knows(self, component: str) -> bool:
        """A stack not started yet describes nothing: every component may be its."""
        try:
            return component in self._description().get("components", {})
        except ExecutorError:
            return True

    def _tools(self) -> tuple[str | None, str | None]:
        postgres = self._description().get("postgres", {})
        return postgres.get("bin_dir"), postgres.get("passfile")
