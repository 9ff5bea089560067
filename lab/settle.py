"""When a game day's stack is whole, how long a trial waits for it, and what the stack is when
it is not: a trial that cannot heal fails at its deadline, says what was up and what the
control plane held open, and a stack that the clean-up cannot make whole stops the day."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from lab.chaos import FaultRecord
from lab.chaos.base import Fault, is_running, start_component
from lab.errors import LabError, NotReadyError
from lab.observe import StackView
from lab.process import wait_until
from lab.verdict import Objectives

# A trial waits for a whole stack until its objective (redundancy_s, from the fault's start)
# plus this margin, or the fault's end plus it; then it has failed, and waits no more.
TRIAL_MARGIN_S = 15.0
MAX_TRIAL_WAIT_S = 180.0  # from the fault's end, whatever the objective says
# After a failed trial the clean-up starts what is dead; the stack has this long to be whole
# again, or the day stops (every later trial would only wait and fail).
SETTLE_AFTER_S = 60.0


class StackLostError(LabError):
    """The stack was not whole again after a trial, even after the clean-up: the game day
    stops. Carries the trial (with the stack's state then), when one ran."""

    def __init__(self, message: str, trial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.trial = trial


def trial_deadline(record: FaultRecord, goal: Objectives, margin_s: float) -> float:
    """When (monotonic) a trial stops waiting for a whole stack: its redundancy objective
    (from the fault's start) or the fault's end, whichever is later, plus `margin_s`; never
    more than MAX_TRIAL_WAIT_S after the fault's end."""
    objective = max(record.started.mono + goal.redundancy_s, record.ended.mono)
    return min(objective + margin_s, record.ended.mono + MAX_TRIAL_WAIT_S)


def stack_at(view: StackView, t0: float) -> dict[str, Any]:
    """The stack as it is now (what runs, what answers, roles) and the control plane's open
    incidents: what a report of a trial that did not heal says."""
    try:
        state: dict[str, Any] | str = view.state()
    except LabError as exc:
        state = f"unreadable: {exc}"
    return {
        "at": datetime.now(UTC).isoformat(),
        "after_s": round(time.monotonic() - t0, 3),
        "stack": state,
        "open_incidents": view.open_incidents(),
    }


def settle_or_stop(view: StackView, timeout_s: float, why: str) -> None:
    """Wait up to `timeout_s` for a whole stack (the next trial's start); else StackLostError,
    saying what is not whole."""
    try:
        wait_until(
            lambda: is_settled(view), timeout_s=timeout_s, interval_s=0.5, what="a whole stack"
        )
    except NotReadyError:
        raise StackLostError(
            f"{why}: the stack was not whole within {timeout_s:g} s ({_not_whole(view)}); "
            "the game day stops"
        ) from None


def _not_whole(view: StackView) -> str:
    try:
        return state_line(view.state())
    except LabError as exc:
        return f"its state unreadable: {exc}"


def state_line(state: dict[str, Any]) -> str:
    """One line of StackView.state(): "pg0 primary, pg1 down, not redundant, shop-1 not
    running"."""
    parts = [f"{n} {s['answers_as']}" for n, s in state["pg_nodes"].items()]
    parts.append("redundant" if state["redundant"] else "not redundant")
    parts += [f"{n} not running" for n, c in state["components"].items() if not c["running"]]
    parts += [f"{u} not ready" for u, ready in state["shops_ready"].items() if not ready]
    return ", ".join(parts)


def at_deadline_line(seen: dict[str, Any]) -> str:
    """One line of stack_at(): the stack, and the incidents the control plane held open."""
    stack = seen["stack"]
    incidents = seen["open_incidents"]
    held = (
        ", ".join(f"{i['kind']} on {i['target']}" for i in incidents) or "none"
        if isinstance(incidents, list)
        else incidents
    )
    where = state_line(stack) if isinstance(stack, dict) else stack
    return f"{where}; open incidents: {held}"


def is_settled(view: StackView, chosen: Fault | None = None) -> bool:
    return (
        view.is_whole()
        and view.prepared_count() == 0
        and (chosen is None or chosen.is_recovered(view))
    )


def clean_up(view: StackView) -> list[str]:
    """Start again what a fault left dead and nothing healed (a policy that failed, or a
    stack whose targets heal less than the lab's): the next trial starts whole, and the
    trial says it was the clean-up, not the control plane. Returns what was started."""
    started = []
    for name, comp in view.components().items():
        if "data_dir" not in comp and not is_running(view, name):
            start_component(view, name)
            started.append(name)
    return started
