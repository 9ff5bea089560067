"""The loop (Patroni's ha.py): `run_cycle(now) -> str`. Hold the lease, take a snapshot, call
the pure `decide`, persist the decisions, start actions beside the loop, say why in one line.

A cycle's work is bounded however many alerts came in: the snapshot holds every probe, but of
the alerts only what may need a decision (at most `ALERT_BATCH` to open, as many to close, the
few a policy may act on); what a probe's incident needs is decided, written and started first;
the rest is written in batches of `APPLY_BATCH`, a statement per kind and one short write
transaction each, so probes, webhooks and action runs keep writing; what is left over is the
next cycle's, which comes at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from controlplane import store
from controlplane.config import Settings
from controlplane.engine import ActionEngine, utcnow
from controlplane.incidents import (
    AlertState,
    Decision,
    Escalate,
    Hold,
    IncidentView,
    Open,
    ProbeState,
    RequestAction,
    Resolve,
    RunView,
    SetFlapping,
    SilenceView,
    Snapshot,
    decide,
    describe,
    policy_for,
)
from controlplane.logsafe import printable
from controlplane.metrics import Metrics
from controlplane.models import UNMATCHED, ActionRun, ActionState, Alert
from controlplane.notify import Notifier
from controlplane.sources import AlertStatus, alert_of, of_alert
from probes.base import Health

logger = logging.getLogger(__name__)

LEADER_LEASE = "leader"
RECENT_ALERTS = timedelta(minutes=10)
APPLY_BATCH = 250  # decisions per write transaction
ALERT_BATCH = 500  # alerts to open, alerts to close, incidents to match: at most, per cycle
APPLY_BUDGET_S = 0.3  # a cycle starts no new batch after this; the rest is the next cycle's
BATCH_LOCK_WAIT_S = 0.1  # a batch waits this long for the write lock, else the next cycle's
SLOW_CYCLE_S = 1.0  # a cycle longer than this logs where its time went
STRANDED_AFTER_S = 5.0  # a run of ours `running` this long without a worker is abandoned
NO_EFFECT = frozenset({ActionState.SKIPPED, ActionState.DRY_RUN})
ACTIVE = (ActionState.PENDING, ActionState.RUNNING)
MODE_STATE = {
    "auto": ActionState.PENDING,
    "approval": ActionState.AWAITING_APPROVAL,
    "dry_run": ActionState.DRY_RUN,
}


def service_of_alert(settings: Settings, labels: dict[str, Any]) -> str:
    """The first service whose labels all appear on the alert; else its `service` label."""
    for service in settings.services:
        if service.labels and all(labels.get(k) == v for k, v in service.labels.items()):
            return service.name
    return str(labels.get("service") or labels.get("instance") or labels.get("alertname", "?"))


@dataclass(frozen=True, slots=True)
class Seen:
    """What a cycle read besides its snapshot: policies matched to incidents that had none
    yet (to be written), and whether a bound left work for the next cycle."""

    matched: dict[int, str | None]
    more: bool


def matched_policy(
    snapshot: Snapshot, source: str, kind: str, target: str, labels: Any
) -> str | None:
    """The name of the policy that may act on such an incident (pure, as `decide` finds it)."""
    policy = policy_for(snapshot, (source, kind, target, labels))
    return policy.name if policy else None


def _alert_state(settings: Settings, a: Any) -> AlertState:
    return AlertState(
        fingerprint=a.fingerprint,
        alertname=a.alertname,
        status=a.status,
        labels=dict(a.labels),
        summary=str(a.annotations.get("summary", a.alertname)),
        starts_at=a.starts_at,
        service=service_of_alert(settings, a.labels),
    )


def build_snapshot(session: Session, settings: Settings, now: datetime) -> tuple[Snapshot, Seen]:
    """What may need a decision now, bounded however many alerts came in: every probe and
    probe incident; at most ALERT_BATCH alerts to open and to close; the alert incidents some
    policy may act on that it has not acted on yet (and at most ALERT_BATCH not yet matched);
    an open alert incident no policy acts on, whose alert did not change, needs none."""
    probes = []
    for spec in settings.probes:
        runs = store.recent_probe_runs(session, spec.name, settings.flap_window)
        if not runs:
            continue
        recent = tuple(Health(r.health) for r in reversed(runs))
        failing_at: list[datetime] = []
        for r in runs:  # newest first: walk back through the failing streak
            if r.health == Health.UNKNOWN:
                continue  # could not look: neither ends the streak nor belongs to it
            if r.health == Health.UP:
                break
            failing_at.append(r.at)
        failing_since = failing_at[-1] if failing_at else None
        service = settings.service(spec.service)
        probes.append(
            ProbeState(
                probe=spec.name,
                service=spec.service,
                recent=recent,
                failures_to_open=spec.failures_to_open,
                successes_to_resolve=spec.successes_to_resolve,
                summary=runs[0].summary,
                labels=dict(service.labels) if service else {},
                failing_since=failing_since,
                failing_at=tuple(reversed(failing_at)),
            )
        )
    to_open = store.alerts_to_open(session, ALERT_BATCH)
    to_close = store.alerts_to_close(session, now - RECENT_ALERTS, ALERT_BATCH)
    rows = {a.fingerprint: a for a in [*to_open, *to_close]}
    incidents, more = store.incidents_to_plan(session, [of_alert(fp) for fp in rows], ALERT_BATCH)
    planned = [fp for i in incidents if (fp := alert_of(i.fingerprint)) is not None]
    rows.update(
        {
            a.fingerprint: a
            for a in store.alerts_by_fingerprint(session, [fp for fp in planned if fp not in rows])
        }
    )
    window = max((p.window_s for p in settings.policies), default=3600.0)
    action_runs = {r.id: r for r in store.runs_since(session, now - timedelta(seconds=window))}
    action_runs.update(
        {r.id: r for r in store.runs_of_incidents(session, [i.id for i in incidents])}
    )
    for state in ACTIVE:  # however old: what runs now is what a policy may defer to
        action_runs.update({r.id: r for r in store.runs_in_state(session, state)})
    snapshot = Snapshot(
        probes=probes,
        alerts=[_alert_state(settings, a) for a in rows.values()],
        incidents=[
            IncidentView(
                i.id,
                i.fingerprint,
                i.kind,
                i.source,
                i.target,
                dict(i.labels),
                i.flapping,
                i.recovered_at,
                severity=i.severity,
                summary=i.summary,
                detected_at=i.detected_at,
                escalated_at=i.escalated_at,
                opened_at=i.opened_at,
            )
            for i in incidents
        ],
        runs=[run_view(r) for r in action_runs.values()],
        silences=[
            SilenceView(s.id, dict(s.matchers), s.starts_at, s.ends_at)
            for s in store.active_silences(session, now)
        ],
        policies=settings.policies,
        flap_high=settings.flap_high,
        flap_low=settings.flap_low,
    )
    matched = {
        i.id: matched_policy(snapshot, i.source, i.kind, i.target, i.labels)
        for i in incidents
        if i.policy == UNMATCHED
    }
    full = len(to_open) >= ALERT_BATCH or len(to_close) >= ALERT_BATCH
    return snapshot, Seen(matched, more or full)


def run_view(r: ActionRun) -> RunView:
    """What `decide` needs of a run."""
    return RunView(
        r.incident_id,
        r.action,
        r.target,
        r.created_at,
        acted=r.state not in NO_EFFECT,
        active=r.state in ACTIVE,
        succeeded=r.state == ActionState.SUCCEEDED,
        retry=r.retry,
        try_number=r.try_number,
        finished_at=r.finished_at,
        why=why_it_ended(r),
    )


def why_it_ended(r: ActionRun) -> str:
    """A run's end in a few words: a decline's reason, a failure's error, or its state."""
    output = r.output or {}
    for key in ("precheck", "error", "skipped"):
        if isinstance(output.get(key), str):
            return printable(output[key], limit=300)
    return STATE_WORDS.get(ActionState(r.state), str(r.state))


