"""The README's configuration reference names every key the control plane reads, and no key
it does not: it cannot drift from the settings' models."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from controlplane.config import (
    BackupSettings,
    DeferWhile,
    ExecutorSpec,
    PolicySpec,
    ProbeSpec,
    ServiceSpec,
    Settings,
)

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ("executors", "services", "probes", "policies", "backups")


def documented() -> dict[str, set[str]]:
    text = README.read_text()
    body = text[text.index("### Configuration reference") :]
    body = body[: body.index("\n### ", 5)]
    found: dict[str, set[str]] = {}
    current = ""
    for line in body.splitlines():
        if m := re.match(r"^`\[+([a-z]+)(?:\.NAME)?\]+`", line):
            current = m.group(1)
        elif line.startswith("| `") and current:
            first = line.split("|")[1]
            found.setdefault(current, set()).update(re.findall(r"`([a-z_]+)`", first))
    return found


def keys(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_the_readme_reference_names_every_key_and_only_those() -> None:
    found = documented()
    expected = {
        "controlplane": keys(Settings) - set(SECTIONS),
        "executors": keys(ExecutorSpec),
        "services": keys(ServiceSpec),
        "probes": keys(ProbeSpec),
        "policies": keys(PolicySpec),
        "backups": keys(BackupSettings),
    }
    assert found == expected
    assert set(DeferWhile.model_fields) <= set(re.findall(r"`([a-z_]+)`", README.read_text()))
