"""The lab is locked as a careful operator would lock it: PostgreSQL trusts nobody (SCRAM
passwords, replication included), Redis asks for its password, Alertmanager's API for basic
auth, Prometheus has no lifecycle API, and the state, logs and secrets are their owner's only.
(That everything still heals so locked is what the rest of the suite shows.)"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import requests

from lab.layout import HOST
from lab.postgres import REPLICATION_ROLE, SHOP_ROLE, SUPERUSER, pg_os_user
from lab.stack import Stack
from probes.base import Health
from probes.registry import build_probe

NODES = ("pg0", "pg1")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def description(stack: Stack) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stack.layout.stack_file.read_text())
    return data


def without_credentials(port: int, **extra: Any) -> psycopg.Connection[Any]:
    """As any local user could try: no password, and no pgpass file to find one in."""
    return psycopg.connect(
        host=HOST,
        port=port,
        user=SUPERUSER,
        dbname="postgres",
        passfile="/nonexistent",
        connect_timeout=5,
        **extra,
    )


# -- PostgreSQL ----------------------------------------------------------------------------------
@pytest.mark.parametrize("node", NODES)
def test_postgres_refuses_the_superuser_without_a_password_on_every_node(
    stack: Stack, node: str
) -> None:
    port = stack.layout.pg_port(NODES.index(node))
    with pytest.raises(psycopg.OperationalError, match="password"):
        without_credentials(port)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        without_credentials(port, password="not-the-password")


@pytest.mark.parametrize("node", NODES)
def test_postgres_refuses_a_replication_connection_without_a_password(
    stack: Stack, node: str
) -> None:
    port = stack.layout.pg_port(NODES.index(node))
    for user in (REPLICATION_ROLE, SUPERUSER):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(
                host=HOST,
                port=port,
                user=user,
                dbname="replication",
                replication="true",
                passfile="/nonexistent",
                connect_timeout=5,
            )


@pytest.mark.parametrize("node", NODES)
def test_postgres_trusts_no_line_of_pg_hba_and_keeps_only_scram_verifiers(
    stack: Stack, node: str
) -> None:
    with stack.connect(node) as conn:
        methods = {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules")}
        encryption = conn.execute("SHOW password_encryption").fetchone()
        verifiers = dict(
            conn.execute(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                ([SUPERUSER, SHOP_ROLE, REPLICATION_ROLE],),
            ).fetchall()
        )
    assert methods == {"scram-sha-256"}
    assert encryption == ("scram-sha-256",)
    assert set(verifiers) == {SUPERUSER, SHOP_ROLE, REPLICATION_ROLE}
    assert all(str(v).startswith("SCRAM-SHA-256$") for v in verifiers.values()), verifiers


def test_every_dsn_the_lab_hands_out_authenticates_from_its_pgpass_file(stack: Stack) -> None:
    described = description(stack)
    pgpass = Path(described["secrets"]["pgpass"])
    assert described["postgres"]["passfile"] == str(pgpass)
    for node in NODES:
        dsn = described["components"][node]["dsn"]
        assert f"passfile={pgpass}" in dsn and "password" not in dsn
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (SUPERUSER,)
    targets = (stack.layout.data_dir / "controlplane" / "targets.toml").read_text()
    assert f"passfile={pgpass}" in targets and "password=" not in targets


# -- Redis ---------------------------------------------------------------------------------------
def test_redis_refuses_commands_without_its_password(stack: Stack) -> None:
    anonymous = redis.Redis(host=HOST, port=stack.layout.redis_port, socket_timeout=5)
    wrong = redis.Redis(
        host=HOST, port=stack.layout.redis_port, password="not-the-password", socket_timeout=5
    )
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.get("shop:product:1")
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
    finally:
        anonymous.close()
        wrong.close()
    client = redis.Redis.from_url(description(stack)["shop"]["redis_url"], socket_timeout=5)
    try:
        assert client.ping()
    finally:
        client.close()


def test_a_redis_probe_with_a_wrong_password_is_down_and_shows_no_password(
    stack: Stack,
) -> None:
    url = f"redis://:wrong-secret@{HOST}:{stack.layout.redis_port}/0"
    result = build_probe("redis", "cache", {"url": url}, 2).run()
    assert result.health is Health.DOWN
    assert "wrong-secret" not in json.dumps(result.details) + result.summary


# -- Alertmanager and Prometheus -----------------------------------------------------------------
def test_alertmanager_refuses_an_unauthenticated_alert_and_api_call(stack: Stack) -> None:
    url = description(stack)["components"]["alertmanager"]["url"]
    alert = [{"labels": {"alertname": "ShopDatabaseNoPrimary", "target": "pg0"}}]
    assert requests.post(f"{url}/api/v2/alerts", json=alert, timeout=10).status_code == 401
    wrong = ("prometheus", "not-the-password")
    assert (
        requests.post(f"{url}/api/v2/alerts", json=alert, auth=wrong, timeout=10).status_code == 401
    )
    assert requests.get(f"{url}/api/v2/status", timeout=10).status_code == 401
    authenticated = requests.get(f"{url}/api/v2/status", auth=stack.alertmanager_auth, timeout=10)
    assert authenticated.status_code == 200


def test_prometheus_has_no_lifecycle_api(stack: Stack) -> None:
    url = description(stack)["components"]["prometheus"]["url"]
    for path in ("/-/reload", "/-/quit"):
        refused = requests.post(f"{url}{path}", timeout=10)
        assert refused.status_code in (403, 404, 405), (path, refused.status_code)
    assert requests.get(f"{url}/-/ready", timeout=10).status_code == 200


def test_prometheus_sends_its_alerts_to_alertmanager_with_basic_auth(stack: Stack) -> None:
    url = description(stack)["components"]["prometheus"]["url"]
    active = requests.get(f"{url}/api/v1/alertmanagers", timeout=10).json()["data"]
    assert [a["url"] for a in active["activeAlertmanagers"]] == [
        f"{description(stack)['components']['alertmanager']['url']}/api/v2/alerts"
    ]
    config = (stack.layout.data_dir / "prometheus" / "prometheus.yml").read_text()
    assert "basic_auth" in config


# -- files ---------------------------------------------------------------------------------------
def test_the_state_store_logs_and_secrets_are_their_owners_only(stack: Stack) -> None:
    data = stack.layout.data_dir
    state = data / "controlplane" / "state.db"
    private = [
        stack.layout.stack_file,
        stack.layout.pgpass,
        state,
        data / "controlplane" / "targets.toml",
        data / "alertmanager" / "alertmanager.yml",
        data / "alertmanager" / "web.yml",
        data / "prometheus" / "prometheus.yml",
        data / "redis" / "redis.conf",
        stack.layout.notifications,  # what the stack told a human
    ]
    private += [p for p in (Path(f"{state}-wal"), Path(f"{state}-shm")) if p.exists()]
    logs = sorted(stack.layout.logs.iterdir())
    assert {p.name for p in logs} >= {"pg0.log", "pg1.log", "redis.log", "controlplane.log"}
    for path in private + logs:
        assert mode(path) == 0o600, (path, oct(mode(path)))
    assert mode(stack.layout.logs) == 0o700


def test_the_pgpass_file_belongs_to_the_os_user_that_runs_postgres(stack: Stack) -> None:
    user = pg_os_user()
    owner = pwd.getpwuid(stack.layout.pgpass.stat().st_uid).pw_name
    assert owner == (user or pwd.getpwuid(os.geteuid()).pw_name)


def test_data_directories_are_their_owners_only(stack: Stack) -> None:
    data = stack.layout.data_dir
    directories = [
        stack.layout.pg_root,
        stack.layout.pg_data(0),
        stack.layout.pg_data(1),
        stack.layout.wal_archive,
        stack.layout.backups,
        stack.layout.scratch,
        data / "controlplane",
        data / "redis",
        data / "prometheus",
        data / "prometheus" / "data",
        data / "alertmanager",
        data / "alertmanager" / "data",
    ]
    for path in directories:
        assert mode(path) == 0o700, (path, oct(mode(path)))
    assert mode(data) & 0o066 == 0  # passed through (by the postgres OS user), never listed


def test_no_secret_is_on_a_command_line(stack: Stack) -> None:
    described = description(stack)
    secrets = [
        v
        for k, v in described["secrets"].items()
        if k.endswith(("_password", "_token")) and isinstance(v, str)
    ]
    for name, comp in described["components"].items():
        argv = " ".join(comp["start"]["argv"])
        # Not running just now: its recorded command line is checked all the same.
        with contextlib.suppress(OSError):
            argv += Path(f"/proc/{comp['pid']}/cmdline").read_text().replace("\0", " ")
        assert not [s for s in secrets if s in argv], name
