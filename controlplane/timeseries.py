"""Time series for the dashboard's charts: Prometheus range queries (prometheus-api-client),
and the incidents and action runs of the same window, to draw over them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from time import monotonic
from typing import TYPE_CHECKING, Any

from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests import RequestException
from sqlalchemy import func, or_, select

from controlplane import store
from controlplane.models import ActionRun, Incident, ProbeRun

if TYPE_CHECKING:
    from controlplane.runtime import ControlPlane

logger = logging.getLogger(__name__)

RANGES_S = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600}
STEP_S = {"15m": 5, "1h": 15, "6h": 60, "24h": 300}
MAX_LAG_SAMPLES = 2000  # of the probe history drawn in one chart
RATE = {"15m": "30s", "1h": "1m", "6h": "2m", "24h": "10m"}
MAX_NOTE_ROWS = 2000  # incidents and runs read per window: the charts draw a summary of them
QUERY_TIMEOUT_S = 5  # Prometheus's own limit on one range query
SERIES_DEADLINE_S = 10.0  # all panels together: past it, the rest say so rather than wait


@dataclass(frozen=True, slots=True)
class Panel:
    """One chart: its PromQL (with `{rate}` for the rate window) and the label naming a line."""

    title: str
    query: str
    legend: str
    unit: str = ""


def quantile(q: str) -> str:
    """The request latency quantile per shop instance (`{{rate}}` kept for `format`)."""
    return (
        f"histogram_quantile({q}, sum by (instance, le) "
        "(rate(shop_request_duration_seconds_bucket[{rate}])))"
    )


PANELS: dict[str, Panel] = {
    "orders": Panel(
        "Orders/s by result", "sum by (result) (rate(shop_orders_total[{rate}]))", "result"
    ),
    "latency": Panel(
        "Request latency p50 / p99 per instance",
        f'label_replace({quantile("0.5")}, "q", "p50", "", "")'
        f' or label_replace({quantile("0.99")}, "q", "p99", "", "")',
        "instance,q",
        "s",
    ),
    "errors": Panel(
        "Error rate (5xx share) per instance",
        '(sum by (instance) (rate(shop_request_duration_seconds_count{{status=~"5.."}}[{rate}]))'
        " or 0 * sum by (instance) (rate(shop_request_duration_seconds_count[{rate}])))"
        " / sum by (instance) (rate(shop_request_duration_seconds_count[{rate}]))",
        "instance",
        "ratio",
    ),
    "cache": Panel(
        "Cache hit ratio by level",
        '(sum by (level) (rate(shop_cache_requests_total{{result="hit"}}[{rate}]))'
        " or 0 * sum by (level) (rate(shop_cache_requests_total[{rate}])))"
        " / sum by (level) (rate(shop_cache_requests_total[{rate}]))",
        "level",
        "ratio",
    ),
    "replication": Panel(
        "Replication: primary and synchronous standby (1 = ok)",
        'cp_probe_up{{probe=~"shop-db-primary|shop-db-standby|shop-db-redundancy"}}',
        "probe",
    ),
    "probe_latency": Panel(
        "Probe latency p90 per probe",
        "histogram_quantile(0.9, sum by (probe, le) "
        "(rate(cp_probe_duration_seconds_bucket[{rate}])))",
        "probe",
        "s",
    ),
    "probe_up": Panel("Probe health (1 = up)", "cp_probe_up", "probe"),
}


def prometheus_url(cp: ControlPlane) -> str | None:
    """The Prometheus the control plane already queries (its `prometheus` probes)."""
    for spec in cp.settings.probes:
        if spec.kind == "prometheus" and isinstance(spec.params.get("url"), str):
            return str(spec.params["url"])
    return None


def series(cp: ControlPlane, range_name: str, now: datetime) -> dict[str, Any]:
    """Each panel's lines: {panel: {"title", "unit", "lines": [{"name", "x", "y"}], "error"}}."""
    if range_name not in RANGES_S:
        raise ValueError(f"range must be one of {', '.join(RANGES_S)}")
    url = prometheus_url(cp)
    start = now - timedelta(seconds=RANGES_S[range_name])
    out: dict[str, Any] = {}
    # The client's own timeout too: a Prometheus that accepts and never answers must not hold
    # a web thread (and every viewer waiting on that computation) for ever.
    client = (
        PrometheusConnect(url=url, disable_ssl=True, timeout=QUERY_TIMEOUT_S + 1) if url else None
    )
    deadline = monotonic() + SERIES_DEADLINE_S
    for name, panel in PANELS.items():
        entry: dict[str, Any] = {"title": panel.title, "unit": panel.unit, "lines": []}
        out[name] = entry
        if client is None:
            entry["error"] = "no Prometheus is configured"
            continue
        if monotonic() > deadline:
            entry["error"] = "Prometheus: too slow, not asked"
            continue
        query = panel.query.format(rate=RATE[range_name])
        try:
            result = client.custom_query_range(
                query,
                start_time=start,
                end_time=now,
                step=str(STEP_S[range_name]),
                params={"timeout": f"{QUERY_TIMEOUT_S}s"},
            )
        except (PrometheusApiClientException, RequestException, ValueError) as exc:
            entry["error"] = f"Prometheus: {type(exc).__name__}"
            logger.warning("chart %s: %s", name, exc)
            continue
        for item in result:
            labels = item.get("metric", {})
            label = " ".join(str(labels.get(k, "")) for k in panel.legend.split(",")).strip()
            values = item.get("values", [])
            entry["lines"].append(
                {
                    "name": label or name,
                    "x": [
                        datetime.fromtimestamp(float(t), tz=now.tzinfo).isoformat()
                        for t, _ in values
                    ],
                    "y": [_number(v) for _, v in values],
                }
            )
    out["replication_lag"] = replication_lag(cp, start, now)
    return out


