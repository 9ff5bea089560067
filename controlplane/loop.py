"""The loop (Patroni's ha.py): `run_cycle(now) -> str`. Hold the lease, take a snapshot, call
the pure `decide`, persist the decisions, start actions beside the loop, say why in one line.

The snapshot is read in a read transaction and the decisions are written in batches of
`APPLY_BATCH`, one short write transaction each: a flood of alerts never holds the state
store's write lock for long, so probes, webhooks and action runs keep writing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controlplane import store
from controlplane.config import Settings
from controlplane.engine import ActionEngine, utcnow
from controlplane.incidents import (
    AlertState,
    Decision,
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
)
from controlplane.logsafe import printable
from controlplane.metrics import Metrics
from controlplane.models import ActionState, Alert, IncidentState
from controlplane.notify import Notifier
from probes.base import Health

logger = logging.getLogger(__name__)

LEADER_LEASE = "leader"
RECENT_ALERTS = timedelta(minutes=10)
APPLY_BATCH = 100  # decisions per write transaction
APPLY_BUDGET_S = 0.3  # a cycle starts no new batch after this; the rest is the next cycle's
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


def build_snapshot(session: Session, settings: Settings, now: datetime) -> Snapshot:
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
    alerts = [
        AlertState(
            fingerprint=a.fingerprint,
            alertname=a.alertname,
            status=a.status,
            labels=dict(a.labels),
            summary=str(a.annotations.get("summary", a.alertname)),
            starts_at=a.starts_at,
            service=service_of_alert(settings, a.labels),
        )
        for a in store.alerts_to_consider(session, now - RECENT_ALERTS)
    ]
    incidents = store.open_incidents(session)
    window = max((p.window_s for p in settings.policies), default=3600.0)
    action_runs = {r.id: r for r in store.runs_since(session, now - timedelta(seconds=window))}
    action_runs.update(
        {r.id: r for r in store.runs_of_incidents(session, [i.id for i in incidents])}
    )
    for state in ACTIVE:  # however old: what runs now is what a policy may defer to
        action_runs.update({r.id: r for r in store.runs_in_state(session, state)})
    return Snapshot(
        probes=probes,
        alerts=alerts,
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
            )
            for i in incidents
        ],
        runs=[
            RunView(
                r.incident_id,
                r.action,
                r.target,
                r.created_at,
                acted=r.state not in NO_EFFECT,
                active=r.state in ACTIVE,
            )
            for r in action_runs.values()
        ],
        silences=[
            SilenceView(s.id, dict(s.matchers), s.starts_at, s.ends_at)
            for s in store.active_silences(session, now)
        ],
        policies=settings.policies,
        flap_high=settings.flap_high,
        flap_low=settings.flap_low,
    )


def _urgency(d: Decision) -> int:
    if isinstance(d, RequestAction) or (isinstance(d, Open) and d.source != "alert"):
        return 0
    return 2 if isinstance(d, Open) else 1


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

    def run_cycle(self, now: datetime | None = None) -> str:
        now = now or self.clock()
        started = time.monotonic()
        with store.transaction(self.factory) as s:
            leader = store.hold_lease(
                s, LEADER_LEASE, self.settings.instance_id, self.settings.lease_ttl_s, now
            )
        if not leader:
            self.is_leader = False
            self.metrics.is_leader.set(0)
            return self._said(now, "standby: another control plane holds the lease")
        if not self.is_leader:
            self.is_leader = True
            self.metrics.is_leader.set(1)
            abandoned = self.engine.abandon_orphans()
            if abandoned:
                logger.warning("took over leadership; abandoned runs %s", abandoned)
        stranded = self.engine.abandon_orphans(
            owner=self.settings.instance_id, older_than_s=STRANDED_AFTER_S
        )
        if stranded:
            logger.warning("abandoned action runs whose worker is gone: %s", stranded)
        with store.read(self.factory) as s:
            decisions = decide(build_snapshot(s, self.settings, now), now)
            by_fp = {i.fingerprint: i for i in store.open_incidents(s)}
        # What acts on a target goes first; a flood's alert incidents share what time is left
        # and the rest waits for the next cycle (decide finds it again), so that a cycle stays
        # short however many alerts came in.
        decisions.sort(key=_urgency)
        self.backlog = 0
        for start in range(0, len(decisions), APPLY_BATCH):
            if start and time.monotonic() - started > APPLY_BUDGET_S:
                self.backlog = len(decisions) - start
                break
            with store.transaction(self.factory) as s:
                self._apply(s, decisions[start : start + APPLY_BATCH], by_fp, now)
        with store.read(self.factory) as s:
            self.metrics.incidents_open.set(len(store.open_incidents(s)))
        started_runs = self.engine.dispatch_pending()
        sentence = describe(decisions[: len(decisions) - self.backlog])
        if self.backlog:
            sentence += f"; {self.backlog} decision(s) left for the next cycle"
        if started_runs:
            sentence += f"; started action run(s) {', '.join(map(str, started_runs))}"
        if self.engine.busy:
            sentence += f"; {self.engine.busy} action(s) in progress"
        self.metrics.cycle_seconds.observe(time.monotonic() - started)
        return self._said(now, sentence)

    def _said(self, now: datetime, sentence: str) -> str:
        if sentence != self.last_sentence or "nothing to do" not in sentence:
            logger.info("cycle: %s", printable(sentence, limit=4000))  # alert names from outside
        self.last_sentence = sentence
        self.last_cycle_at = now
        return sentence

    def _apply(
        self, s: Session, decisions: Sequence[Decision], by_fp: dict[str, Any], now: datetime
    ) -> None:
        """One batch of decisions, in one write transaction. `by_fp`: the open incidents by
        fingerprint, kept across batches (an incident opened in one, acted on in a later one)."""
        for d in decisions:
            match d:
                case Open():
                    incident = store.open_incident(
                        s,
                        fingerprint=d.fingerprint,
                        kind=d.kind,
                        source=d.source,
                        target=d.target,
                        severity=d.severity,
                        summary=d.summary,
                        labels=dict(d.labels),
                        detected_at=d.detected_at,
                        opened_at=now,
                    )
                    if incident is None:
                        continue
                    by_fp[d.fingerprint] = incident
                    store.add_timeline(
                        s,
                        incident.id,
                        "opened",
                        d.summary,
                        now,
                        {"detected_at": d.detected_at.isoformat()},
                    )
                    self.metrics.incidents.labels("opened").inc()
                    self.notifier.notify(
                        "open", d.summary, {"incident": incident.id, "target": d.target}
                    )
                case Resolve():
                    if store.resolve_incident(s, d.incident_id, now):
                        store.add_timeline(s, d.incident_id, "resolved", d.reason, now)
                        # Never an action on a resolved incident: drop what awaits approval.
                        for run_id in store.expire_unapproved_runs(s, d.incident_id, now):
                            store.add_timeline(
                                s,
                                d.incident_id,
                                "action",
                                f"action run {run_id} no longer awaits approval: resolved",
                                now,
                            )
                        self.metrics.incidents.labels("resolved").inc()
                        self.notifier.notify("resolve", d.reason, {"incident": d.incident_id})
                case SetFlapping():
                    store.set_flapping(s, d.incident_id, d.flapping)
                    state = "flapping" if d.flapping else "stable again"
                    store.add_timeline(
                        s, d.incident_id, "flapping", f"{state} ({d.share:.0%} state changes)", now
                    )
                case RequestAction():
                    self._request(s, d, by_fp, now)
                case Hold():
                    pass  # said in the cycle's sentence; no row every tick

    def _request(self, s: Session, d: RequestAction, by_fp: dict[str, Any], now: datetime) -> None:
        incident = by_fp.get(d.fingerprint)
        if incident is None or incident.state != IncidentState.OPEN:
            return
        if d.fingerprint.startswith("alert:"):
            alert = s.get(Alert, d.fingerprint.removeprefix("alert:"))
            if alert is None or alert.status != "firing":
                return  # never an action on a resolved alert
        state = MODE_STATE[d.mode]
        run = store.create_action_run(
            s,
            incident_id=incident.id,
            action=d.action,
            target=d.target,
            mode=d.mode,
            state=state,
            requested_by=f"policy:{d.policy}",
            reason=d.reason,
            params={"policy": d.policy},
            created_at=now,
        )
        if run is None:
            return  # already requested for this incident
        verb = {ActionState.DRY_RUN: "dry-run", ActionState.AWAITING_APPROVAL: "await-approval"}
        store.audit(
            s,
            actor=f"policy:{d.policy}",
            verb=verb.get(state, "request"),
            at=now,
            action_run_id=run.id,
            incident_id=incident.id,
            message=f"{d.action} on {d.target}: {d.reason}",
            data={"policy": d.policy, "mode": d.mode, "target": d.target},
        )
        store.add_timeline(
            s, incident.id, "action", f"{d.action} requested ({d.mode})", now, {"run": run.id}
        )
