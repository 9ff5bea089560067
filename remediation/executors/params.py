"""Executors' params, as the targets file gives them (validated when the control plane is
built: a wrong one names its key)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LabParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stack_file: Path  # the lab's stack.json: its components' recipes and pids
