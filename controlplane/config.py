"""Settings: the control plane's one frozen, typed configuration, from CP_* variables and a TOML
targets file (services, probes, policies). The only reader of either; read once at start-up."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controlplane.errors import ConfigError
from remediation.registry import UnknownAction, action_class

ENV_PREFIX = "CP_"
Mode = Literal["auto", "approval", "dry_run"]
# Who may make a policy act: its probe's failures, an Alertmanager alert, or an operator's
# request through the API (never an incident).
Source = Literal["probe", "alert", "operator"]
# What a policy's limits (cooldown_s, max_runs per window_s) do once reached. They are there
# to stop ping-pong between healthy nodes and a restart or flush loop that hides a deeper
# fault (or that a flapping alert drives), not to keep a service down: "hold" waits for a
# human, who is told at once; "notify" acts all the same and says so. The default is
# "notify" for the actions that are the only way back to a writable, redundant cluster
# (NEVER_HELD), "hold" for every other.
OverLimit = Literal["notify", "hold"]
NEVER_HELD = frozenset({"failover", "rejoin"})
# The keys the control plane itself sets on what a policy matches. An alert's labels never
# stand in for them (decide() drops them from an alert before matching), and a policy may
# match only those its source can carry.
CONTROL_KEYS = frozenset({"probe", "alertname", "kind", "target", "source", "request"})
MATCHABLE_CONTROL_KEYS: dict[str, frozenset[str]] = {
    "probe": frozenset({"probe", "kind", "target"}),
    "alert": frozenset({"alertname", "kind", "target"}),
    "operator": frozenset({"target"}),
}
LABEL = r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExecutorSpec(Frozen):
    """How actions reach a service's processes: a kind of remediation/executors/registry.py
    (`lab`, `none`) and its params."""

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class ServiceSpec(Frozen):
    """Something the control plane watches and may act on."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    labels: dict[str, str] = Field(default_factory=dict)
    component: str | None = None  # the executor's name for its process, if it has one
    # Which of `executors` acts on it (None: the only one there is, if there is one).
    executor: str | None = None


