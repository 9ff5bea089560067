"""The control plane's own /healthz, /readyz and /metrics: cheap, for many checkers."""

from __future__ import annotations

import threading
from typing import Any

from cachetools import TTLCache, cached
from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from controlplane import services
from web.auth import control_plane

health = Blueprint("health", __name__)
# Readiness is looked up at most this often per web worker: two hundred health checkers
# polling cost one state store read, not two hundred; far inside any checker's period.
READY_FOR_S = 0.5


@health.get("/healthz")
def healthz() -> Response:
    return jsonify(status="alive", instance=control_plane().settings.instance_id)


# Keyed by the control plane itself (held for the TTL), not by id(): see web/shared_reads.py.
@cached(TTLCache(maxsize=8, ttl=READY_FOR_S), key=lambda cp: cp, lock=threading.Lock())
def readiness(cp: services.ControlPlane) -> tuple[bool, dict[str, Any]]:
    return services.readiness(cp)


@health.get("/readyz")
def readyz() -> tuple[Response, int]:
    ready, checks = readiness(control_plane())
    return jsonify(status="ready" if ready else "not_ready", checks=checks), 200 if ready else 503


@health.get("/metrics")
def metrics() -> Response:
    return Response(services.metrics_text(control_plane()), mimetype=CONTENT_TYPE_LATEST)
