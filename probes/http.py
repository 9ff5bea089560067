"""HttpProbe: status code, latency, and optionally a string the body must contain."""

from __future__ import annotations

import requests
from pydantic import Field

from probes.base import Health, Params, Probe, ProbeResult, describe, down


class HttpParams(Params):
    url: str = Field(pattern=r"^https?://")
    expect_status: int = 200
    body_contains: str | None = None
    degraded_body_contains: str | None = None  # e.g. '"status":"degraded"' on /readyz
    slow_ms: float | None = Field(default=None, gt=0)


class HttpProbe(Probe):
    kind = "http"
    Params = HttpParams

    def check(self) -> ProbeResult:
        p: HttpParams = self.params  # type: ignore[assignment]
        try:
            response = requests.get(p.url, timeout=self.timeout_s, allow_redirects=False)
        except requests.RequestException as exc:
            return down(describe(exc), url=p.url)
        details = {"url": p.url, "status": response.status_code}
        elapsed_ms = response.elapsed.total_seconds() * 1000
        if response.status_code != p.expect_status:
            return down(f"HTTP {response.status_code}, expected {p.expect_status}", **details)
        body = response.text
        if p.body_contains is not None and p.body_contains not in body:
            return down(f"body lacks {p.body_contains!r}", **details)
        if p.degraded_body_contains is not None and p.degraded_body_contains in body:
            return ProbeResult(Health.DEGRADED, "reports itself degraded", details=details)
        if p.slow_ms is not None and elapsed_ms > p.slow_ms:
            return ProbeResult(
                Health.DEGRADED, f"slow: {elapsed_ms:.0f} ms > {p.slow_ms:g} ms", details=details
            )
        return ProbeResult(Health.UP, f"HTTP {response.status_code}", details=details)
