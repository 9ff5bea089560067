"""Game days: each fault N times (or random faults for a while: a soak) under a careful order
load, measured from outside the control plane, judged against objectives, written as JSON."""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import requests

from controlplane.backups import SCHEDULE
from controlplane.models import ActionState
from lab.chaos import FaultRecord, fault
from lab.chaos.base import Fault, Stamp
from lab.chaos.registry import FAULTS
from lab.errors import LabError
from lab.layout import gamedays_dir
from lab.load import CarefulLoad, Ledger, verify_orders
from lab.observe import StackView
from lab.process import wait_until
from lab.settle import (
    MAX_TRIAL_WAIT_S,
    SETTLE_AFTER_S,
    TRIAL_MARGIN_S,
    StackLostError,
    at_deadline_line,
    clean_up,
    is_settled,
    settle_or_stop,
    stack_at,
    trial_deadline,
)
from lab.stress import CpuHogs
from lab.verdict import (
    Objectives,
    healer,
    healing_runs,
    judge,
    load_objectives,
    objectives_for,
)

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 180.0  # the day's first look: a stack may still be starting
AFTER_RECOVERY_S = 2.0  # a little load on the healed stack: the shops serve its new shape
# The faults a game day runs unless told: the destructive ones need an operator's approval.
DEFAULT_FAULTS = tuple(k for k in FAULTS if k not in ("delete-orders", "drop-table"))
Progress = Callable[[str], None]
# Each trial keeps what its chart on the dashboard draws, bounded: orders and errors per
# second from a little before the fault to a little after recovery, and the control plane's
# runs in the trial.
SERIES_BEFORE_S = 10.0
SERIES_AFTER_S = 5.0
MAX_SERIES_S = 300
MAX_RUNS_KEPT = 50
RUN_FIELDS = ("id", "action", "target", "state", "requested_by", "created_at", "started_at",
              "finished_at")  # fmt: skip


@dataclass(frozen=True, slots=True)
class ChartWindow:
    """The seconds a trial's chart covers (monotonic), and the fault's start on both clocks
    to date them."""

    start: float
    end: float
    anchor: Stamp

    def series(self, load: CarefulLoad) -> dict[str, Any]:
        end = min(self.end, load.stopped or time.monotonic(), self.start + MAX_SERIES_S)
        start_at = self.anchor.at + timedelta(seconds=self.start - self.anchor.mono)
        return {"start_at": start_at.isoformat(), "step_s": 1, **load.series(self.start, end)}


class SplitBrainSampler:
    """Polls every PostgreSQL node for writability from outside the control plane, each in a
    thread of its own (a hung node must not slow the others' samples); a sample where two
    nodes accept writes at once is a split brain."""

    def __init__(self, view: StackView, interval_s: float = 0.1) -> None:
        self.view = view
        self.interval_s = interval_s
        self.writable: dict[str, bool] = {}
        self.splits: list[float] = []
        self.samples = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._poll, args=(node,), daemon=True)
            for node in view.pg_nodes()
        ]

    def start(self) -> SplitBrainSampler:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _poll(self, node: str) -> None:
        while not self._stop.is_set():
            writable = self.view.is_writable(node)
            with self._lock:
                self.writable[node] = writable
                self.samples += 1
                if sum(self.writable.values()) > 1:
                    self.splits.append(time.monotonic())
            self._stop.wait(self.interval_s)

    def count_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for t in self.splits if start <= t <= end)


