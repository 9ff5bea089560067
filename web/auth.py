"""Bearer-token checks for the API and the Alertmanager webhook."""

from __future__ import annotations

import hmac

from flask import current_app, request

from controlplane import services
from controlplane.errors import ControlPlaneError


class Unauthorized(ControlPlaneError):
    status = 401


def control_plane() -> services.ControlPlane:
    cp: services.ControlPlane = current_app.extensions["control_plane"]
    return cp


def require_token(expected: str, what: str) -> None:
    supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not expected:
        raise Unauthorized(f"no {what} token is configured: this endpoint is closed")
    if not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise Unauthorized(f"a valid {what} bearer token is required")
