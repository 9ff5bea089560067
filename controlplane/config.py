"""Settings: the control plane's one frozen, typed configuration, from CP_* variables and a TOML
targets file (services, probes, policies). The only reader of either; read once at start-up."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controlplane.errors import ConfigError

ENV_PREFIX = "CP_"
Mode = Literal["auto", "approval", "dry_run"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServiceSpec(Frozen):
    """Something the control plane watches and may act on."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    labels: dict[str, str] = Field(default_factory=dict)
    component: str | None = None  # the executor's name for its process, if it has one


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


class PolicySpec(Frozen):
    """When an incident matches, run `action` on its service, within these limits."""

    name: str
    match: dict[str, str]  # "kind" (probe name or alertname) and/or labels, all must equal
    action: str
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


class Settings(Frozen):
    database_url: str = "sqlite:///controlplane.db"
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8080, ge=1, le=65535)
    instance_id: str = Field(default_factory=lambda: f"cp-{os.getpid()}")
    api_token: str = ""
    webhook_token: str = ""
    admin_password: str = ""  # the operators' dashboard login
    stack_file: Path | None = None  # the lab executor's process table
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
    services: tuple[ServiceSpec, ...] = ()
    probes: tuple[ProbeSpec, ...] = ()
    policies: tuple[PolicySpec, ...] = ()
    backups: BackupSettings | None = None

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
        for i, policy in enumerate(self.policies):
            for name in policy.defer_while.probes_not_up:
                if name not in probe_names:
                    raise ValueError(
                        f"policies[{i}].defer_while.probes_not_up: unknown probe {name!r}"
                    )
        if self.flap_low > self.flap_high:
            raise ValueError("flap_low must not exceed flap_high")
        return self

    def service(self, name: str) -> ServiceSpec | None:
        return next((s for s in self.services if s.name == name), None)

    def probe(self, name: str) -> ProbeSpec | None:
        return next((p for p in self.probes if p.name == name), None)

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
            if key in environ and name not in ("services", "probes", "policies", "backups"):
                values[name] = environ[key]
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration: {describe_errors(exc)}") from None


def read_targets(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"targets file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"targets file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = dict(data.pop("controlplane", {}))
    for section in ("services", "probes", "policies", "backups"):
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
