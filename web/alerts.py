"""POST /api/v1/alerts: Alertmanager's webhook (version 4), bearer-token authenticated."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from controlplane import services
from controlplane.errors import InvalidRequest
from web.auth import control_plane, require_token
from web.body import json_object

alerts = Blueprint("alerts", __name__)


@alerts.post("/alerts")
def receive() -> tuple[Response, int]:
    cp = control_plane()
    require_token(cp.settings.webhook_token, "webhook")
    body = json_object("a JSON object (Alertmanager webhook v4)")
    try:
        payload = services.WebhookIn.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(services.validation_errors(exc.errors())) from None
    return jsonify(services.receive_alerts(cp, payload)), 200
