"""NoExecutor: for a target with no executor. It runs nothing, so nothing of it runs; every
other process action (restart, fence, stop, a tool, files) fails with the reason given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from remediation.executors.base import ExecutorError
from remediation.executors.params import NoParams


class NoExecutor:
    Params = NoParams

    def __init__(self, why: str = "no executor configured for this target") -> None:
        self.why = why

    @classmethod
    def from_params(cls, params: NoParams) -> NoExecutor:
        return cls()

    def is_running(self, component: str) -> bool:
        return False

    def log_tail(self, component: str, max_chars: int = 1000) -> str:
        return ""

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        if name.startswith("_"):
            raise AttributeError(name)

        def refuse(*args: Any, **kwargs: Any) -> NoReturn:
            raise ExecutorError(f"{name}: {self.why}")

        return refuse
