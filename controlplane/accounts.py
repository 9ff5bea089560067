"""Dashboard users (password hashes) and named API tokens (hashes, shown once): who is asking,
and with which role."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.security import check_password_hash, generate_password_hash

from controlplane import store
from controlplane.errors import Conflict, InvalidRequest, NotFound
from controlplane.models import ApiToken, Role, User

ROLE_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
# Checked even for an unknown name, so that a wrong name and a wrong password take as long.
_DUMMY_HASH = generate_password_hash("not-a-password", method="scrypt")
GENERATED_TOKEN_NAME = "generated"  # CP_API_TOKEN, the lab's token: an admin's
MIN_PASSWORD = 8
# A user's or a token's name is what the audit log shows: plain lowercase ASCII, so that no
# name looks like another (`Admin`, a homoglyph) or like a system actor (`token:generated`,
# `policy:x`, `cli`, `config`, the control plane's `cp-…` instance id).
NAME = re.compile(r"[a-z][a-z0-9._-]{0,63}")
RESERVED_NAMES = frozenset({"cli", "config", "controlplane", "system", GENERATED_TOKEN_NAME})


def check_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name) or name in RESERVED_NAMES or name.startswith("cp-"):
        raise InvalidRequest(
            f"a {what} name is 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter "
            f"(not {', '.join(sorted(RESERVED_NAMES))} or cp-…)"
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a user or an API token, by name, with a role. `actor` is what the audit
    log records."""

    name: str
    role: Role
    kind: str  # "user" | "token"

    @property
    def actor(self) -> str:
        return self.name if self.kind == "user" else f"token:{self.name}"

    def may(self, role: Role) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def _user(s: Session, name: str) -> User | None:
    return s.scalars(select(User).where(User.name == name)).first()


def _existing_user(s: Session, name: str) -> User:
    user = _user(s, name)
    if user is None:
        raise NotFound(f"no user {name[:100]!r}")
    return user


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidRequest(f"role must be one of {', '.join(r.value for r in Role)}") from None


def add_user(
    factory: sessionmaker[Session],
    name: str,
    role: str,
    password: str,
    now: datetime,
    who: str = "cli",
) -> None:
    """A new user, audited with who added it (an admin on the dashboard; `cli` for the
    command line on the host, `config` for the lab's admin from the settings)."""
    check_name(name, "user")
    if len(password) < MIN_PASSWORD:
        raise InvalidRequest(f"a password has at least {MIN_PASSWORD} characters")
    hashed = generate_password_hash(password, method="scrypt")
    try:
        with store.transaction(factory) as s:
            s.add(
                User(
                    name=name,
                    role=parse_role(role),
                    password_hash=hashed,
                    created_at=now,
                    disabled=False,
                )
            )
            store.audit(
                s,
                actor=who,
                verb="user-add",
                at=now,
                message=f"user {name} ({parse_role(role)})",
                data={"user": name, "role": parse_role(role)},
            )
    except IntegrityError:
        raise Conflict(f"user {name!r} exists") from None


def ensure_user(
    factory: sessionmaker[Session], name: str, role: str, password: str, now: datetime
) -> None:
    """The user with this password and role, created or updated (the lab's admin)."""
    with store.transaction(factory) as s:
        user = _user(s, name)
        if user is not None:
            changed = []
            if not check_password_hash(user.password_hash, password):
                user.password_hash = generate_password_hash(password, method="scrypt")
                changed.append("password")
            if user.role != parse_role(role):
                user.role = parse_role(role)
                changed.append("role")
            if changed:
                store.audit(
                    s,
                    actor="config",
                    verb="user-update",
                    at=now,
                    message=f"user {name}: {' and '.join(changed)} set from the configuration",
                    data={"user": name, "changed": changed},
                )
            return
    with contextlib.suppress(Conflict):  # another worker created it meanwhile
        add_user(factory, name, role, password, now, who="config")


def authenticate_user(factory: sessionmaker[Session], name: str, password: str) -> Principal | None:
    if not name.isprintable():  # no such user (and a NUL is no text PostgreSQL can compare)
        check_password_hash(_DUMMY_HASH, password)
        return None
    with store.read(factory) as s:
        user = _user(s, name)
    if user is None or user.disabled:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(user.password_hash, password):
        return None
    return Principal(user.name, Role(user.role), "user")


