"""POST /api/v1/alerts: Alertmanager's webhook (version 4), bearer-token authenticated."""

from __future__ import annotations

import math
import threading
import time
import weakref

from cachetools import TTLCache
from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from controlplane import services
from controlplane.errors import InvalidRequest
from web.auth import control_plane, require_token
from web.body import json_object

alerts = Blueprint("alerts", __name__)


class IntakeLimit:
    """A token bucket of alerts per source: `per_minute` sustained, `burst` at once. Sources
    are bounded in number (an LRU of buckets), so many sources cannot exhaust memory."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate_per_s = per_minute / 60
        self.burst = burst
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(maxsize=4096, ttl=3600)
        self._lock = threading.Lock()

    def take(self, source: str, alerts: int, now: float | None = None) -> float:
        """0 when `alerts` may come in now (and they are counted), else seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(source, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            if alerts <= tokens:
                self._buckets[source] = (tokens - alerts, now)
                return 0.0
            self._buckets[source] = (tokens, now)
            if alerts > self.burst:
                return math.inf
            return (alerts - tokens) / self.rate_per_s


# Per control plane (weakly: one gone takes its buckets along; an id() could be reused).
_limits: weakref.WeakKeyDictionary[services.ControlPlane, IntakeLimit] = weakref.WeakKeyDictionary()
_limits_lock = threading.Lock()


def intake_limit(cp: services.ControlPlane) -> IntakeLimit:
    with _limits_lock:
        found = _limits.get(cp)
        if found is None:
            found = _limits[cp] = IntakeLimit(
                cp.settings.intake_alerts_per_minute, cp.settings.intake_alerts_burst
            )
        return found


@alerts.post("/alerts")
def receive() -> tuple[Response, int] | tuple[Response, int, dict[str, str]]:
    cp = control_plane()
    require_token(cp.settings.webhook_token, "webhook")
    body = json_object("a JSON object (Alertmanager webhook v4)")
    try:
        payload = services.WebhookIn.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(services.validation_errors(exc.errors())) from None
    # Firing alerts are what costs (incidents, decisions, actions); a resolution only closes.
    firing = sum(a.status == "firing" for a in payload.alerts)
    wait_s = intake_limit(cp).take(request.remote_addr or "?", firing) if firing else 0.0
    if wait_s:
        cp.metrics.alerts_received.labels("refused").inc(len(payload.alerts))
        if math.isinf(wait_s):
            raise InvalidRequest(
                f"{firing} firing alerts in one post: more than the intake's burst "
                f"({cp.settings.intake_alerts_burst})"
            )
        retry = str(max(1, math.ceil(wait_s)))
        message = f"too many alerts from this source: retry in {retry}s"
        return jsonify(error=message), 429, {"Retry-After": retry}
    return jsonify(services.receive_alerts(cp, payload)), 200
