"""Executors' params, as the targets file gives them (validated when the control plane is
built: a wrong one names its key)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


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
    data_dir: Path | None = None  # PostgreSQL's: every process working there is part of it


class LocalParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    components: dict[str, LocalComponent] = Field(min_length=1)
    tools_dir: Path | None = None  # PostgreSQL's bin directory (pg_basebackup, pg_rewind...)
    passfile: Path | None = None  # PGPASSFILE for those tools
