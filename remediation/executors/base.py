"""The executor interface: how an action reaches the processes it acts on."""

from __future__ import annotations

from typing import Protocol


class ExecutorError(Exception):
    pass


class Executor(Protocol):
    def is_running(self, component: str) -> bool: ...

    def restart(self, component: str) -> int:
        """Stop what is left of it, start it again; returns the new pid."""
        ...

    def components(self) -> list[str]: ...
