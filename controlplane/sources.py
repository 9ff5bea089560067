"""Where an incident comes from, and how its fingerprint says so: `probe:<probe name>` or
`alert:<Alertmanager's fingerprint>`. Written and parsed here only; and an alert's status."""

from __future__ import annotations

from enum import StrEnum


class Source(StrEnum):
    PROBE = "probe"
    ALERT = "alert"
    OPERATOR = "operator"  # a policy only an operator's request reaches; never an incident's


class AlertStatus(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


ALERT_PREFIX = f"{Source.ALERT}:"
PROBE_PREFIX = f"{Source.PROBE}:"


def of_probe(name: str) -> str:
    return PROBE_PREFIX + name


def of_alert(fingerprint: str) -> str:
    return ALERT_PREFIX + fingerprint


def source_of(fingerprint: str) -> Source:
    return Source.PROBE if fingerprint.startswith(PROBE_PREFIX) else Source.ALERT


def alert_of(fingerprint: str) -> str | None:
    """The alert's own fingerprint in an incident's, or None for a probe's incident."""
    return fingerprint.removeprefix(ALERT_PREFIX) if fingerprint.startswith(ALERT_PREFIX) else None
