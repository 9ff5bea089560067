"""Executors chosen by configuration (controlplane/executors.py, remediation/executors/): a
kind from the registry per named executor, each service acting through its own (or the only
one), a wrong kind or param named at start, and a service with none refused clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.config import Settings
from controlplane.errors import ConfigError
from controlplane.executors import Executors
from remediation.executors.base import ExecutorError
from remediation.executors.lab import LabExecutor
from remediation.executors.none import NoExecutor


def settings(**values: Any) -> Settings:
    return Settings.model_validate({"database_url": "sqlite://", **values})


def test_each_service_acts_through_its_named_executor_or_the_only_one(tmp_path: Path) -> None:
    lab = {"kind": "lab", "params": {"stack_file": str(tmp_path / "stack.json")}}
    one = Executors(settings(executors={"lab": lab}, services=[{"name": "db"}]))
    assert isinstance(one.of("db"), LabExecutor) and one.of("db") is one.of(None)
    two = Executors(
        settings(
            executors={"lab": lab, "off": {"kind": "none"}},
            services=[{"name": "db", "executor": "lab"}, {"name": "cache"}],
        )
    )
    assert isinstance(two.of("db"), LabExecutor)
    assert isinstance(two.of("cache"), NoExecutor)  # two to choose from, and it named none


def test_a_wrong_executor_kind_param_or_reference_is_named_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown kind 'ssh-but-typo'"):
        Executors(settings(executors={"x": {"kind": "ssh-but-typo"}}))
    with pytest.raises(ConfigError, match=r"executor 'x' \(lab\): params.stack_file"):
        Executors(settings(executors={"x": {"kind": "lab", "params": {}}}))
    with pytest.raises(ConfigError, match=r"executor 'x' \(lab\): params.stack_fle"):
        Executors(
            settings(
                executors={"x": {"kind": "lab", "params": {"stack_file": "a", "stack_fle": 1}}}
            )
        )
    with pytest.raises(ValueError, match=r"services\[0\].executor: unknown executor 'nope'"):
        settings(services=[{"name": "db", "executor": "nope"}])


def test_a_service_with_no_executor_refuses_every_process_action_with_the_reason() -> None:
    none = Executors(settings(services=[{"name": "db"}])).of("db")
    assert none.is_running("pg0") is False
    with pytest.raises(ExecutorError, match="fence: no executor configured"):
        none.fence("pg0")
    with pytest.raises(ExecutorError, match="restart: no executor configured"):
        none.restart("pg0")
    assert isinstance(NoExecutor("why not"), NoExecutor)
