"""PrometheusProbe: a PromQL expression, evaluated at an explicit time, against a threshold."""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from typing import Literal

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from pydantic import Field
from urllib3.util.retry import Retry

from probes.base import Health, Params, Probe, ProbeResult, describe, down

COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne,
}  # fmt: skip


class PrometheusParams(Params):
    url: str = Field(pattern=r"^https?://")
    query: str = Field(min_length=1)
    # The series is unhealthy when `value <op> threshold`; no series at all is healthy.
    op: Literal[">", ">=", "<", "<=", "==", "!="] = ">"
    threshold: float = 0.0
    unhealthy: Literal["down", "degraded"] = "down"


class PrometheusProbe(Probe):
    kind = "prometheus"
    Params = PrometheusParams

    def check(self) -> ProbeResult:
        p: PrometheusParams = self.params  # type: ignore[assignment]
        # No client-side retries: the probe's timeout is the whole budget (the scheduler
        # probes again at the next interval).
        prom = PrometheusConnect(
            url=p.url, disable_ssl=True, timeout=self.timeout_s, retry=Retry(total=0)
        )
        at = time.time()
        try:
            result = prom.custom_query(
                p.query, params={"time": at, "timeout": f"{int(self.timeout_s * 1000)}ms"}
            )
        except (PrometheusApiClientException, requests.RequestException, ValueError) as exc:
            return down(describe(exc), query=p.query)
        breaching = []
        for series in result:
            value = float(series["value"][1])
            if not math.isnan(value) and COMPARE[p.op](value, p.threshold):
                breaching.append({"labels": series.get("metric", {}), "value": value})
        details = {"query": p.query, "series": len(result), "breaching": breaching[:20]}
        if breaching:
            health = Health.DOWN if p.unhealthy == "down" else Health.DEGRADED
            summary = f"{len(breaching)} series {p.op} {p.threshold:g}"
            return ProbeResult(health, summary, details=details)
        return ProbeResult(
            Health.UP, f"{len(result)} series, none {p.op} {p.threshold:g}", details=details
        )
