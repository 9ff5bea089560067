"""The control plane's own /healthz, /readyz and /metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from controlplane import services
from web.auth import control_plane

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    return jsonify(status="alive", instance=control_plane().settings.instance_id)


@health.get("/readyz")
def readyz() -> tuple[Response, int]:
    ready, checks = services.readiness(control_plane())
    return jsonify(status="ready" if ready else "not_ready", checks=checks), 200 if ready else 503


@health.get("/metrics")
def metrics() -> Response:
    return Response(services.metrics_text(control_plane()), mimetype=CONTENT_TYPE_LATEST)
