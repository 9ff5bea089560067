"""Executors' params, as the targets file gives them (validated when the control plane is
built: a wrong one names its key)."""

from __future__ import annotations

import pwd
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
