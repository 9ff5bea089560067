"""What every action is: `precheck` (re-reads live state), idempotent `execute`, `verify`."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from remediation.executors.base import Cancel, Executor
from remediation.facts import FactsKeeper, NoFacts

ParamsT = TypeVar("ParamsT", bound=BaseModel)


class Decline(StrEnum):
    """Why a precheck said no, and so what follows (Patroni re-evaluates every loop while
    there is no leader: one unlucky look must never end the healing).

    - NOTHING_TO_DO: the target is healthy: the incident counts as recovered, so a failure
      after it is a new one, with an action of its own.
    - NOT_NOW: a precondition is missing (no standby answers yet, no leader to rejoin to, a
      dependency down): the same policy tries again with backoff while the incident is open.
    - NEVER: acting would be unsafe (a fence cannot be confirmed, acknowledged data would be
      lost, two writable nodes): a human is told at once, and it is not tried again."""

    NOTHING_TO_DO = "nothing-to-do"
    NOT_NOW = "not-now"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Check:
    """A precheck's or a verify's answer. A precheck that says no says which kind of no
    (`decline`); use the constructors below, which name it."""

    ok: bool
    reason: str
    decline: Decline | None = None

    @classmethod
    def go(cls, reason: str) -> Check:
        return cls(True, reason)

    @classmethod
    def nothing_to_do(cls, reason: str) -> Check:
        return cls(False, reason, Decline.NOTHING_TO_DO)

    @classmethod
    def not_now(cls, reason: str) -> Check:
        return cls(False, reason, Decline.NOT_NOW)

    @classmethod
    def never(cls, reason: str) -> Check:
        return cls(False, reason, Decline.NEVER)

    @property
    def healthy(self) -> bool:
        return self.decline is Decline.NOTHING_TO_DO


@dataclass(frozen=True, slots=True)
class Outcome:
    summary: str
    data: Mapping[str, Any] = field(default_factory=dict)


class ActionError(Exception):
    """`permanent=True`: do not retry, escalate now; otherwise a later attempt may succeed."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class ActionContext:
    target: str  # the service
    component: str | None  # the executor's name for its process
    params: Mapping[str, Any]
    executor: Executor
    is_healthy: Callable[[], Check]  # the target's probes (and business invariants), now
    labels: Mapping[str, str] = field(default_factory=dict)  # the target service's labels
    # For an incident's run: when its probe last passed before the failure (the latest point
    # known good, e.g. the restore point for data damage); None when unknown.
    last_good_at: datetime | None = None
    # Set when the run must stand aside (an action in `yields_to` waits for its target):
    # long steps pass it to the executor's tools, which are killed at once.
    cancel: Cancel | None = None
    # The target cluster's facts (synchronous, leader, roles...), in the state store.
    facts: FactsKeeper = field(default_factory=NoFacts)


def operator_params(
    action: type[Action], supplied: Mapping[str, Any], policy_params: Mapping[str, Any]
) -> dict[str, Any]:
    """An operator's params, checked against what the action declares (default: none) and
    returned as plain JSON values, only those given. Raises pydantic's ValidationError."""
    model = action.OperatorParams
    if model.model_config.get("extra") != "forbid":
        raise TypeError(f"{action.__name__}.OperatorParams must forbid extra fields")
    parsed = model.model_validate(dict(supplied), context={"policy": dict(policy_params)})
    dumped: dict[str, Any] = parsed.model_dump(mode="json", exclude_unset=True)
    return dumped


def parse_params(model: type[ParamsT], ctx: ActionContext, kind: str) -> ParamsT:
    """The action's params, typed; bad ones are a permanent error (no retry fixes them)."""
    try:
        return model.model_validate(dict(ctx.params))
    except ValidationError as exc:
        raise ActionError(f"bad {kind} params: {exc}", permanent=True) from None


class NoOperatorParams(BaseModel):
    """The default: an operator may supply no param at all."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Action(ABC):
    kind: ClassVar[str]
    # The policy's params, checked when the control plane starts (None: not declared, the
    # action parses its own when it runs).
    Params: ClassVar[type[BaseModel] | None] = None
    # What an operator may add through the API, with types and bounds; everything else comes
    # from the policy alone. Validated with context={"policy": <the policy's params>}, so a
    # value can be checked against them (a switchover's candidate is one of its nodes).
    OperatorParams: ClassVar[type[BaseModel]] = NoOperatorParams
    # May it start over after a control plane died in the middle of it? True for an action
    # whose precheck re-reads everything and whose steps harm nothing when repeated (starting
    # a process, dropping a cache). Its abandoned run then closes its incident, so a failure
    # that persists opens a new one and gets a new run (never a second run for one incident).
    # False (a failover, a restore): the abandoned run is escalated, and a human decides.
    may_start_over: ClassVar[bool] = False
    # Actions this one stands aside for: when a run of one of them waits for the target this
    # one runs on, this run is cancelled (`ctx.cancel`) and ends without escalating. A backup
    # never holds up a failover.
    yields_to: ClassVar[frozenset[str]] = frozenset()
    # What it needs of its target beyond the network: "executor" (it starts, stops or fences
    # processes, or runs their tools), "component" (the executor's name for the target's
    # process). `controlplane check-config` names a policy whose target lacks one.
    needs: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def precheck(self, ctx: ActionContext) -> Check:
        """Is it still broken, and is acting safe now? Reads live state, changes nothing."""

    @abstractmethod
    def execute(self, ctx: ActionContext) -> Outcome:
        """Act. Safe to call again after a failure (idempotent). Raises ActionError."""

    def verify(self, ctx: ActionContext) -> Check:
        """Did it work? Called repeatedly until it passes or the deadline passes."""
        return ctx.is_healthy()

    @classmethod
    def summary(cls) -> str:
        """What the action does, in one paragraph: the first of its module's docstring."""
        doc = sys.modules[cls.__module__].__doc__ or cls.kind
        return " ".join(doc.strip().split("\n\n")[0].split())

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        """A dry run: the steps a run on `target` would take with these params (the policy's
        and the operator's, merged as the engine merges them), read from them alone: nothing
        is looked at and nothing is touched. The run itself decides again on live state.
        Raises pydantic's ValidationError for params the run would refuse."""
        return [cls.summary()]
