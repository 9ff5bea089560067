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


def local(tmp_path: Path, **recipe: Any) -> Any:
    from remediation.executors.local import LocalExecutor
    from remediation.executors.params import LocalParams

    component = {"argv": ["sleep", "41"], "log": str(tmp_path / "c.log"), **recipe}
    return LocalExecutor(LocalParams.model_validate({"components": {"c": component}}))


def test_a_local_recipe_that_could_never_work_or_would_kill_too_much_is_refused(
    tmp_path: Path,
) -> None:
    from pydantic import ValidationError

    for bad in ({"argv": [""]}, {"argv": ["sleep", "a\0b"]}, {"user": "no-such-user-zz"},
                {"data_dir": "/"}, {"data_dir": "/srv"}, {"data_dir": "rel/pg"},
                {"log": "c.log"}):  # fmt: skip
        with pytest.raises(ValidationError):
            local(tmp_path, **bad)


def test_a_local_component_never_takes_another_users_process_or_its_neighbours_for_its_own(
    tmp_path: Path,
) -> None:
    import subprocess
    import time

    from remediation.executors.processes import is_pid_alive

    shared = tmp_path / "shared" / "dir"
    shared.mkdir(parents=True)
    # Same command line, another user; and a neighbour working in the directory it names.
    theirs = subprocess.Popen(["runuser", "-u", "nobody", "--", "setsid", "sleep", "41"])
    neighbour = subprocess.Popen(["sleep", "42"], cwd=shared, start_new_session=True)
    try:
        executor = local(tmp_path, data_dir=str(shared))  # a plain service, not PostgreSQL
        time.sleep(0.3)
        assert not executor.is_running("c")  # nobody's `sleep 41` is not ours
        assert executor.fence("c") is False  # nothing of it ran
        assert neighbour.poll() is None and theirs.poll() is None
        pid = executor.restart("c")
        assert executor.is_running("c") and pid != theirs.pid
        executor.fence("c")
        assert not is_pid_alive(pid)
        assert neighbour.poll() is None and theirs.poll() is None  # both untouched
    finally:
        for proc in (theirs, neighbour):
            proc.kill()
            proc.wait()