def load_user(
    factory: sessionmaker[Session], name: str, session_began: datetime | None = None
) -> Principal | None:
    """The user of a session that began at `session_began`: None once the user is disabled
    or the session was ended (logged out, a new password) after it began."""
    if not name.isprintable():
        return None
    with store.read(factory) as s:
        user = _user(s, name)
    if user is None or user.disabled:
        return None
    cutoff = user.sessions_valid_after
    if cutoff is not None and (session_began is None or session_began <= cutoff):
        return None
    return Principal(user.name, Role(user.role), "user")


def end_sessions(factory: sessionmaker[Session], name: str, now: datetime) -> None:
    """Every session of the user that began up to now is void (log out, everywhere)."""
    with store.transaction(factory) as s:
        user = _user(s, name)
        if user is not None:
            user.sessions_valid_after = now


def set_disabled(
    factory: sessionmaker[Session], name: str, disabled: bool, who: str, now: datetime
) -> None:
    """Disable a user (its sessions end, its logins fail) or enable it again; audited."""
    if who == name and disabled:
        raise InvalidRequest("an admin cannot disable itself")
    with store.transaction(factory) as s:
        user = _existing_user(s, name)
        user.disabled = disabled
        user.sessions_valid_after = now
        verb = "user-disable" if disabled else "user-enable"
        store.audit(s, actor=who, verb=verb, at=now, message=f"user {name}", data={"user": name})


def set_password(
    factory: sessionmaker[Session], name: str, password: str, who: str, now: datetime
) -> None:
    """A new password; every session of the user ends. Audited (never the password)."""
    if len(password) < MIN_PASSWORD:
        raise InvalidRequest(f"a password has at least {MIN_PASSWORD} characters")
    with store.transaction(factory) as s:
        user = _existing_user(s, name)
        user.password_hash = generate_password_hash(password, method="scrypt")
        user.sessions_valid_after = now
        store.audit(
            s, actor=who, verb="user-password", at=now, message=f"user {name}: new password"
        )


def list_users(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    with store.read(factory) as s:
        return [
            {"name": u.name, "role": u.role, "disabled": u.disabled, "created_at": u.created_at}
            for u in s.scalars(select(User).order_by(User.name))
        ]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    factory: sessionmaker[Session], name: str, role: str, who: str, now: datetime
) -> str:
    """A new token, returned once: only its hash is kept."""
    check_name(name, "token")
    token = "sg_" + secrets.token_urlsafe(32)
    try:
        with store.transaction(factory) as s:
            s.add(
                ApiToken(
                    name=name,
                    role=parse_role(role),
                    token_sha256=_digest(token),
                    created_by=who,
                    created_at=now,
                )
            )
            store.audit(s, actor=who, verb="token-create", at=now, message=f"API token {name}")
    except IntegrityError:  # a revoked token's name too: the audit log names one token by it
        raise Conflict(f"a token named {name!r} exists or existed: choose another name") from None
    return token


def revoke_token(factory: sessionmaker[Session], name: str, who: str, now: datetime) -> None:
    if not name.isprintable():  # never a token's name (see create_token)
        raise NotFound(f"no active API token {name[:100]!r}")
    with store.transaction(factory) as s:
        token = s.scalars(
            select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
        ).first()
        if token is None:
            raise NotFound(f"no active API token {name!r}")
        token.revoked_at = now
        store.audit(s, actor=who, verb="token-revoke", at=now, message=f"API token {name}")


def list_tokens(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    with store.read(factory) as s:
        return [
            {
                "name": t.name,
                "role": t.role,
                "created_by": t.created_by,
                "created_at": t.created_at,
                "revoked_at": t.revoked_at,
            }
            for t in s.scalars(select(ApiToken).order_by(ApiToken.id))
        ]


def authenticate_token(
    factory: sessionmaker[Session], supplied: str, generated: str
) -> Principal | None:
    """The generated token (CP_API_TOKEN) or a named, unrevoked one."""
    if generated and hmac.compare_digest(supplied.encode(), generated.encode()):
        return Principal(GENERATED_TOKEN_NAME, Role.ADMIN, "token")
    with store.read(factory) as s:
        token = s.scalars(
            select(ApiToken).where(
                ApiToken.token_sha256 == _digest(supplied), ApiToken.revoked_at.is_(None)
            )
        ).first()
    return Principal(token.name, Role(token.role), "token") if token else None
