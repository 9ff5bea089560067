"""The action engine: runs remediations beside the loop (Patroni's AsyncExecutor).

Each run is claimed by compare-and-set (pending -> running), then: precheck (re-reads live
state), execute, verify with a deadline, retried with backoff up to the policy's attempts, then
succeeded or escalated. Every step is an audit row. A run is never started twice."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from controlplane import store
from controlplane.config import PolicySpec, Settings
from controlplane.facts import StoreFacts
from controlplane.metrics import Metrics
from controlplane.models import ActionRun, ActionState, Incident
from controlplane.notify import Notifier
from remediation.base import (
    Action,
    ActionContext,
    ActionError,
    Check,
    Decline,
    operator_params,
)
from remediation.executors.base import Cancel, Cancelled, Executor, ExecutorError, Unreachable
from remediation.registry import UnknownAction, action_class, build_action

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class NotYetHealthy(Exception):
    """Verification failed this attempt: worth another attempt."""


class ActionEngine:
    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        executor_of: Callable[[str | None], Executor],
        health_of: Callable[[str], Check],
        notifier: Notifier,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = utcnow,
        backoff_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.executor_of = executor_of  # each target's (controlplane/executors.py)
        self.health_of = health_of
        self.notifier = notifier
        self.metrics = metrics
        self.clock = clock
        self.backoff_s = backoff_s
        self.pool = ThreadPoolExecutor(settings.action_workers, thread_name_prefix="action")
        self.in_flight: set[int] = set()
        self.cancels: dict[int, Cancel] = {}  # each run in flight: how to make it stand aside
        self.lock = threading.Lock()
        # Called with the run's action kind when a run ends, however it ended (the loop looks
        # again; a backup run's directory goes into the catalog).
        self.on_finished: Callable[[str], None] = lambda action: None

    @property
    def busy(self) -> int:
        with self.lock:
            return len(self.in_flight)

    # -- starting ------------------------------------------------------------------------------
    def dispatch_pending(self) -> list[int]:
        """Claim every pending run (compare-and-set) and start it beside the loop."""
        # Read, not write: a cycle with nothing to start waits for no writer (the claim below
        # is a compare-and-set, in a write transaction of its own).
        with store.read(self.factory) as s:
            waiting = store.runs_in_state(s, ActionState.PENDING)
            pending = [r.id for r in waiting if not self._would_yield(r, waiting)]
        started = []
        for run_id in pending:
            now = self.clock()
            with store.transaction(self.factory) as s:
                if not store.claim_run(s, run_id, self.settings.instance_id, now):
                    self._make_way(s, run_id)
                    continue  # taken by another worker, or its target is busy: later
                run = s.get(ActionRun, run_id)
                assert run is not None
                action = run.action
                store.audit(
                    s,
                    actor=self.settings.instance_id,
                    verb="start",
                    at=now,
                    action_run_id=run_id,
                    incident_id=run.incident_id,
                    message=f"{run.action} on {run.target} started",
                )
                if run.incident_id is not None:
                    store.add_timeline(s, run.incident_id, "action", f"{run.action} started", now)
                    incident = s.get(Incident, run.incident_id)
                    if incident is not None and incident.action_started_at is None:
                        incident.action_started_at = now
            with self.lock:
                self.in_flight.add(run_id)
                self.cancels[run_id] = Cancel()
                self.metrics.actions_in_progress.set(len(self.in_flight))
            self.pool.submit(self._run_guarded, run_id, action)
            started.append(run_id)
        return started

    @staticmethod
    def _would_yield(run: ActionRun, waiting: list[ActionRun]) -> bool:
        """A run that would stand aside for another one waiting for its target is not started
        before it (a retention run queued before a failover would only be cancelled)."""
        try:
            yields_to = action_class(run.action).yields_to
        except UnknownAction:
            return False
        return any(w.target == run.target and w.action in yields_to for w in waiting)

    def _make_way(self, s: Session, run_id: int) -> None:
        """A pending run whose target is busy: a run in flight there that yields to it (a
        backup, for a failover) is told to stand aside; it ends at its next step."""
        waiting = s.get(ActionRun, run_id)
        if waiting is None or waiting.state != ActionState.PENDING:
            return
        for running in store.runs_in_state(s, ActionState.RUNNING):
            if running.target != waiting.target or running.id == run_id:
                continue
            try:
                yields = waiting.action in action_class(running.action).yields_to
            except UnknownAction:
                continue
            with self.lock:
                cancel = self.cancels.get(running.id)
            if yields and cancel is not None and cancel.reason is None:
                logger.info("run %d (%s) stands aside for %s", running.id, running.action,
                            waiting.action)  # fmt: skip
                cancel.cancel(f"{waiting.action} on {waiting.target} waits for it")

    def abandon_orphans(
        self, *, owner: str | None = None, older_than_s: float | None = None
    ) -> list[int]:
        """Runs `running` without a live worker are marked abandoned (failed-safe) and
        escalated, never run again, which frees their target. On becoming leader: every such
        run (left by a dead control plane). Each cycle: `owner`'s (ours) whose worker thread
        is gone, `older_than_s` after they started (a claim is not yet in flight at once)."""
        now = self.clock()
        with store.read(self.factory) as s:
            candidates = [
                r.id
                for r in store.runs_in_state(s, ActionState.RUNNING)
                if (owner is None or r.owner == owner)
                and (
                    older_than_s is None
                    or r.started_at is None
                    or _aware(r.started_at) < now - timedelta(seconds=older_than_s)
                )
            ]
        with self.lock:
            candidates = [run_id for run_id in candidates if run_id not in self.in_flight]
        if not candidates:
            return []
        return store.with_retries(
            lambda: self._abandon(candidates, now), what=f"abandon runs {candidates}"
        )

    def _abandon(self, candidates: list[int], now: datetime) -> list[int]:
        abandoned: list[tuple[int, bool]] = []  # (run, escalated)
        touched: set[tuple[str, str]] = set()
        with store.transaction(self.factory) as s:
            for run_id in candidates:
                run = s.get(ActionRun, run_id)
                if run is None or run.id in self.in_flight:
                    continue
                # An action that may start over is tried again for its incident, after the
                # backoff; so is any run that never began to execute (its precheck only
                # looked: nothing is half done). Any other (a failover, a restore that began
                # to act) is a human's to look at.
                again = run.incident_id is not None and (
                    may_start_over(run.action) or not run.attempts
                )
                if not store.change_run_state(
                    s,
                    run.id,
                    ActionState.RUNNING,
                    ActionState.ABANDONED,
                    finished_at=now,
                    retry=again,
                ):
                    continue
                then = (
                    "its next try starts over, after a backoff"
                    if again
                    else "not re-run; a human must check"
                )
                message = f"{run.owner} stopped during {run.action}: {then}"
                store.audit(
                    s,
                    actor=self.settings.instance_id,
                    verb="abandon",
                    at=now,
                    action_run_id=run.id,
                    incident_id=run.incident_id,
                    message=message,
                )
                if run.incident_id is not None:
                    kind = "action" if again else "escalated"
                    store.add_timeline(
                        s, run.incident_id, kind, f"{run.action} abandoned mid-way: {then}", now
                    )
                    if not again:
                        store.mark_escalated(s, run.incident_id, now)
                abandoned.append((run.id, not again))
                service = self.settings.service(run.target)
                if service is not None and service.component:
                    touched.add((service.name, service.component))
        for name, component in sorted(touched):
            # What did the dead run leave? Asking records a process it started unrecorded.
            try:
                running = self.executor_of(name).is_running(component)
            except ExecutorError as exc:
                logger.warning("cannot tell whether %s runs: %s", component, exc)
                continue
            logger.info(
                "after an abandoned run, %s %s", component, "runs" if running else "is down"
            )
        for run_id, escalated in abandoned:
            self.metrics.actions.labels("unknown", ActionState.ABANDONED).inc()
            if escalated:
                self.metrics.escalations.inc()
                self.notifier.notify(
                    "escalation",
                    f"action run {run_id} abandoned mid-way: a human must check",
                    {"run": run_id},
                )
        return [run_id for run_id, _ in abandoned]

    # -- running -------------------------------------------------------------------------------
    def _run_guarded(self, run_id: int, action: str) -> None:
        try:
            self._run(run_id)
        except Exception as exc:  # the job's catch-all: record, escalate, go on
            logger.exception("action run %d crashed", run_id)
            try:
                self._finish(run_id, ActionState.FAILED, {"error": repr(exc)}, "crashed: escalated")
            except Exception:  # left `running`: the loop's reaper abandons it, not in flight
                logger.exception("action run %d: its finish could not be recorded", run_id)
        finally:
            with self.lock:
                self.in_flight.discard(run_id)
                self.cancels.pop(run_id, None)
                self.metrics.actions_in_progress.set(len(self.in_flight))
            self.on_finished(action)

    def _policy(self, run: ActionRun) -> PolicySpec:
        """The run's policy (named when it was requested); else the one an operator's request
        for that action and target runs with, else bare defaults."""
        name = run.params.get("policy")
        found = self.settings.policy(name) if isinstance(name, str) else None
        found = found or self.settings.policy_for_request(run.action, run.target)
        return found or PolicySpec(name="manual", source="operator", match={}, action=run.action)

    def _run(self, run_id: int) -> None:
        with store.transaction(self.factory) as s:
            run = s.get(ActionRun, run_id)
            assert run is not None
            last_good_at = store.last_good_before_incident(s, run.incident_id)
        policy = self._policy(run)
        service = self.settings.service(run.target)
        try:
            action = build_action(run.action)
        except UnknownAction as exc:
            self._finish(run_id, ActionState.FAILED, {"error": str(exc)}, str(exc))
            return
        # Only what the action lets an operator supply, checked again here: everything else
        # (where to connect, what to send, which files) comes from the policy alone.
        try:
            supplied = operator_params(type(action), run.params.get("params") or {}, policy.params)
        except (ValidationError, TypeError) as exc:
            why = f"operator params refused: {exc}"
            self._finish(run_id, ActionState.FAILED, {"error": why}, why)
            return
        params: dict[str, Any] = {**policy.params, **supplied}
        ctx = ActionContext(
            target=run.target,
            component=service.component if service else None,
            params=params,
            executor=self.executor_of(run.target),
            is_healthy=lambda: self.health_of(run.target),
            labels=dict(service.labels) if service else {},
            last_good_at=last_good_at,
            cancel=self.cancels.get(run_id),
            facts=StoreFacts(
                self.factory,
                run.target,
                by=f"run {run_id} ({run.action})",
                run_id=run_id,
                clock=self.clock,
            ),
        )
        try:
            pre = self._step(run, "precheck", lambda: action.precheck(ctx))
        except Unreachable as exc:
            # Its host cannot be reached: nothing was looked at or done there, and nothing is
            # taken for done. Not a crash: "not now", tried again while the incident lasts.
            self._decline(run, Check.not_now(f"its host is unreached: {exc}"))
            return
        except ActionError as exc:
            self._finish(
                run_id,
                ActionState.FAILED,
                {"error": str(exc), "permanent": exc.permanent},
                f"precheck: {exc}",
                retry=self._may_retry(run, action, exc),
            )
            return
        if not pre.ok:
            self._decline(run, pre)
            return
        retrying = Retrying(
            stop=stop_after_attempt(policy.max_attempts) | stop_after_delay(policy.run_timeout_s),
            wait=wait_exponential(multiplier=self.backoff_s, max=30),
            retry=retry_if_exception_type((NotYetHealthy, ActionError)),
            reraise=True,
        )
        tried = 0
        try:
            for attempt in retrying:
                with attempt:
                    tried = attempt.retry_state.attempt_number
                    self._attempt(run, action, ctx, policy, tried)
        except Cancelled as exc:  # it stood aside for another run: nothing to escalate
            self._finish(
                run_id,
                ActionState.FAILED,
                {"error": f"cancelled: {exc}", "attempts": tried},
                f"stood aside: {exc}; nothing of it kept",
                escalate=False,
            )
            return
        except (NotYetHealthy, ActionError, _Permanent) as exc:
            again = self._may_retry(run, action, exc)
            self._finish(
                run_id,
                ActionState.FAILED,
                {"error": str(exc), "attempts": tried, "permanent": isinstance(exc, _Permanent)},
                f"gave up after {tried} attempt(s): {exc}; "
                + ("tried again with backoff" if again else "escalated"),
                retry=again,
            )
            return
        self._finish(run_id, ActionState.SUCCEEDED, {}, "verified recovered")

    @staticmethod
    def _may_retry(run: ActionRun, action: Action, exc: Exception) -> bool:
        """A failed run may be followed by a new try for its incident when the action may
        start over and nothing said the failure is permanent; else it escalates (a failover
        or a restore left half done is a human's to look at)."""
        permanent = isinstance(exc, _Permanent) or getattr(exc, "permanent", False)
        return run.incident_id is not None and action.may_start_over and not permanent

    def _decline(self, run: ActionRun, pre: Check) -> None:
        """A precheck's no, with its consequence: nothing to do marks the incident recovered;
        not now is tried again with backoff while the incident lasts (a run for no incident,
        an operator's, is asked again by the operator); never escalates at once."""
        kind = pre.decline
        if kind is None:  # an action that does not say which no: the careful reading
            logger.error("%s's precheck declined without its kind: treated as never", run.action)
            kind = Decline.NEVER
        then = {
            Decline.NOTHING_TO_DO: "the target is healthy",
            Decline.NOT_NOW: "tried again with backoff while the incident lasts"
            if run.incident_id is not None
            else "not now: ask again later",
            Decline.NEVER: "unsafe: escalated to a human, not tried again",
        }[kind]
        self._finish(
            run.id,
            ActionState.SKIPPED,
            {"precheck": pre.reason, "decline": str(kind)},
            f"precheck declined ({kind}): {pre.reason}; {then}",
            recovered=kind is Decline.NOTHING_TO_DO,
            retry=kind is Decline.NOT_NOW and run.incident_id is not None,
            escalate=kind is Decline.NEVER,
        )

    def _attempt(
        self, run: ActionRun, action: Action, ctx: ActionContext, policy: PolicySpec, number: int
    ) -> Mapping[str, Any]:
        with store.transaction(self.factory) as s:
            s.get(ActionRun, run.id).attempts = number  # type: ignore[union-attr]
        try:
            outcome = self._step(run, f"execute #{number}", lambda: action.execute(ctx))
        except ActionError as exc:
            if exc.permanent:
                raise _Permanent(str(exc)) from exc
            raise
        self._record(run, "output", outcome.summary, dict(outcome.data))
        deadline = time.monotonic() + policy.verify_timeout_s
        check = Check(False, "not verified yet")
        started = time.monotonic()
        while time.monotonic() < deadline:
            check = action.verify(ctx)
            if check.ok:
                break
            time.sleep(0.2)
        self._record(
            run,
            "verify",
            f"{'passed' if check.ok else 'failed'}: {check.reason}",
            {"ok": check.ok},
            duration_ms=(time.monotonic() - started) * 1000,
        )
        if not check.ok:
            raise NotYetHealthy(check.reason)
        return dict(outcome.data)

    def _step(self, run: ActionRun, verb: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            result = call()
        except ActionError as exc:
            self._record(
                run,
                verb,
                f"failed: {exc}",
                {"permanent": exc.permanent},
                duration_ms=(time.monotonic() - started) * 1000,
            )
            raise
        message = getattr(result, "reason", None) or getattr(result, "summary", "") or "done"
        data = {"ok": result.ok} if isinstance(result, Check) else {}
        self._record(run, verb, message, data, duration_ms=(time.monotonic() - started) * 1000)
        return result

    def _record(
        self,
        run: ActionRun,
        verb: str,
        message: str,
        data: dict[str, Any],
        duration_ms: float | None = None,
    ) -> None:
        now = self.clock()
        store.with_retries(
            lambda: self._write_record(run, verb, message, data, duration_ms, now),
            what=f"audit {verb} of run {run.id}",
        )

    def _write_record(
        self,
        run: ActionRun,
        verb: str,
        message: str,
        data: dict[str, Any],
        duration_ms: float | None,
        now: datetime,
    ) -> None:
        with store.transaction(self.factory) as s:
            store.audit(
                s,
                actor=self.settings.instance_id,
                verb=verb,
                message=message,
                at=now,
                action_run_id=run.id,
                incident_id=run.incident_id,
                data=data,
                duration_ms=duration_ms,
            )
            if verb == "output" and run.incident_id is not None:
                # What the action did (e.g. a restore's measured loss) belongs on the incident.
                store.add_timeline(s, run.incident_id, "action", f"{run.action}: {message}", now)

    def _finish(
        self,
        run_id: int,
        state: ActionState,
        output: dict[str, Any],
        why: str,
        *,
        recovered: bool = False,
        retry: bool = False,
        escalate: bool | None = None,
    ) -> None:
        """running -> `state`, audited; retried on "database is locked" (a run left `running`
        would hold its target's lock: the reaper's last resort, not the plan). `recovered`: a
        run skipped because its target is healthy marks its incident recovered, as a success
        does (a failure after it is a new one, which gets its own incident and action).
        `retry`: the incident's next try follows after a backoff (the loop decides when).
        `escalate` (by default: a failure that is not retried) tells a human at once."""
        now = self.clock()
        loud = (state is ActionState.FAILED and not retry) if escalate is None else escalate
        run = store.with_retries(
            lambda: self._write_finish(
                run_id, state, output, why, now, recovered, retry=retry, escalate=loud
            ),
            what=f"finish run {run_id}",
        )
        if run is None:
            return
        self.metrics.actions.labels(run.action, state).inc()
        if loud:
            self.metrics.escalations.inc()
            self.notifier.notify(
                "escalation",
                f"{run.action} on {run.target}: {why}",
                {"run": run_id, "incident": run.incident_id, "why": why},
            )
        elif state is ActionState.SUCCEEDED:
            self.notifier.notify(
                "action", f"{run.action} on {run.target} recovered it", {"run": run_id}
            )

    def _write_finish(
        self,
        run_id: int,
        state: ActionState,
        output: dict[str, Any],
        why: str,
        now: datetime,
        recovered: bool = False,
        *,
        retry: bool = False,
        escalate: bool = False,
    ) -> ActionRun | None:
        with store.transaction(self.factory) as s:
            if not store.change_run_state(
                s, run_id, ActionState.RUNNING, state, finished_at=now, output=output, retry=retry
            ):
                return None
            run = s.get(ActionRun, run_id)
            assert run is not None
            store.audit(
                s,
                actor=self.settings.instance_id,
                verb="finish",
                at=now,
                action_run_id=run_id,
                incident_id=run.incident_id,
                message=f"{state}: {why}",
                data=output,
            )
            if run.incident_id is not None:
                kind = "action"
                if state is ActionState.SUCCEEDED:
                    kind = "recovered"
                elif escalate:
                    kind = "escalated"
                store.add_timeline(s, run.incident_id, kind, f"{run.action}: {why}", now)
                if state is ActionState.SUCCEEDED or recovered:
                    store.mark_incident(s, run.incident_id, recovered_at=now)
                if escalate:
                    store.mark_escalated(s, run.incident_id, now)
        return run

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.busy:
                return True
            time.sleep(0.05)
        return False

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _aware(at: datetime) -> datetime:
    """SQLite hands datetimes back naive; they were stored in UTC."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)


class _Permanent(Exception):
    """An ActionError marked permanent: stop retrying (not matched by the retry filter)."""


def may_start_over(action: str) -> bool:
    """Whether an abandoned run of `action` may be followed by a new one (a new incident)."""
    try:
        return action_class(action).may_start_over
    except UnknownAction:
        return False
