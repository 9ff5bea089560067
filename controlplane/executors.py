"""Each service's executor, built once from the targets file's `[executors.NAME]` (kinds in
remediation/executors/registry.py) and chosen per service (`executor = NAME`, or the only
one there is). A service with none gets a NoExecutor that says so."""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.config import Settings
from controlplane.errors import ConfigError
from remediation.executors.base import Executor
from remediation.executors.none import NoExecutor
from remediation.executors.registry import ExecutorConfigError, build_executor


class Executors:
    def __init__(self, settings: Settings, *, only: Executor | None = None) -> None:
        """`only`: one executor for every service (a test's, or a bench's)."""
        self.settings = settings
        self.only = only
        self.built: Mapping[str, Executor] = {}
        if only is None:
            try:
                self.built = {
                    name: build_executor(name, spec.kind, spec.params)
                    for name, spec in settings.executors.items()
                }
            except ExecutorConfigError as exc:
                raise ConfigError(str(exc)) from None
        self.none: Executor = NoExecutor()

    def of(self, service: str | None) -> Executor:
        if self.only is not None:
            return self.only
        name = self.settings.executor_of(service)
        return self.built[name] if name is not None else self.none
