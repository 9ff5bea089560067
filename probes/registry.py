"""Probe kinds by name, imported only when used (like healthchecks' TRANSPORTS)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kinds
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
        cls: type[Probe] = kinds.load(PROBES, kind, "probe kind")
    except KeyError as exc:
        raise ProbeConfigError(exc.args[0]) from None
    return cls


def build_probe(kind: str, name: str, params: Mapping[str, Any], timeout_s: float) -> Probe:
    return probe_class(kind)(name, params, timeout_s)
