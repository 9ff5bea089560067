"""Executors' params, as the targets file gives them (validated when the control plane is
built: a wrong one names its key)."""

from __future__ import annotations

import pwd
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LabParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stack_file: Path  # the lab's stack.json: its components' recipes and pids


class LocalComponent(BaseModel):
    """How one process is started and stopped, as a systemd unit would say it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    argv: tuple[str, ...] = Field(min_length=1)  # the exact command line (how it is found)
    # "primary" / "standby": PostgreSQL (stopped "fast" with SIGINT, given 10 s to stop);
    # anything else: SIGTERM and 3 s.
    role: str = "service"
    user: str | None = None  # the OS user it runs as
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    log: Path  # its stdout and stderr, appended
    # PostgreSQL's (role primary or standby): every process working there is part of it.
    data_dir: Path | None = None

    @field_validator("argv")
    @classmethod
    def a_command_line(cls, argv: tuple[str, ...]) -> tuple[str, ...]:
        if not argv[0] or any("\0" in arg for arg in argv):
            raise ValueError("argv[0] must name a program, and no argument may hold a NUL")
        return argv

    @field_validator("user")
    @classmethod
    def a_user_of_this_host(cls, user: str | None) -> str | None:
        if user is not None:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise ValueError(f"no OS user {user!r} on this host") from None
        return user

    @field_validator("log", "cwd")
    @classmethod
    def an_absolute_path(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"{path}: an absolute path")
        return path

    @field_validator("data_dir")
    @classmethod
    def a_directory_of_its_own(cls, path: Path | None) -> Path | None:
        # Every process working in a data directory is killed with its node: "/" or "/srv"
        # would take the host's other daemons with it.
        if path is not None and (not path.is_absolute() or len(path.parts) < 3):
            raise ValueError(f"{path}: an absolute path at least two levels deep")
        return path


class LocalParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    components: dict[str, LocalComponent] = Field(min_length=1)
    tools_dir: Path | None = None  # PostgreSQL's bin directory (pg_basebackup, pg_rewind...)
    passfile: Path | None = None  # PGPASSFILE for those tools


UNIT_NAME = r"^[A-Za-z0-9@_][A-Za-z0-9@_.:-]*\.service$"  # never an option ("-H...")
COMPONENT_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class SshHost(BaseModel):
    """A host the control plane reaches over SSH: its address, and whom it logs in as."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = Field(min_length=1, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(min_length=1, pattern=r"^[a-z_][a-z0-9_-]*$")
    key_file: Path  # the private key (no agent, no password)

    @field_validator("key_file")
    @classmethod
    def an_absolute_key_path(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError(f"{path}: an absolute path")
        return path


class UnitComponent(BaseModel):
    """One component as a systemd unit, on this host or on one of `hosts`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit: str = Field(pattern=UNIT_NAME)
    host: str | None = None  # a key of the executor's `hosts`; none: this host
    # "primary" / "standby": a PostgreSQL node (its tools run as `user`, in `data_dir`).
    role: str = "service"
    user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]*$")
    data_dir: Path | None = None
    log: Path | None = None  # its log file on its host (else journalctl -u UNIT)

    @field_validator("log")
    @classmethod
    def an_absolute_log(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"{path}: an absolute path")
        return path

    @field_validator("data_dir")
    @classmethod
    def a_data_directory_of_its_own(cls, path: Path | None) -> Path | None:
        if path is not None and (not path.is_absolute() or len(path.parts) < 3):
            raise ValueError(f"{path}: an absolute path at least two levels deep")
        return path


class SystemdParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    components: dict[str, UnitComponent] = Field(min_length=1)
    hosts: dict[str, SshHost] = Field(default_factory=dict)
    known_hosts: Path | None = None  # required with hosts: their keys, checked
    # The systemctl command on the hosts (a path, and options such as --user).
    systemctl: tuple[str, ...] = Field(default=("systemctl",), min_length=1)
    tools_dir: Path | None = None  # PostgreSQL's bin directory on the hosts
    passfile: Path | None = None  # PGPASSFILE for those tools, on the hosts
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    # Each step but a tool's run or a stop; a fence's step, without a word from its host (a
    # failover waits on it: a partitioned old primary costs this much of the outage).
    step_timeout_s: float = Field(default=5.0, gt=0, le=600)
    fence_timeout_s: float = Field(default=5.0, gt=0, le=120)  # until the unit's cgroup is empty

    @model_validator(mode="after")
    def hosts_named_and_known(self) -> SystemdParams:
        for name in [*self.components, *self.hosts]:
            if not re.match(COMPONENT_NAME, name):
                raise ValueError(f"{name!r}: a component or host name is [A-Za-z0-9_.-]")
        for name, comp in self.components.items():
            if comp.host is not None and comp.host not in self.hosts:
                raise ValueError(f"components.{name}.host: no host {comp.host!r} in hosts")
        if self.hosts and self.known_hosts is None:
            raise ValueError("known_hosts: required with hosts (their keys are checked)")
        return self


class SshParams(SystemdParams):
    @model_validator(mode="after")
    def every_component_on_a_host(self) -> SshParams:
        local = [name for name, comp in self.components.items() if comp.host is None]
        if local:
            raise ValueError(f"components {', '.join(local)}: each names its host")
        return self