class ProbeSpec(Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    kind: str
    service: str
    interval_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    failures_to_open: int = Field(default=3, ge=1)
    successes_to_resolve: int = Field(default=2, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def timeout_within_interval(self) -> ProbeSpec:
        if self.timeout_s > self.interval_s:
            raise ValueError("timeout_s must not exceed interval_s")
        return self


class DeferWhile(Frozen):
    """When a policy's action must wait, whatever its incident says: a restore never starts
    in the middle of a failover, nor while the cluster has no primary."""

    # A run of any of these actions is pending or running, on any target.
    actions_running: tuple[str, ...] = ()
    # The latest result of any of these probes is not UP, or there is none yet.
    probes_not_up: tuple[str, ...] = ()
    # The latest result of any of these probes is UP: the probe that owns the judgement (a
    # primary's grace) says there is nothing to act on yet, whatever an alert from outside says.
    probes_up: tuple[str, ...] = ()


class PolicySpec(Frozen):
    """When an incident from `source` matches, run `action` on its service, within these
    limits. A probe policy acts on its probe's service, an alert policy on its `target` (never
    on a service an alert's labels name), an operator policy only when the API asks."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    source: Source
    # "kind" (probe name or alertname), "probe", "alertname", "target" and/or labels: all must
    # equal. Operator policies match the request's "target" only (or nothing: any target).
    match: dict[str, str]
    action: str
    # The service an alert policy acts on (required there, and only there): an alert's labels
    # never choose where an action goes.
    target: str | None = None
    mode: Mode = "auto"
    cooldown_s: float = Field(default=60.0, ge=0)
    max_runs: int = Field(default=3, ge=1)
    window_s: float = Field(default=3600.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    verify_timeout_s: float = Field(default=30.0, gt=0)
    # The run's own deadline: no new attempt starts after it (each step has its own timeouts:
    # a stop escalates to SIGKILL, every database call and tool is bounded).
    run_timeout_s: float = Field(default=600.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)
    defer_while: DeferWhile = Field(default_factory=DeferWhile)
    # A run that ends and may be followed by another for the same incident (its precheck said
    # "not now", or it failed in a way a new start may mend) is tried again after
    # retry_backoff_s, doubled each try up to retry_backoff_max_s, while the incident is open.
    retry_backoff_s: float = Field(default=1.0, gt=0)
    retry_backoff_max_s: float = Field(default=15.0, gt=0)
    over_limit: OverLimit = "hold"  # "notify" by default for NEVER_HELD (see below)
    # A critical incident with no successful run of this policy's action this long after it
    # was detected: a human is told, through every channel (giving up is loud).
    escalate_after_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def limit_by_action(cls, values: Any) -> Any:
        """A failover's or a rejoin's limit notifies unless the policy says hold."""
        if (
            isinstance(values, dict)
            and "over_limit" not in values
            and values.get("action") in NEVER_HELD
        ):
            return {**values, "over_limit": "notify"}
        return values

    @model_validator(mode="after")
    def matches_what_its_source_carries(self) -> PolicySpec:
        allowed = MATCHABLE_CONTROL_KEYS[self.source]
        for key in self.match:
            if not re.fullmatch(LABEL, key):
                raise ValueError(f"match.{key}: not a label name")
            if key in CONTROL_KEYS and key not in allowed:
                raise ValueError(
                    f"match.{key}: a {self.source} policy cannot match {key!r} "
                    f"(it may match {', '.join(sorted(allowed))}"
                    + (")" if self.source == "operator" else " and labels)")
                )
            if self.source == "operator" and key not in allowed:
                raise ValueError(f"match.{key}: an operator policy matches the target only")
        if self.source != "operator" and not self.match:
            raise ValueError(f"match: a {self.source} policy must match something")
        if self.source == "alert" and self.target is None:
            raise ValueError("target: an alert policy names the service it acts on")
        if self.source != "alert" and self.target is not None:
            raise ValueError(
                "target: only an alert policy names one (a probe's acts on its probe's "
                "service, an operator's on the request's target)"
            )
        return self


class BackupSettings(Frozen):
    """Scheduled base backups of the PostgreSQL cluster, restore drills, and retention."""

    nodes: dict[str, str] = Field(min_length=1)  # name -> DSN; backups come from the leader
    backups_dir: Path
    archive_dir: Path  # the cluster's WAL archive (archive_command writes it)
    scratch_dir: Path  # where a drill restores (emptied after)
    interval_s: float = Field(default=24 * 3600, gt=0)
    drill_interval_s: float = Field(default=24 * 3600, gt=0)
    first_after_s: float = Field(default=10, ge=0)  # the first backup, after start-up
    keep_count: int = Field(default=3, ge=1)  # never fewer than this many backups
    max_age_s: float = Field(default=7 * 24 * 3600, gt=0)  # beyond keep_count, older go
    orders_db: str = "orders"
    inventory_db: str = "inventory"
    drill_timeout_s: float = Field(default=600, gt=0)
    max_rate: str | None = Field(default=None, pattern=r"^[0-9]+[kM]?$")  # pg_basebackup's
    # The cluster's service. Backups, drills and retention run on it as actions (the
    # policies below), one at a time with its failovers, through its executor.
    service: str

    def policies(self) -> list[dict[str, Any]]:
        """The policies the schedule requests runs under (an operator may ask for them too):
        `scheduled-backup`, `scheduled-drill`, `backup-retention`. A policy of the targets
        file with the same name replaces one."""
        where = {
            "nodes": dict(self.nodes),
            "backups_dir": str(self.backups_dir),
            "archive_dir": str(self.archive_dir),
        }
        drills = {
            **where,
            "scratch_dir": str(self.scratch_dir),
            "orders_db": self.orders_db,
            "inventory_db": self.inventory_db,
            "drill_timeout_s": self.drill_timeout_s,
        }
        common = {
            "source": "operator",
            "match": {"target": self.service},
            "mode": "auto",
            "cooldown_s": 0,
            "max_attempts": 1,
            "verify_timeout_s": 10,
            "run_timeout_s": 3600 + self.drill_timeout_s,
        }
        return [
            {**common, "name": "scheduled-backup", "action": "backup",
             "params": {**drills, "max_rate": self.max_rate}},
            {**common, "name": "scheduled-drill", "action": "drill", "params": drills},
            {**common, "name": "backup-retention", "action": "prune-backups",
             "params": {**where, "keep_count": self.keep_count, "max_age_s": self.max_age_s}},
        ]  # fmt: skip


class Settings(Frozen):
    database_url: str = "sqlite:///controlplane.db"
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8080, ge=1, le=65535)
    instance_id: str = Field(default_factory=lambda: f"cp-{os.getpid()}")
    api_token: str = ""
    webhook_token: str = ""
    admin_password: str = ""  # the operators' dashboard login
    # Signs the dashboard's session cookies: the same in every web worker (empty: derived from
    # the tokens above, which the lab generates).
    secret_key: str = ""
    # Named executors (`[executors.NAME]`); a service names its own (`executor`).
    executors: dict[str, ExecutorSpec] = Field(default_factory=dict)
    # Game-day reports (JSON, one file a run) the dashboard's Game days page shows; read only.
    gamedays_dir: Path | None = None
    notify_webhook_url: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "controlplane@localhost"
    smtp_to: str = ""
    loop_interval_s: float = Field(default=1.0, gt=0)
    lease_ttl_s: float = Field(default=10.0, gt=0)
    probe_history_keep: int = Field(default=500, ge=10)
    flap_window: int = Field(default=20, ge=4)
    flap_high: float = Field(default=0.5, gt=0, le=1)
    flap_low: float = Field(default=0.25, ge=0, le=1)
    action_workers: int = Field(default=4, ge=1)
    # Alertmanager's intake, per source (the caller's address): a flood is answered 429 with
    # Retry-After (Alertmanager retries), so it never buries the loop. Per web worker.
    intake_alerts_per_minute: int = Field(default=1200, ge=1)
    intake_alerts_burst: int = Field(default=3000, ge=1)
    services: tuple[ServiceSpec, ...] = ()
    probes: tuple[ProbeSpec, ...] = ()
    policies: tuple[PolicySpec, ...] = ()
    backups: BackupSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def with_backup_policies(cls, values: Any) -> Any:
        """`[backups]` brings its policies (`BackupSettings.policies`), unless the targets
        file declares one of the same name."""
        if not isinstance(values, dict) or not values.get("backups"):
            return values
        raw = values["backups"]
        try:
            backups = raw if isinstance(raw, BackupSettings) else BackupSettings.model_validate(raw)
        except ValidationError:
            return values  # reported with its key by the field's own validation
        declared = list(values.get("policies") or ())
        names = {p.get("name") if isinstance(p, dict) else getattr(p, "name", None)
                 for p in declared}  # fmt: skip
        derived = [p for p in backups.policies() if p["name"] not in names]
        return {**values, "policies": [*declared, *derived]}

    @model_validator(mode="after")
    def references_resolve(self) -> Settings:
        names = [s.name for s in self.services]
        if len(names) != len(set(names)):
            raise ValueError("services: names must be unique")
        probe_names = [p.name for p in self.probes]
        if len(probe_names) != len(set(probe_names)):
            raise ValueError("probes: names must be unique")
        for i, probe in enumerate(self.probes):
            if probe.service not in names:
                raise ValueError(f"probes[{i}].service: unknown service {probe.service!r}")
        for i, service in enumerate(self.services):
            if service.executor is not None and service.executor not in self.executors:
                raise ValueError(f"services[{i}].executor: unknown executor {service.executor!r}")
        if self.backups and self.backups.service and self.backups.service not in names:
            raise ValueError(f"backups.service: unknown service {self.backups.service!r}")
        for i, policy in enumerate(self.policies):
            defer = policy.defer_while
            for key, named in (
                ("probes_not_up", defer.probes_not_up),
                ("probes_up", defer.probes_up),
            ):
                for name in named:
                    if name not in probe_names:
                        raise ValueError(f"policies[{i}].defer_while.{key}: unknown probe {name!r}")
            targets = (("target", policy.target), ("match.target", policy.match.get("target")))
            for key, value in targets:
                if value is not None and value not in names:
                    raise ValueError(f"policies[{i}].{key}: unknown service {value!r}")
        policy_names = [p.name for p in self.policies]
        if len(policy_names) != len(set(policy_names)):
            raise ValueError("policies: names must be unique")
        if self.flap_low > self.flap_high:
            raise ValueError("flap_low must not exceed flap_high")
        for i, policy in enumerate(self.policies):
            problem = policy_params_problem(policy)
            if problem is not None:
                raise ValueError(f"policies[{i}].{problem}")
        self._cluster_changes_on_the_backups_service()
        return self

    def _cluster_changes_on_the_backups_service(self) -> None:
        """A backup stands aside for a change of its cluster only when both run on one target
        (the engine's one run per target): a failover, rejoin, switchover or restore of the
        backed-up nodes must act on `[backups].service`, nowhere else."""
        if self.backups is None:
            return
        changes = action_class("backup").yields_to
        dsns = set(self.backups.nodes.values())
        for i, policy in enumerate(self.policies):
            nodes = policy.params.get("nodes")
            if policy.action not in changes or not isinstance(nodes, Mapping):
                continue
            if dsns.isdisjoint(nodes.values()):
                continue
            targets = self.targets_of(policy)
            if targets is None or targets != {self.backups.service}:
                where = "any service" if targets is None else ", ".join(sorted(targets)) or "none"
                raise ValueError(
                    f"policies[{i}]: {policy.action} acts on the backed-up nodes but on {where}, "
                    f"not on backups.service {self.backups.service!r}: it could run beside a "
                    "backup of them"
                )

    def executor_of(self, service: str | None) -> str | None:
        """The name of the executor that acts on `service`: its own, else the only one."""
        spec = self.service(service) if service else None
        if spec is not None and spec.executor is not None:
            return spec.executor
        return next(iter(self.executors)) if len(self.executors) == 1 else None

    def service(self, name: str) -> ServiceSpec | None:
        return next((s for s in self.services if s.name == name), None)

    def probe(self, name: str) -> ProbeSpec | None:
        return next((p for p in self.probes if p.name == name), None)

    def policy(self, name: str) -> PolicySpec | None:
        return next((p for p in self.policies if p.name == name), None)

    def targets_of(self, policy: PolicySpec) -> frozenset[str] | None:
        """The services a policy may act on (None: any). An alert policy's `target`; an
        operator policy's `match.target`, if it names one; a probe policy's, the services of
        the probes it matches, on the labels decide() matches them on (the service's labels,
        `probe`, `service`, `kind`, `target`)."""
        if policy.source == "alert":
            return frozenset({policy.target} if policy.target else ())
        if policy.source == "operator":
            named = policy.match.get("target")
            return None if named is None else frozenset({named})
        found = set()
        for probe in self.probes:
            service = self.service(probe.service)
            labels = {
                **(service.labels if service else {}),
                "probe": probe.name,
                "service": probe.service,
                "kind": probe.name,
                "target": probe.service,
            }
            if all(labels.get(key) == value for key, value in policy.match.items()):
                found.add(probe.service)
        return frozenset(found)

    def policy_for_request(self, action: str, target: str) -> PolicySpec | None:
        """Whose params and limits an operator's request runs with: an operator policy for
        the action and target, else any policy of that action that acts on that target. None
        when no policy lets the action act there: a failover policy of the database cluster
        does not make `failover` on `redis` a request (its run would escape the cluster's
        one-run-at-a-time), nor a shop's restart policy a restart of a database node."""

        def fits(p: PolicySpec) -> bool:
            targets = self.targets_of(p)
            return p.action == action and (targets is None or target in targets)

        ranked = [p for p in self.policies if fits(p) and p.source == "operator"]
        ranked += [p for p in self.policies if fits(p) and p.source != "operator"]
        return ranked[0] if ranked else None

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        targets_file: Path | None = None,
        **overrides: Any,
    ) -> Settings:
        """From CP_* variables and the targets file (CP_TARGETS_FILE); errors name the key."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = targets_file or (
            Path(environ[ENV_PREFIX + "TARGETS_FILE"])
            if environ.get(ENV_PREFIX + "TARGETS_FILE")
            else None
        )
        if path is not None:
            values.update(read_targets(path))
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in environ and name not in (
                "executors",
                "services",
                "probes",
                "policies",
                "backups",
            ):
                values[name] = environ[key]
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration: {describe_errors(exc)}") from None


def policy_params_problem(policy: PolicySpec) -> str | None:
    """What is wrong with a policy's action or params (checked at start, not mid-outage)."""
    try:
        action = action_class(policy.action)
    except UnknownAction as exc:
        return f"action: {exc}"
    if action.Params is None:
        return None  # the action declares no params model: it parses its own when it runs
    try:
        action.Params.model_validate(policy.params)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return f"params{'.' + loc if loc else ''}: {err['msg']}"
    return None


def read_targets(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"targets file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"targets file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"targets file {path} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"targets file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = dict(data.pop("controlplane", {}))
    for section in ("executors", "services", "probes", "policies", "backups"):
        if section in data:
            values[section] = data.pop(section)
    if data:
        raise ConfigError(f"targets file {path}: unknown section(s) {', '.join(sorted(data))}")
    return values


def describe_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ""
        for item in err["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        parts.append(f"{loc or 'settings'}: {err['msg']}")
    return "; ".join(parts)