STATE_WORDS: dict[ActionState, str] = {
    ActionState.AWAITING_APPROVAL: "awaiting an operator's approval",
    ActionState.PENDING: "waiting for its target",
    ActionState.RUNNING: "running",
    ActionState.REJECTED: "rejected by an operator",
    ActionState.DRY_RUN: "a dry run: nothing done",
    ActionState.SUCCEEDED: "succeeded",
}


def _urgency(d: Decision, probe_incidents: set[int], acting: set[str]) -> int:
    """0: what acts on a target (and opening the incident it acts for: `acting`, the
    fingerprints of this cycle's action requests), and every decision about a probe's
    incident; 1: the rest; 2: opening an alert's incident (a flood's bulk)."""
    if isinstance(d, RequestAction) or (isinstance(d, Open) and d.source != "alert"):
        return 0
    if isinstance(d, Open) and d.fingerprint in acting:
        return 0  # else its request finds no incident yet, and waits a whole loop interval
    if isinstance(d, Resolve | SetFlapping | Escalate) and d.incident_id in probe_incidents:
        return 0
    return 2 if isinstance(d, Open) else 1


class Stopwatch:
    """Where a cycle's time went, lap by lap (for the log line of a slow cycle)."""

    def __init__(self, started: float) -> None:
        self.started = self.last = started
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> float:
        """Seconds since the start."""
        now = time.monotonic()
        self.laps.append((name, now - self.last))
        self.last = now
        return now - self.started

    @property
    def total_s(self) -> float:
        return self.last - self.started

    def __str__(self) -> str:
        laps = ", ".join(f"{name} {s:.2f}s" for name, s in self.laps)
        return f"{self.total_s:.2f}s ({laps})"