def _at(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def control_plane_view(
    view: StackView,
    record: FaultRecord,
    chosen: Fault,
    until: datetime,
    *,
    approve: bool,
    whole_at: datetime | None = None,
) -> dict[str, Any]:
    """What the control plane did about the fault: from its API, within the trial's window.
    Its targets (`Fault.targets`): when an incident on one first opened, and the runs that
    healed each before the stack was whole again (`whole_at`)."""
    since = record.started.at
    incidents = [
        i
        for i in view.api_get("/incidents?limit=500")["incidents"]
        if (d := _at(i["detected_at"])) is not None and since <= d <= until
    ]
    # The schedule's backups, drills and retention are no answer to the fault: not counted.
    runs = [
        r
        for r in view.api_get("/actions?limit=500")["actions"]
        if since <= datetime.fromisoformat(r["created_at"]) <= until
        and r.get("requested_by") != SCHEDULE
    ]
    detected = [d for i in incidents if (d := _at(i["detected_at"]))]
    targets = chosen.targets(record)
    on_target = [d for i in incidents if i["target"] in targets and (d := _at(i["detected_at"]))]
    acted = [a for r in runs if (a := _at(r["started_at"]) or _at(r["created_at"]))]
    succeeded = Counter(
        (r["action"], r["target"]) for r in runs if r["state"] == ActionState.SUCCEEDED
    )
    awaiting = [r for r in runs if r["state"] == ActionState.AWAITING_APPROVAL]
    first_runs = sorted(runs, key=lambda r: datetime.fromisoformat(r["created_at"]))
    approved = []
    if approve:
        for run in awaiting:
            response = requests.post(
                f"{view.api_url}/actions/{run['id']}/approve", headers=view.api_headers, timeout=10
            )
            approved.append({"id": run["id"], "status": response.status_code})
    return {
        "detect_s": (min(detected) - since).total_seconds() if detected else None,
        "targets": sorted(targets),
        "target_detect_s": (min(on_target) - since).total_seconds() if on_target else None,
        "healing_runs": healing_runs(runs, targets, since, whole_at),
        "act_s": (min(acted) - since).total_seconds() if acted else None,
        "incidents": [f"{i['kind']} ({i['state']})" for i in incidents],
        "actions": [f"{r['action']} {r['target']} {r['state']}" for r in runs],
        "runs": [{k: r.get(k) for k in RUN_FIELDS} for r in first_runs[:MAX_RUNS_KEPT]],
        # A run its precheck refused (a shop alive but not ready) did nothing: not an action.
        "false_actions": sum(
            1
            for r in runs
            if r["action"] not in chosen.expected_actions
            and r["state"] not in (ActionState.SKIPPED, ActionState.DRY_RUN)
        ),
        "duplicate_actions": sum(n - 1 for n in succeeded.values()),
        "restore_awaiting_approval": [r["id"] for r in awaiting],
        "approved": approved,
    }


def run_trial(
    view: StackView,
    kind: str,
    load: CarefulLoad,
    sampler: SplitBrainSampler,
    *,
    goal: Objectives,
    duration_s: float | None = None,
    approve: bool = False,
    margin_s: float = TRIAL_MARGIN_S,
    settle_s: float = SETTLE_AFTER_S,
) -> dict[str, Any]:
    """One fault under the running load: settle, inject, wait for full redundancy until the
    trial's deadline, measure. A stack not whole again after it, even once the clean-up has
    started what was dead, raises StackLostError (with the trial)."""
    chosen = fault(kind)
    settle_or_stop(view, settle_s, f"before {kind}")
    trial_start = time.monotonic()
    record = chosen.run(
        view, duration_s=chosen.default_duration_s if duration_s is None else duration_s
    )
    t0 = record.started.mono
    deadline = trial_deadline(record, goal, margin_s)
    whole_at, proposed = _wait_whole(view, chosen, record, deadline, approve=approve)
    # Not whole by its deadline (an operator's restore aside): the trial has failed; what is
    # up and what the control plane holds open then is its report.
    at_deadline = stack_at(view, t0) if whole_at is None and proposed is None else None
    if whole_at is not None:
        time.sleep(AFTER_RECOVERY_S)
    cleaned = clean_up(view)
    lost: StackLostError | None = None
    try:
        settle_or_stop(view, settle_s, f"after {kind}")
    except StackLostError as exc:
        lost = exc
    acks = load.acknowledged()
    after = [a for a in acks if a.first_sent > t0]
    end = time.monotonic()
    window = [t0, *(a.acked for a in acks if t0 < a.acked <= end), end]
    mine = [a.order_id for a in acks if a.acked >= trial_start]
    whole_wall = _wall(record, whole_at)
    try:
        counted = _count_orders(view, mine, record.details.get("deleted_ids", []))
        seen = control_plane_view(
            view, record, chosen, datetime.now(UTC), approve=False, whole_at=whole_wall
        )
    except (LabError, psycopg.Error, requests.RequestException) as exc:
        if lost is None:
            raise
        # The stack is lost: what could not be read is said, and the trial fails on it.
        counted = {"lost": 0, "duplicates": 0, "error": f"not measured: {exc}"}
        seen = _unseen()
    if proposed is not None:
        seen["restore_awaiting_approval"] = proposed["restore_awaiting_approval"]
        seen["approved"] = proposed["approved"]
    # Drawn once the day is over: the load after the recovery is seen then.
    recovered = whole_at if whole_at is not None else min(end, deadline)
    trial = {
        "_window": ChartWindow(t0 - SERIES_BEFORE_S, recovered + SERIES_AFTER_S, record.started),
        "fault": record.to_json(),
        "outage_s": round(after[0].acked - t0, 3) if after else None,
        "longest_gap_s": round(max(b - a for a, b in itertools.pairwise(window)), 3),
        "redundancy_s": round(whole_at - t0, 3) if whole_at else None,
        # The control plane only if a run of its own healed each of the fault's targets.
        "healed_by": healer(
            cleaned=bool(cleaned), whole=whole_at is not None, healing=seen["healing_runs"]
        ),
        "cleaned_up": cleaned,
        "acknowledged": len(mine),
        **counted,
        "split_brain": sampler.count_between(t0, end),
        **seen,
    }
    if at_deadline is not None:
        trial["at_deadline"] = at_deadline
    if lost is not None:
        raise StackLostError(str(lost), trial)
    return trial


def _wall(record: FaultRecord, mono: float | None) -> datetime | None:
    """A monotonic instant of this process on the wall clock (the control plane's records')."""
    if mono is None:
        return None
    return record.started.at + timedelta(seconds=mono - record.started.mono)


def _wait_whole(
    view: StackView, chosen: Fault, record: FaultRecord, deadline: float, *, approve: bool
) -> tuple[float | None, dict[str, Any] | None]:
    """Poll until the stack is whole (when), a destructive fault's restore awaits an operator
    (what the control plane did), or the deadline."""
    proposed: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if chosen.destructive and proposed is None:
            seen = control_plane_view(view, record, chosen, datetime.now(UTC), approve=approve)
            if seen["restore_awaiting_approval"]:
                proposed = seen
                if not approve:
                    break  # detected and proposed: an operator's move from here
        try:
            if time.monotonic() > record.started.mono + 1 and is_settled(view, chosen):
                return time.monotonic(), proposed
        except Exception:  # a poll during the outage: "not yet"
            logger.debug("settle poll failed", exc_info=True)
        time.sleep(0.2)
    return None, proposed


def _count_orders(view: StackView, mine: list[str], deleted: list[str]) -> dict[str, Any]:
    present = view.orders_present(mine)
    return {
        "lost": len(set(mine) - set(present) - set(deleted)),
        "duplicates": sum(c - 1 for c in present.values()),
    }


def _unseen() -> dict[str, Any]:
    return {
        "detect_s": None,
        "targets": [],
        "target_detect_s": None,
        "healing_runs": {},
        "act_s": None,
        "incidents": [],
        "actions": [],
        "runs": [],
        "false_actions": 0,
        "duplicate_actions": 0,
        "restore_awaiting_approval": [],
        "approved": [],
    }


def gameday(
    data_dir: Path,
    *,
    faults: Sequence[str] = DEFAULT_FAULTS,
    trials: int = 1,
    objectives: Mapping[str, Objectives] | None = None,
    soak_s: float | None = None,
    clients: int = 4,
    approve: bool = False,
    seed: int | None = None,
    progress: Progress = lambda line: logger.info("%s", line),
    margin_s: float = TRIAL_MARGIN_S,
    settle_s: float = SETTLE_AFTER_S,
    stress: bool = False,
) -> dict[str, Any]:
    """Every fault `trials` times under load (or, with `soak_s`, random faults at random
    times for that long); then the whole load verified. With `stress`, beside CPU hogs on
    every core (lab/stress.py) and judged against the stress objectives. Written to
    DATA_DIR/gamedays/, where the control plane's dashboard shows it (its `gamedays_dir`)."""
    view = StackView.of(data_dir)
    goals = objectives if objectives is not None else load_objectives(stress=stress)
    unknown = [k for k in faults if k not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults: {unknown}")
    wait_until(lambda: is_settled(view), timeout_s=SETTLE_TIMEOUT_S, what="a whole stack")
    with view.leader_db("inventory") as conn:
        catalog = [int(r[0]) for r in conn.execute("SELECT id FROM products").fetchall()]
    # The products a fault keeps for itself (poison-cache's: an order of one would wash its
    # poison out before the control plane looks) are never ordered.
    reserved = set().union(*(fault(k).reserved_products for k in faults))
    products = [p for p in catalog if p not in reserved]
    if not products:
        raise ValueError(f"the faults reserve every product of the catalog ({len(catalog)})")
    before = Ledger.read(view)
    started_at = datetime.now(UTC)
    load = CarefulLoad(view.shop_urls(), products, clients=clients, seed=seed).start()
    sampler = SplitBrainSampler(view).start()
    rng = random.Random(seed)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in faults}
    plan = _soak_plan(faults, soak_s, rng) if soak_s else (k for _ in range(trials) for k in faults)
    stopped: str | None = None
    hogs = _hogs(view, len(faults) * trials, soak_s, settle_s) if stress else None
    try:
        if hogs is not None:
            hogs.start()
        wait_until(lambda: len(load.acknowledged()) >= 10, timeout_s=60, what="orders flowing")
        for kind in plan:
            try:
                trial = run_trial(
                    view,
                    kind,
                    load,
                    sampler,
                    goal=objectives_for(kind, goals),
                    approve=approve,
                    margin_s=margin_s,
                    settle_s=settle_s,
                )
            except StackLostError as exc:  # every later trial would wait and fail: stop
                stopped = str(exc)
                if exc.trial is not None:
                    results[kind].append(exc.trial)
                    progress(_trial_line(kind, exc.trial))
                progress(f"stopped: {stopped}")
                break
            except Exception as exc:  # one failed trial is a FAIL, not the end of the day
                logger.exception("trial of %s failed", kind)
                trial = _failed_trial(kind, exc)
            results[kind].append(trial)
            progress(_trial_line(kind, trial))
            if soak_s:
                time.sleep(rng.uniform(0, 10))  # random times: not always right after healing
    finally:
        if hogs is not None:  # first: a Ctrl-C leaves no hog behind
            hogs.stop()
        load.stop()
        sampler.stop()
    for trial in (t for ts in results.values() for t in ts):
        window = trial.pop("_window", None)
        trial["series"] = window.series(load) if isinstance(window, ChartWindow) else None
    deleted = [
        i
        for ts in results.values()
        for t in ts
        for i in t["fault"]["details"].get("deleted_ids", [])
    ]
    if stopped is None:
        try:
            settle_or_stop(view, settle_s, "after the last trial")
        except StackLostError as exc:
            stopped = str(exc)
    verification = _verify(view, load, before, deleted)
    verdicts = [judge(kind, ts, objectives_for(kind, goals)) for kind, ts in results.items() if ts]
    not_run = [kind for kind, ts in results.items() if not ts]
    report = {
        "started_at": started_at.isoformat(),
        "ended_at": datetime.now(UTC).isoformat(),
        "data_dir": str(view.data_dir),
        "soak_s": soak_s,
        # Under stress: the hogs, and the machine's load average while they ran.
        "stress": hogs.report() if hogs is not None else None,
        "load": load.report(),
        "split_brain_samples": sampler.samples,
        "verification": verification,
        "verdicts": verdicts,
        "trials": results,
        # Why the day ended before its plan did, and the faults it never ran.
        "stopped": stopped,
        "not_run": not_run,
        "verdict": "PASS"
        if stopped is None
        and verification["ok"]
        and all(v["verdict"] == "PASS" for v in verdicts)
        and not not_run
        else "FAIL",
    }
    out = gamedays_dir(view.data_dir) / f"{started_at:%Y%m%dT%H%M%SZ}.json"
    write_report(report, out)
    report["written_to"] = str(out)
    return report


def _hogs(view: StackView, trials: int, soak_s: float | None, settle_s: float) -> CpuHogs:
    """CPU hogs at the control plane's priority, with a deadline of their own past the longest
    the day can last (they are stopped at its end; this only covers a killed game day)."""
    longest_s = (soak_s or 0) + trials * (MAX_TRIAL_WAIT_S + settle_s + 120) + 600
    pid = view.components().get("controlplane", {}).get("pid")
    return CpuHogs(timeout_s=longest_s, priority_of=pid if isinstance(pid, int) else None)


def _verify(
    view: StackView, load: CarefulLoad, before: Ledger, deleted: list[str]
) -> dict[str, Any]:
    """The whole load checked (verify_orders); on a stack with no leader to read, not ok,
    saying why."""
    try:
        return verify_orders(view, load.acknowledged(), before, deleted=deleted)
    except (LabError, psycopg.Error) as exc:
        return {"ok": False, "error": f"the orders could not be verified: {exc}"}


def _soak_plan(faults: Sequence[str], soak_s: float, rng: random.Random) -> Any:
    deadline = time.monotonic() + soak_s
    while time.monotonic() < deadline:
        yield rng.choice(list(faults))


def _failed_trial(kind: str, exc: Exception) -> dict[str, Any]:
    return {
        "fault": {"kind": kind, "details": {}},
        "error": f"{type(exc).__name__}: {exc}",
        "outage_s": None,
        "redundancy_s": None,
        "lost": 0,
        "duplicates": 0,
        "split_brain": 0,
        "false_actions": 0,
        "duplicate_actions": 0,
        "detect_s": None,
        "act_s": None,
    }


def _trial_line(kind: str, t: dict[str, Any]) -> str:
    if t.get("error"):
        return f"{kind}: ERROR {t['error']}"

    def s(v: float | None) -> str:
        return "never" if v is None else f"{v:.2f}s"

    stuck = t.get("at_deadline")
    return (
        f"{kind}: detect {s(t['detect_s'])}, act {s(t['act_s'])}, outage {s(t['outage_s'])}, "
        f"redundant {s(t['redundancy_s'])} (healed by {t['healed_by']}), "
        f"{t['acknowledged']} acked, "
        f"lost {t['lost']}, dup {t['duplicates']}, split {t['split_brain']}, "
        f"actions {t['actions']}"
        + (
            f"; not whole at its deadline ({stuck['after_s']:g} s): {at_deadline_line(stuck)}"
            if stuck
            else ""
        )
    )


def write_report(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
