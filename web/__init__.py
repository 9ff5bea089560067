"""The control plane's web layer: `create_app(control_plane)` for the one a caller started
(`controlplane serve` does, web/server.py); building the app starts nothing."""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

from controlplane import services
from controlplane.errors import ControlPlaneError
from web.body import MAX_BODY_BYTES, IdConverter

logger = logging.getLogger(__name__)


# Bidi controls reorder what follows them on screen: in an alert's label they would show one
# target's name as another's. Pages show them as their code points (web/static/app.js too).
BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(value: Any) -> Any:
    """Every `{{ … }}` of the templates: outside text with its bidi controls made visible
    (markup a filter made, such as `tojson`, is left as it is)."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return BIDI.sub(lambda m: f"<U+{ord(m.group()):04X}>", value)
    return value


def api_app() -> Flask:
    """The JSON API's views on an app of their own, with no control plane behind them: what
    the OpenAPI document describes outside a request (tests, `schemathesis`)."""
    from web.alerts import alerts
    from web.api import api

    app = Flask(__name__)
    app.url_map.converters["id"] = IdConverter
    app.register_blueprint(api, url_prefix="/api/v1")
    app.register_blueprint(alerts, url_prefix="/api/v1")
    return app


def create_app(*, control_plane: services.ControlPlane) -> Flask:
    """The web app of a control plane the caller started (and stops)."""
    from flask_limiter.errors import RateLimitExceeded

    from web import login
    from web.alerts import alerts
    from web.api import api
    from web.dashboard import dashboard
    from web.health import health

    app = Flask(__name__)
    app.jinja_env.finalize = visible
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # 413 beyond it, before it is read
    app.url_map.converters["id"] = IdConverter
    app.extensions["control_plane"] = control_plane
    app.register_blueprint(health)
    app.register_blueprint(api, url_prefix="/api/v1")
    app.register_blueprint(alerts, url_prefix="/api/v1")
    login.setup(app, control_plane)
    app.register_blueprint(login.login)
    app.register_blueprint(dashboard)
    app.register_error_handler(RateLimitExceeded, login.rate_limited)

    def is_page() -> bool:  # the dashboard's pages answer in HTML; the APIs (its own too) JSON
        json_paths = ("/api/", "/dashboard/api/", "/healthz", "/readyz", "/metrics")
        return not request.path.startswith(json_paths)

    @app.errorhandler(ControlPlaneError)
    def control_plane_error(exc: ControlPlaneError) -> tuple[Response | str, int]:
        if is_page():
            return render_template("error.html", code=exc.status, message=str(exc)), exc.status
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response | str, int]:
        message, code = exc.description or exc.name, exc.code or 500
        if is_page():
            return render_template("error.html", code=code, message=message), code
        return jsonify(error=message), code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response | str, int]:
        logger.exception("unhandled error")
        if is_page():
            return render_template("error.html", code=500, message="internal error"), 500
        return jsonify(error="internal error"), 500

    return app
