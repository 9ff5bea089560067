"""Bearer-token checks for the API and the Alertmanager webhook."""

from __future__ import annotations

import hmac
import re

from flask import current_app, request

from controlplane import services
from controlplane.errors import ControlPlaneError

# Exactly `Bearer <token>`: one space, the token visible ASCII, nothing else.
BEARER = re.compile(r"Bearer ([!-~]+)")


class Unauthorized(ControlPlaneError):
    status = 401


def control_plane() -> services.ControlPlane:
    cp: services.ControlPlane = current_app.extensions["control_plane"]
    return cp


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None for anything else (a
    raw token, another scheme, non-ASCII bytes)."""
    found = BEARER.fullmatch(request.headers.get("Authorization", ""))
    return found.group(1) if found else None


def require_token(expected: str, what: str) -> None:
    if not expected:
        raise Unauthorized(f"no {what} token is configured: this endpoint is closed")
    supplied = bearer_token()
    if supplied is None or not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise Unauthorized(f"a valid {what} bearer token is required (Authorization: Bearer …)")
