"""Probe kinds by name, imported only when used (like healthchecks' TRANSPORTS)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from probes.base import Probe, ProbeConfigError

PROBES: dict[str, str] = {
    "http": "probes.http:HttpProbe",
    "tcp": "probes.tcp:TcpProbe",
    "postgres": "probes.postgres:PostgresProbe",
    "pg_primary": "probes.pg_primary:PgPrimaryProbe",
    "pg_standby": "probes.pg_standby:PgStandbyProbe",
    "pg_archive": "probes.pg_archive:PgArchiveProbe",
    "redis": "probes.redis:RedisProbe",
    "prometheus": "probes.prometheus:PrometheusProbe",
    "invariant": "probes.invariant:InvariantProbe",
    "backup": "probes.backup:BackupProbe",
    "cache_truth": "probes.cache_truth:CacheTruthProbe",
}


def probe_class(kind: str) -> type[Probe]:
    try:
        module_name, _, class_name = PROBES[kind].partition(":")
    except KeyError:
        raise ProbeConfigError(
            f"unknown probe kind {kind!r} (known: {', '.join(sorted(PROBES))})"
        ) from None
    cls: type[Probe] = getattr(importlib.import_module(module_name), class_name)
    return cls


def build_probe(kind: str, name: str, params: Mapping[str, Any], timeout_s: float) -> Probe:
    return probe_class(kind)(name, params, timeout_s)