def replication_lag(cp: ControlPlane, start: datetime, now: datetime) -> dict[str, Any]:
    """Bytes of WAL each standby has yet to replay, from the `pg_standby` probe's history in the
    state store (its details carry `lag_bytes` as the leader sees it): no Prometheus needed."""
    entry: dict[str, Any] = {
        "title": "Replication lag per standby (WAL not yet replayed)",
        "unit": "bytes",
        "samples": [],
    }
    probe = next((p.name for p in cp.settings.probes if p.kind == "pg_standby"), None)
    if probe is None:
        entry["error"] = "no pg_standby probe is configured"
        return entry
    with store.read(cp.factory) as s:
        rows = s.execute(
            select(ProbeRun.at, ProbeRun.details)
            .where(ProbeRun.probe == probe, ProbeRun.at >= start, ProbeRun.at <= now)
            .order_by(ProbeRun.at)
        ).all()
    stride = max(1, -(-len(rows) // MAX_LAG_SAMPLES))
    entry["samples"] = [
        {"at": at.isoformat(), "lag_bytes": details.get("lag_bytes") or {}}
        for at, details in rows[::stride]
    ]
    return entry


def _number(value: str) -> float | None:
    number = float(value)
    return None if number != number or number in (float("inf"), float("-inf")) else number


def chart_notes(
    cp: ControlPlane, range_name: str, now: datetime, *, limit: int = MAX_NOTE_ROWS
) -> dict[str, Any]:
    """The incidents open in the window (spans) and the action runs started in it (markers),
    the most recent `limit` of each, with how many of each the window holds in all: an alert
    storm opens thousands of incidents, and the charts draw a bounded summary of them
    (web/charts.py), so they are read bounded too."""
    start = now - timedelta(seconds=RANGES_S[range_name])
    in_window = (
        or_(Incident.resolved_at.is_(None), Incident.resolved_at >= start),
        Incident.detected_at <= now,
    )
    with store.read(cp.factory) as s:
        spans_total = s.scalar(select(func.count()).select_from(Incident).where(*in_window)) or 0
        incidents = s.execute(
            select(Incident.id, Incident.kind, Incident.target, Incident.detected_at,
                   Incident.resolved_at)
            .where(*in_window).order_by(Incident.detected_at.desc()).limit(limit)
        ).all()  # fmt: skip
        spans = [
            {"start": max(detected_at, start).isoformat(),
             "end": (resolved_at or now).isoformat(),
             "label": f"#{id_} {kind} on {target}"}
            for id_, kind, target, detected_at, resolved_at in reversed(incidents)
        ]  # fmt: skip
        markers_total = (
            s.scalar(
                select(func.count()).select_from(ActionRun).where(ActionRun.created_at >= start)
            )
            or 0
        )
        runs = s.execute(
            select(ActionRun.id, ActionRun.action, ActionRun.target, ActionRun.state,
                   ActionRun.requested_by, ActionRun.started_at, ActionRun.created_at)
            .where(ActionRun.created_at >= start)
            .order_by(ActionRun.created_at.desc()).limit(limit)
        ).all()  # fmt: skip
        markers = [
            {"at": (started_at or created_at).isoformat(), "action": action, "target": target,
             "state": state, "who": who, "id": id_}
            for id_, action, target, state, who, started_at, created_at in reversed(runs)
        ]  # fmt: skip
    return {
        "spans": spans,
        "markers": markers,
        "spans_total": spans_total,
        "markers_total": markers_total,
    }
