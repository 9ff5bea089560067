"""Who is asking: dashboard sessions (Flask-Login), API tokens, roles, CSRF and the login
rate limit. The server refuses what a role may not do, whatever the page showed."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from flask_limiter.util import get_remote_address
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_wtf.csrf import CSRFProtect
from werkzeug.wrappers import Response as BaseResponse

from controlplane import services
from controlplane.config import Settings
from controlplane.errors import ControlPlaneError
from web.auth import Unauthorized, bearer_token, control_plane

F = TypeVar("F", bound=Callable[..., Any])
login = Blueprint("login", __name__)
csrf = CSRFProtect()
limiter = Limiter(get_remote_address, storage_uri="memory://", default_limits=[])
login_manager = LoginManager()
BAD_LOGIN = "Wrong user name or password, or too many attempts: wait a minute and try again."
# Per worker process (in memory): with N gunicorn workers an address gets up to N times these.
LOGIN_LIMITS = "5 per minute"  # per address and user name
ADDRESS_LIMITS = "30 per minute"  # per address, whatever the names tried


class Forbidden(ControlPlaneError):
    status = 403


class SessionUser(UserMixin):  # type: ignore[misc]
    def __init__(self, principal: services.Principal) -> None:
        self.principal = principal

    def get_id(self) -> str:
        return self.principal.name


def secret_key(settings: Settings) -> str:
    """Stable across the web workers and restarts: the configured key, else one derived from
    the generated tokens; a random one only when none is set (a single test process)."""
    if settings.secret_key:
        return settings.secret_key
    seed = "\0".join((settings.api_token, settings.webhook_token, settings.admin_password))
    if seed.strip("\0"):
        return hmac.new(seed.encode(), b"shopguard dashboard session", hashlib.sha256).hexdigest()
    return os.urandom(32).hex()


def setup(app: Flask, cp: services.ControlPlane) -> None:
    app.config.update(
        SECRET_KEY=secret_key(cp.settings),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Strict",
        WTF_CSRF_TIME_LIMIT=None,  # valid for the session: a wall display stays open for days
        WTF_CSRF_CHECK_DEFAULT=False,  # checked in `check_csrf`: bearer-token calls need none
    )
    csrf.init_app(app)
    limiter.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "login.form"
    login_manager.login_message = ""
    if cp.settings.admin_password:
        services.accounts.ensure_user(
            cp.factory, "admin", services.Role.ADMIN, cp.settings.admin_password, cp.clock()
        )

    @app.before_request
    def check_csrf() -> None:
        # Every mutating browser request: a session cookie is sent by the browser on its own.
        # The API checks its own (web/api.py): its token callers send no cookie.
        if request.method not in ("GET", "HEAD", "OPTIONS") and not request.path.startswith(
            "/api/"
        ):
            csrf.protect()

    @app.context_processor
    def roles() -> dict[str, Any]:
        return {"me": principal(), "can": lambda role: may(services.Role(role))}


@login_manager.user_loader  # type: ignore[untyped-decorator]
def load_user(name: str) -> SessionUser | None:
    """The session's user, unless it was disabled or this session ended (logged out, a new
    password) since the session began: a session is a cookie, the server keeps the cut-off."""
    try:
        began = datetime.fromisoformat(str(session.get("began", "")))
    except ValueError:
        return None
    found = services.accounts.load_user(control_plane().factory, name, began)
    return SessionUser(found) if found else None


def principal() -> services.Principal | None:
    """The token's, for a request with a bearer token; else the session's user; else None."""
    if "principal" in g:
        found: services.Principal | None = g.principal
        return found
    token = bearer_token()
    if token is not None:
        cp = control_plane()
        found = services.accounts.authenticate_token(cp.factory, token, cp.settings.api_token)
    elif current_user.is_authenticated:
        found = current_user.principal
    else:
        found = None
    g.principal = found
    return found


def may(role: services.Role) -> bool:
    who = principal()
    return who is not None and who.may(role)


def require(role: services.Role) -> services.Principal:
    """The caller, if its role suffices: else 401 (nobody) or 403 (too little)."""
    who = principal()
    if who is None:
        raise Unauthorized("log in, or send a valid API bearer token (Authorization: Bearer …)")
    if not who.may(role):
        raise Forbidden(f"{who.actor} has the role {who.role}: this needs {role}")
    return who


def requires(role: services.Role) -> Callable[[F], F]:
    def decorate(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            require(role)
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorate


def _safe_next(target: str | None) -> str:
    """A path on this server, else the overview. Browsers read `//host`, `/\\host` and
    `////host` as another host, and a control character cannot go into a Location header."""
    target = target or ""
    parts = urlsplit(target)
    if (
        target.startswith("/")
        and not target.startswith(("//", "/\\"))
        and not parts.scheme
        and not parts.netloc
        and target.isprintable()
        and target.isascii()
        and len(target) <= 1000
    ):
        return target
    return url_for("dashboard.overview")


def _login_key() -> str:
    return f"{get_remote_address()}|{request.form.get('username', '')[:100]}"


@login.get("/")
def home() -> BaseResponse:
    return redirect(url_for("dashboard.overview"))


@login.get("/login")
def form() -> str:
    return render_template("login.html", error=None, next=request.args.get("next", ""))


@login.post("/login")
@limiter.limit(ADDRESS_LIMITS, key_func=get_remote_address, methods=["POST"])
@limiter.limit(LOGIN_LIMITS, key_func=_login_key, methods=["POST"])
def submit() -> BaseResponse | tuple[str, int]:
    name = request.form.get("username", "")[:100]
    password = request.form.get("password", "")[:1000]
    then = request.form.get("next", "")[:1000]
    cp = control_plane()
    found = services.accounts.authenticate_user(cp.factory, name, password)
    if found is None:
        return render_template("login.html", error=BAD_LOGIN, next=then), 401
    session.clear()  # a new session: nothing (a CSRF token) carried over from before the login
    session["began"] = cp.clock().isoformat()
    login_user(SessionUser(found))
    return redirect(_safe_next(then))


@login.post("/logout")
def logout() -> BaseResponse:
    """Ends the user's sessions everywhere: a copy of the cookie is void from now on."""
    who = principal()
    if who is not None and who.kind == "user":
        cp = control_plane()
        services.accounts.end_sessions(cp.factory, who.name, cp.clock())
    logout_user()
    session.clear()
    return redirect(url_for("login.form"))


def rate_limited(exc: RateLimitExceeded) -> Response | tuple[str, int]:
    """A locked-out login reads exactly as a wrong one, and takes as long (a password hash is
    checked all the same)."""
    if request.endpoint == "login.submit":
        services.accounts.authenticate_user(
            control_plane().factory, "", request.form.get("password", "")[:1000]
        )
        return render_template("login.html", error=BAD_LOGIN, next=""), 401
    return Response('{"error": "too many requests"}', 429, mimetype="application/json")


def current_app_limiter_reset() -> None:
    """For tests: forget every count."""
    with current_app.app_context():
        limiter.reset()
