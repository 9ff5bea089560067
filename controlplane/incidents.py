"""The pure part of the loop: `decide(snapshot, now) -> decisions`. No I/O, no clock, no session.

Rules (Nagios and Alertmanager conventions):
- a probe incident opens after `failures_to_open` consecutive non-UP results and resolves after
  `successes_to_resolve` consecutive UPs, unless it is flapping; an UNKNOWN result (the probe
  could not look) is neither: it is skipped, breaking no streak and counting in none;
- flapping: the share of state changes over the last `flap_window` results, with hysteresis
  (flapping above `flap_high`, stable again below `flap_low`); no actions while flapping;
- an alert incident opens while its alert fires and resolves when Alertmanager says resolved;
  a resolved alert never leads to an action;
- a probe incident an action recovered that fails again before it resolves is resolved and
  opened anew (a new failure, not the same one);
- an action is requested for an incident and policy while none of its runs succeeded, one
  run at a time: a run that ended with `retry` (its precheck said "not now", or it failed in
  a way a new start may mend) is followed by the next try after a backoff (retry_backoff_s,
  doubled each try, at most retry_backoff_max_s), for as long as the incident is open; a run
  that succeeded, escalated, awaits approval or was a dry run is the last;
- never while silenced or flapping; a policy's cooldown and runs-per-window limits count the
  runs for other incidents (a retry of one incident is not ping-pong); once reached they
  either hold the action and tell a human at once (`over_limit = "hold"`), or let it run
  (`"notify"`, the default: a limit must not keep a service down), saying so in its reason;
- giving up is loud: an incident whose policy's action has not succeeded `escalate_after_s`
  after it began (a probe's first failure, or the opening of an alert's incident: an alert's
  own start time comes from outside) is escalated (once), with one line saying how long and
  what was tried, whatever its severity (a lost standby is a warning, and still the control
  plane's to mend);
- who may make it act: a probe incident meets only `source = "probe"` policies, an alert
  incident only `source = "alert"` ones, matched on the alert's labels without the keys the
  control plane sets itself (`probe`, `kind`, `target`, `source`, `request`); an alert policy
  acts on the service it names, never on one the alert's labels name; an operator policy is
  never met by an incident (only the API's requests reach it);
- a policy's `defer_while` holds its action while a named action is pending or running (on any
  target, or requested in this same cycle) or while a named probe's latest result is not UP:
  no restore is proposed in the middle of a failover or while the cluster has no primary; or
  while a named probe's latest result is UP: an alert from outside (the shops' "no primary")
  does not fail over a primary that the primary probe still gives its grace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Protocol

from controlplane.config import CONTROL_KEYS, PolicySpec
from controlplane.logsafe import printable
from controlplane.sources import AlertStatus, Source, of_alert, of_probe, source_of
from probes.base import Health


@dataclass(frozen=True, slots=True)
class ProbeState:
    probe: str
    service: str
    recent: tuple[Health, ...]  # oldest first
    failures_to_open: int
    successes_to_resolve: int
    summary: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    failing_since: datetime | None = None
    failing_at: tuple[datetime, ...] = ()  # when each result of the failing streak came


@dataclass(frozen=True, slots=True)
class AlertState:
    fingerprint: str
    alertname: str
    status: str  # firing | resolved
    labels: Mapping[str, str]
    summary: str
    starts_at: datetime
    service: str


@dataclass(frozen=True, slots=True)
class IncidentView:
    id: int
    fingerprint: str
    kind: str
    source: str
    target: str
    labels: Mapping[str, str]
    flapping: bool
    recovered_at: datetime | None = None  # an action verified it recovered
    severity: str = "warning"
    summary: str = ""
    detected_at: datetime | None = None
    escalated_at: datetime | None = None  # a human was told; told once
    opened_at: datetime | None = None  # on the control plane's own clock


class Lasting(Protocol):
    """What `lasting_since` reads: an IncidentView, or the stored incident itself."""

    @property
    def source(self) -> str: ...
    @property
    def detected_at(self) -> datetime | None: ...
    @property
    def opened_at(self) -> datetime | None: ...


def lasting_since(incident: Lasting) -> datetime | None:
    """Since when an incident counts as lasting, on a clock the control plane trusts: a
    probe's first failure, or when an alert's incident opened (an alert's `startsAt` comes
    from outside: a sender could backdate it to be escalated at once)."""
    return incident.detected_at if incident.source == Source.PROBE else incident.opened_at


@dataclass(frozen=True, slots=True)
class RunView:
    incident_id: int | None
    action: str
    target: str
    created_at: datetime
    acted: bool = True  # False for a run that did nothing (precheck declined, dry run)
    active: bool = False  # pending or running now
    succeeded: bool = False
    retry: bool = False  # ended, and may be followed by the next try
    try_number: int = 1
    finished_at: datetime | None = None
    why: str = ""  # how it ended, in a few words (a decline's reason, a failure's error)


@dataclass(frozen=True, slots=True)
class SilenceView:
    id: int
    matchers: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime


@dataclass(frozen=True, slots=True)
class Snapshot:
    probes: Sequence[ProbeState] = ()
    alerts: Sequence[AlertState] = ()
    incidents: Sequence[IncidentView] = ()
    # Every run of the last max(window), of open incidents, and every one pending or running.
    runs: Sequence[RunView] = ()
    silences: Sequence[SilenceView] = ()
    policies: Sequence[PolicySpec] = ()
    flap_high: float = 0.5
    flap_low: float = 0.25


# -- decisions ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Open:
    fingerprint: str
    kind: str
    source: str
    target: str
    severity: str
    summary: str
    labels: Mapping[str, str]
    detected_at: datetime


@dataclass(frozen=True, slots=True)
class Resolve:
    incident_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class SetFlapping:
    incident_id: int
    flapping: bool
    share: float


@dataclass(frozen=True, slots=True)
class RequestAction:
    fingerprint: str  # the incident, possibly opened by this same tick
    policy: str
    action: str
    target: str
    mode: str
    reason: str
    try_number: int = 1


@dataclass(frozen=True, slots=True)
class Hold:
    fingerprint: str
    reason: str


@dataclass(frozen=True, slots=True)
class Escalate:
    """Tell a human, once per incident: healing is held, or has not worked in time."""

    incident_id: int
    reason: str


Decision = Open | Resolve | SetFlapping | RequestAction | Hold | Escalate


# -- helpers ------------------------------------------------------------------------------------
def known(results: Sequence[Health]) -> tuple[Health, ...]:
    """The results that say something: an UNKNOWN one is neither a failure nor a success."""
    return tuple(h for h in results if h is not Health.UNKNOWN)


def trailing(results: Sequence[Health], failing: bool) -> int:
    count = 0
    for health in reversed(results):
        if (health is not Health.UP) != failing:
            break
        count += 1
    return count


def change_share(results: Sequence[Health]) -> float:
    """Share of consecutive pairs whose UP/not-UP state differs (0 = stable, 1 = alternating)."""
    if len(results) < 2:
        return 0.0
    up = [h is Health.UP for h in results]
    changes = sum(1 for a, b in pairwise(up) if a != b)
    return changes / (len(results) - 1)


def is_flapping(was_flapping: bool, share: float, high: float, low: float) -> bool:
    return share >= low if was_flapping else share >= high


def matches(matchers: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in matchers.items())


def incident_labels(kind: str, target: str, labels: Mapping[str, str]) -> dict[str, str]:
    return {**labels, "kind": kind, "target": target}


def match_subject(source: str, kind: str, target: str, labels: Mapping[str, str]) -> dict[str, str]:
    """What a policy of `source` is matched against. A probe's labels are the control plane's
    own (its service's configured labels, `probe`, `service`); an alert's come from outside,
    so the keys the control plane sets are dropped from them and set from what it knows."""
    if source == Source.ALERT:
        outside = {k: v for k, v in labels.items() if k not in CONTROL_KEYS}
        return {**outside, "alertname": kind, "kind": kind, "target": target}
    return incident_labels(kind, target, labels)


# -- the decision -------------------------------------------------------------------------------
def decide(snapshot: Snapshot, now: datetime) -> list[Decision]:
    decisions: list[Decision] = []
    open_by_fp = {i.fingerprint: i for i in snapshot.incidents}
    firing_alerts = {
        of_alert(a.fingerprint) for a in snapshot.alerts if a.status == AlertStatus.FIRING
    }
    resolving: set[str] = set()
    flapping: dict[str, bool] = {fp: i.flapping for fp, i in open_by_fp.items()}
    candidates: dict[str, Candidate] = {
        fp: (source_of(fp), i.kind, i.target, i.labels) for fp, i in open_by_fp.items()
    }

    for probe in snapshot.probes:
        fp = of_probe(probe.probe)
        incident = open_by_fp.get(fp)
        recent = known(probe.recent)
        failing = trailing(recent, failing=True)
        if (
            incident is not None
            and incident.recovered_at is not None
            and failing >= probe.failures_to_open
            and sum(at > incident.recovered_at for at in probe.failing_at) >= probe.failures_to_open
        ):
            # Recovered by an action, then failed again before it could resolve: a new
            # failure, which deserves its own incident (and its own action, within limits).
            # Counted from the recovery, not from the streak's start: a second fault that
            # comes before the probe has seen the first one healed is still a new failure.
            decisions.append(Resolve(incident.id, "recovered, then failed again: reopened"))
            del open_by_fp[fp]
            candidates.pop(fp, None)
            flapping.pop(fp, None)
            incident = None
        if incident is None:
            if failing >= probe.failures_to_open:
                worst = Health.DOWN if Health.DOWN in recent[-failing:] else Health.DEGRADED
                probe_labels = {**probe.labels, "probe": probe.probe, "service": probe.service}
                decisions.append(
                    Open(
                        fingerprint=fp,
                        kind=probe.probe,
                        source=Source.PROBE,
                        target=probe.service,
                        severity="critical" if worst is Health.DOWN else "warning",
                        summary=f"{probe.probe}: {probe.summary}",
                        labels=probe_labels,
                        detected_at=probe.failing_since or now,
                    )
                )
                candidates[fp] = ("probe", probe.probe, probe.service, probe_labels)
            continue
        share = change_share(recent)
        now_flapping = is_flapping(incident.flapping, share, snapshot.flap_high, snapshot.flap_low)
        if now_flapping != incident.flapping:
            decisions.append(SetFlapping(incident.id, now_flapping, round(share, 3)))
        flapping[fp] = now_flapping
        passed = trailing(recent, failing=False)
        if passed >= probe.successes_to_resolve and not now_flapping:
            decisions.append(Resolve(incident.id, f"{probe.probe} passed {passed} times in a row"))
            resolving.add(fp)

    for alert in snapshot.alerts:
        fp = of_alert(alert.fingerprint)
        incident = open_by_fp.get(fp)
        if alert.status == AlertStatus.FIRING and incident is None:
            alert_labels = dict(alert.labels)
            decisions.append(
                Open(
                    fingerprint=fp,
                    kind=alert.alertname,
                    source=Source.ALERT,
                    target=alert.service,
                    severity=alert_labels.get("severity", "warning"),
                    summary=alert.summary,
                    labels=alert_labels,
                    detected_at=alert.starts_at,
                )
            )
            candidates[fp] = ("alert", alert.alertname, alert.service, alert_labels)
        elif alert.status == AlertStatus.RESOLVED and incident is not None:
            decisions.append(Resolve(incident.id, "Alertmanager resolved the alert"))
            resolving.add(fp)

    planned: set[tuple[str, str]] = set()
    # Policies that defer to other actions plan last, so that they see this cycle's requests.
    ordered = sorted(candidates.items(), key=lambda c: _defers(snapshot, c[1]))
    for fp, (source, kind, target, labels) in ordered:
        if fp in resolving:
            continue
        if source_of(fp) is Source.ALERT and fp not in firing_alerts:
            continue  # never act on an alert that is not firing now
        incident = open_by_fp.get(fp)
        flaps = flapping.get(fp)
        planning = _plan_action(
            snapshot, now, fp, (source, kind, target, labels), flaps, incident, planned
        )
        for d in planning:
            if isinstance(d, RequestAction):
                if (d.action, d.target) in planned:
                    # Two incidents about one fault (a probe and an alert): one action.
                    decisions.append(Hold(fp, f"{d.action} on {d.target} already requested"))
                    continue
                planned.add((d.action, d.target))
            decisions.append(d)
        if incident is not None and not any(isinstance(d, Escalate) for d in planning):
            late = _overdue(snapshot, now, incident, (source, kind, target, labels))
            if late is not None:
                decisions.append(late)
    return decisions


def retry_delay_s(policy: PolicySpec, tries: int) -> float:
    """How long after the end of try number `tries` the next one starts."""
    return float(min(policy.retry_backoff_s * 2 ** max(tries - 1, 0), policy.retry_backoff_max_s))


def runs_for(snapshot: Snapshot, incident_id: int, action: str) -> list[RunView]:
    """The runs of `action` for one incident, first try first."""
    found = [r for r in snapshot.runs if r.incident_id == incident_id and r.action == action]
    return sorted(found, key=lambda r: (r.try_number, r.created_at))


def escalation_line(
    summary: str, detected_at: datetime | None, now: datetime, action: str, runs: Sequence[RunView]
) -> str:
    """One line for a human: how long it lasts and what was tried (the health API, the
    dashboard's banner and the notification say it the same way)."""
    lasting = f" for {max(0, (now - detected_at).total_seconds()):.0f} s" if detected_at else ""
    summary = printable(summary, limit=200)  # text from outside (an alert's): one safe line
    if not runs:
        return f"{summary}{lasting}; {action} not tried"
    tried = f"{action} tried {len(runs)} time{'s' if len(runs) != 1 else ''}"
    last = runs[-1]
    state = "running now" if last.active else f"last: {last.why or 'no reason recorded'}"
    return f"{summary}{lasting}; {tried}, {state}"


def _overdue(
    snapshot: Snapshot, now: datetime, incident: IncidentView, candidate: Candidate
) -> Escalate | None:
    """An incident that its policy's action has not mended in `escalate_after_s`."""
    since = lasting_since(incident)
    if incident.escalated_at is not None or incident.recovered_at is not None or since is None:
        return None
    policy = policy_for(snapshot, candidate)
    if policy is None or now - since < timedelta(seconds=policy.escalate_after_s):
        return None
    runs = runs_for(snapshot, incident.id, policy.action)
    if any(r.succeeded for r in runs):
        return None
    line = escalation_line(incident.summary, since, now, policy.action, runs)
    return Escalate(incident.id, f"no recovery after {policy.escalate_after_s:g} s: {line}")


Candidate = tuple[str, str, str, Mapping[str, str]]  # source, kind, target, labels


def policy_for(snapshot: Snapshot, candidate: Candidate) -> PolicySpec | None:
    """The first policy of the incident's own source that matches it (never an operator's)."""
    source, kind, target, labels = candidate
    if source not in ("probe", "alert"):
        return None
    subject = match_subject(source, kind, target, labels)
    return next(
        (p for p in snapshot.policies if p.source == source and matches(p.match, subject)),
        None,
    )


def _defers(snapshot: Snapshot, candidate: Candidate) -> bool:
    policy = policy_for(snapshot, candidate)
    return policy is not None and bool(policy.defer_while.actions_running)


def deferral(
    policy: PolicySpec, snapshot: Snapshot, planned: Set[tuple[str, str]] = frozenset()
) -> str | None:
    """Why the policy's action must wait now (its `defer_while`), or None."""
    waits_for = policy.defer_while.actions_running
    busy = sorted(
        {(r.action, r.target) for r in snapshot.runs if r.active and r.action in waits_for}
    )
    if busy:
        action, target = busy[0]
        return f"deferred while {action} runs on {target}"
    requested = sorted(p for p in planned if p[0] in waits_for)
    if requested:
        action, target = requested[0]
        return f"deferred: {action} on {target} requested in this cycle"
    latest = {p.probe: p for p in snapshot.probes}
    for name in policy.defer_while.probes_not_up:
        state = latest.get(name)
        if state is None or not state.recent:
            return f"deferred: {name} has no result yet"
        if state.recent[-1] is not Health.UP:
            return f"deferred while {name} is {state.recent[-1]}: {state.summary}"
    for name in policy.defer_while.probes_up:
        state = latest.get(name)
        if state is not None and state.recent and state.recent[-1] is Health.UP:
            return f"deferred while {name} is up: {state.summary}"
    return None


def _plan_action(
    snapshot: Snapshot,
    now: datetime,
    fp: str,
    candidate: Candidate,
    flapping: bool | None,
    incident: IncidentView | None,
    planned: Set[tuple[str, str]] = frozenset(),
) -> list[Decision]:
    _, kind, incident_target, labels = candidate
    everything = incident_labels(kind, incident_target, labels)
    policy = policy_for(snapshot, candidate)
    if policy is None:
        return []
    target = policy.target or incident_target  # an alert policy acts where it says
    try_number, why_again = 1, ""
    if incident is not None:
        tried = runs_for(snapshot, incident.id, policy.action)
        if tried:
            last = tried[-1]
            if any(r.succeeded for r in tried) or last.active or not last.retry:
                return []  # running, or done for this incident: never after a success
            due = (last.finished_at or last.created_at) + timedelta(
                seconds=retry_delay_s(policy, len(tried))
            )
            if now < due:
                return [
                    Hold(
                        fp,
                        f"{policy.action} on {target} tried {len(tried)} time(s), last: "
                        f"{last.why}; next try at {due:%H:%M:%S}",
                    )
                ]
            try_number = last.try_number + 1
            why_again = f"; try {try_number}, after: {last.why}"
    if flapping:
        return [Hold(fp, "flapping: actions suppressed until it settles")]
    silence = next(
        (
            s
            for s in snapshot.silences
            if s.starts_at <= now < s.ends_at and matches(s.matchers, everything)
        ),
        None,
    )
    if silence is not None:
        return [Hold(fp, f"silenced by silence {silence.id} until {silence.ends_at:%H:%M:%S}")]
    deferred = deferral(policy, snapshot, planned)
    if deferred is not None:
        return [Hold(fp, f"{policy.action} on {target} {deferred}")]
    request = RequestAction(
        fingerprint=fp,
        policy=policy.name,
        action=policy.action,
        target=target,
        mode=policy.mode,
        reason=f"policy {policy.name}: {kind} on {target}{why_again}",
        try_number=try_number,
    )
    limit = _over_limit(snapshot, now, policy, target, incident)
    if limit is None:
        return [request]
    if policy.over_limit == "notify":
        # The limit guards against ping-pong, not against the only way back: act, saying so.
        return [replace(request, reason=f"{request.reason}; {limit}: acting all the same")]
    held = Hold(fp, f"{limit}: held for a human")
    if incident is None or incident.escalated_at is not None:
        return [held]
    return [held, Escalate(incident.id, f"{policy.action} on {target} held: {limit}")]


def _over_limit(
    snapshot: Snapshot,
    now: datetime,
    policy: PolicySpec,
    target: str,
    incident: IncidentView | None,
) -> str | None:
    """Which of the policy's limits a new run would pass, or None. They count what acted (a
    declined or dry run changed nothing) for other incidents: the tries for this one are
    paced by the retry backoff instead."""
    same = [
        r
        for r in snapshot.runs
        if r.action == policy.action
        and r.target == target
        and r.acted
        and (incident is None or r.incident_id != incident.id)
    ]
    if not same:
        return None
    last = max(r.created_at for r in same)
    until = last + timedelta(seconds=policy.cooldown_s)
    if now < until:
        return f"{policy.action} on {target} cooling down until {until:%H:%M:%S}"
    in_window = [r for r in same if now - r.created_at < timedelta(seconds=policy.window_s)]
    if len(in_window) >= policy.max_runs:
        return f"{policy.action} on {target} ran {len(in_window)} times in {policy.window_s:g}s"
    return None


def describe(decisions: Sequence[Decision]) -> str:
    """One sentence for the tick's log line."""
    if not decisions:
        return "nothing to do"
    parts = []
    for d in decisions:
        match d:
            case Open():
                parts.append(f"open {d.kind} on {d.target} ({d.severity})")
            case Resolve():
                parts.append(f"resolve incident {d.incident_id} ({d.reason})")
            case SetFlapping():
                state = "flapping" if d.flapping else "stable"
                parts.append(f"incident {d.incident_id} {state} ({d.share:.0%} changes)")
            case RequestAction():
                parts.append(f"request {d.action} on {d.target} [{d.mode}] ({d.reason})")
            case Hold():
                parts.append(f"hold {d.fingerprint}: {d.reason}")
            case Escalate():
                parts.append(f"escalate incident {d.incident_id} ({d.reason})")
    return "; ".join(parts)
