"""Executor kinds by name (the targets file's `[executors.NAME] kind = ...`), imported only
when used, as probes and actions are. `local` acts on processes of this host started from
recipes in its params; `lab` is the same for a lab stack (recipes and pids in its stack.json);
`none` refuses every process action; `systemd` acts on units (here, or on other hosts over
SSH), and `ssh` is the same where every component is on another host."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from pydantic import BaseModel, ValidationError

import kinds
from remediation.executors.base import Executor

EXECUTORS: dict[str, str] = {
    "local": "remediation.executors.local:LocalExecutor",
    "lab": "remediation.executors.lab:LabExecutor",
    "none": "remediation.executors.none:NoExecutor",
    "systemd": "remediation.executors.systemd:SystemdExecutor",
    "ssh": "remediation.executors.systemd:SshExecutor",
}


class ExecutorConfigError(ValueError):
    """An executor's kind or params do not fit; the message names the param."""


def build_executor(name: str, kind: str, params: Mapping[str, Any]) -> Executor:
    try:
        cls: Any = kinds.load(EXECUTORS, kind, "kind")
    except KeyError as exc:
        raise ExecutorConfigError(f"executor {name!r}: {exc.args[0]}") from None
    model: type[BaseModel] = cls.Params
    try:
        parsed = model.model_validate(dict(params))
    except ValidationError as exc:
        problems = kinds.params_problems(exc)
        raise ExecutorConfigError(f"executor {name!r} ({kind}): {problems}") from None
    return cast(Executor, cls.from_params(parsed))