class Loop:
    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        engine: ActionEngine,
        notifier: Notifier,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.engine = engine
        self.notifier = notifier
        self.metrics = metrics
        self.clock = clock
        self.is_leader = False
        self.last_sentence = ""
        self.last_cycle_at: datetime | None = None
        self.backlog = 0  # decisions left for the next cycle: it comes at once
        self.lease_until: datetime | None = None  # ours until then, as last renewed

    def run_cycle(self, now: datetime | None = None) -> str:
        now = now or self.clock()
        started = time.monotonic()
        took = Stopwatch(started)
        leader = self._hold_lease(now)
        if not leader:
            self.is_leader = False
            self.metrics.is_leader.set(0)
            return self._said(now, "standby: another control plane holds the lease")
        if not self.is_leader:
            self.is_leader = True
            self.metrics.is_leader.set(1)
            with store.transaction(self.factory) as s:
                store.unmatch_open_incidents(s)  # policies may have changed since they opened
            abandoned = self.engine.abandon_orphans()
            if abandoned:
                logger.warning("took over leadership; abandoned runs %s", abandoned)
        stranded = self.engine.abandon_orphans(
            owner=self.settings.instance_id, older_than_s=STRANDED_AFTER_S
        )
        if stranded:
            logger.warning("abandoned action runs whose worker is gone: %s", stranded)
        took.lap("lease")
        with store.read(self.factory) as s:
            snapshot, seen = build_snapshot(s, self.settings, now)
        took.lap("snapshot")
        decisions = decide(snapshot, now)
        took.lap("decide")
        by_fp = {i.fingerprint: i.id for i in snapshot.incidents}
        probe_incidents = {i.id for i in snapshot.incidents if i.source != "alert"}
        # What acts on a target and what is about a probe's incident go first, in one
        # transaction, and their actions start at once; a flood's alert incidents share what
        # time is left and the rest waits for the next cycle (which comes at once).
        acting = {d.fingerprint for d in decisions if isinstance(d, RequestAction)}
        decisions.sort(key=lambda d: _urgency(d, probe_incidents, acting))
        urgent = sum(1 for d in decisions if _urgency(d, probe_incidents, acting) == 0)
        if urgent or seen.matched:
            with store.transaction(self.factory) as s:
                store.set_incident_policies(s, seen.matched)
                self._apply(s, snapshot, decisions[:urgent], by_fp, now)
        took.lap("urgent")
        started_runs = self.engine.dispatch_pending() if urgent else []
        took.lap("dispatch")
        self.backlog = 0
        for start in range(urgent, len(decisions), APPLY_BATCH):
            # One batch at least, whatever the time: on a busy machine the snapshot alone can
            # spend the budget, and a cycle that applied nothing would do so again and again.
            if start > urgent and time.monotonic() - started > APPLY_BUDGET_S:
                self.backlog = len(decisions) - start
                break
            try:
                # Not urgent: if others' writes hold the lock, this batch waits for the next
                # cycle rather than holding this one up.
                with store.transaction(self.factory, lock_wait_s=BATCH_LOCK_WAIT_S) as s:
                    self._apply(s, snapshot, decisions[start : start + APPLY_BATCH], by_fp, now)
            except OperationalError as exc:
                if not store.is_locked(exc):
                    raise
                self.backlog = len(decisions) - start
                break
        took.lap("batches")
        applied = decisions[: len(decisions) - self.backlog]
        started_runs += self.engine.dispatch_pending()  # and an operator's, or one approved
        with store.read(self.factory) as s:
            self.metrics.incidents_open.set(store.count_open_incidents(s))
        sentence = describe(applied)
        if self.backlog or seen.more:
            sentence += f"; {self.backlog} decision(s) and more alerts left for the next cycle"
            self.backlog = max(self.backlog, 1)
        if started_runs:
            sentence += f"; started action run(s) {', '.join(map(str, started_runs))}"
        if self.engine.busy:
            sentence += f"; {self.engine.busy} action(s) in progress"
        self.metrics.cycle_seconds.observe(took.lap("end"))
        if took.total_s > SLOW_CYCLE_S:
            logger.warning("slow cycle: %s", took)
        return self._said(now, sentence)

    def _hold_lease(self, now: datetime) -> bool:
        """Renewed once half its time is gone, not every cycle: a cycle that has nothing to
        write waits for no writer (a flood of webhooks holds the write lock often)."""
        ttl_s = self.settings.lease_ttl_s
        if (
            self.is_leader
            and self.lease_until is not None
            and now < self.lease_until - timedelta(seconds=ttl_s / 2)
        ):
            return True
        with store.transaction(self.factory) as s:
            leader = store.hold_lease(s, LEADER_LEASE, self.settings.instance_id, ttl_s, now)
        self.lease_until = now + timedelta(seconds=ttl_s) if leader else None
        return leader

    def _said(self, now: datetime, sentence: str) -> str:
        if sentence != self.last_sentence or "nothing to do" not in sentence:
            logger.info("cycle: %s", printable(sentence, limit=4000))  # alert names from outside
        self.last_sentence = sentence
        self.last_cycle_at = now
        return sentence

    def _apply(
        self,
        s: Session,
        snapshot: Snapshot,
        decisions: Sequence[Decision],
        by_fp: dict[str, int],
        now: datetime,
    ) -> None:
        """One batch of decisions, in one write transaction, a statement per kind: resolves
        first (a probe incident reopened resolves the old one before it opens the new one),
        then opens, then action requests (for incidents that may have opened just before).
        `by_fp`: open incident ids by fingerprint, kept across batches."""
        resolves = {d.incident_id: d for d in decisions if isinstance(d, Resolve)}
        timeline: list[dict[str, Any]] = []
        resolved = store.resolve_incidents(s, list(resolves), now)
        for incident_id in resolved:
            reason = resolves[incident_id].reason
            timeline.append(_event(incident_id, "resolved", reason, now))
            self.metrics.incidents.labels("resolved").inc()
            self.notifier.notify("resolve", reason, {"incident": incident_id})
        # Never an action on a resolved incident: drop what awaits approval.
        for incident_id, run_id in store.expire_unapproved_runs_of(s, resolved, now):
            message = f"action run {run_id} no longer awaits approval: resolved"
            timeline.append(_event(incident_id, "action", message, now))
        opens = {d.fingerprint: d for d in decisions if isinstance(d, Open)}
        rows = [
            {
                "fingerprint": d.fingerprint,
                "kind": d.kind,
                "source": d.source,
                "target": d.target,
                "severity": d.severity,
                "summary": d.summary,
                "labels": dict(d.labels),
                "detected_at": d.detected_at,
                "opened_at": now,
                "policy": matched_policy(snapshot, d.source, d.kind, d.target, d.labels),
            }
            for d in opens.values()
        ]
        for fp, incident_id in store.open_incidents_many(s, rows).items():
            opened = opens[fp]
            by_fp[fp] = incident_id
            data = {"detected_at": opened.detected_at.isoformat()}
            timeline.append(_event(incident_id, "opened", opened.summary, now, data))
            self.metrics.incidents.labels("opened").inc()
            body = {"incident": incident_id, "target": opened.target}
            self.notifier.notify("open", opened.summary, body)
        store.add_timelines(s, timeline)
        for d in decisions:
            match d:
                case SetFlapping():
                    store.set_flapping(s, d.incident_id, d.flapping)
                    state = "flapping" if d.flapping else "stable again"
                    message = f"{state} ({d.share:.0%} state changes)"
                    store.add_timeline(s, d.incident_id, "flapping", message, now)
                case RequestAction():
                    self._request(s, d, by_fp, now)
                case Escalate():
                    self._escalate(s, d, now)
                case Hold():
                    pass  # said in the cycle's sentence; no row every tick

    def _request(self, s: Session, d: RequestAction, by_fp: dict[str, int], now: datetime) -> None:
        incident_id = by_fp.get(d.fingerprint)
        if incident_id is None:
            return  # not opened (yet): planned again next cycle
        if (fingerprint := alert_of(d.fingerprint)) is not None:
            alert = s.get(Alert, fingerprint)
            if alert is None or alert.status != AlertStatus.FIRING:
                return  # never an action on a resolved alert
        state = MODE_STATE[d.mode]
        run = store.create_action_run(
            s,
            incident_id=incident_id,
            action=d.action,
            target=d.target,
            mode=d.mode,
            state=state,
            requested_by=f"policy:{d.policy}",
            reason=d.reason,
            params={"policy": d.policy},
            created_at=now,
            try_number=d.try_number,
        )
        if run is None:
            return  # this try is already requested for this incident
        verb = {ActionState.DRY_RUN: "dry-run", ActionState.AWAITING_APPROVAL: "await-approval"}
        store.audit(
            s,
            actor=f"policy:{d.policy}",
            verb=verb.get(state, "request"),
            at=now,
            action_run_id=run.id,
            incident_id=incident_id,
            message=f"{d.action} on {d.target}: {d.reason}",
            data={"policy": d.policy, "mode": d.mode, "target": d.target, "try": d.try_number},
        )
        again = f", try {d.try_number}" if d.try_number > 1 else ""
        store.add_timeline(
            s,
            incident_id,
            "action",
            f"{d.action} requested ({d.mode}{again})",
            now,
            {"run": run.id},
        )

    def _escalate(self, s: Session, d: Escalate, now: datetime) -> None:
        """Tell a human, once per incident (compare-and-set on `escalated_at`)."""
        if not store.mark_escalated(s, d.incident_id, now):
            return
        store.add_timeline(s, d.incident_id, "escalated", d.reason, now)
        store.audit(
            s,
            actor=self.settings.instance_id,
            verb="escalate",
            at=now,
            incident_id=d.incident_id,
            message=d.reason,
        )
        self.metrics.escalations.inc()
        self.notifier.notify("escalation", d.reason, {"incident": d.incident_id})


def _event(
    incident_id: int, kind: str, message: str, at: datetime, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "incident_id": incident_id,
        "kind": kind,
        "message": message,
        "at": at,
        "data": data or {},
    }
