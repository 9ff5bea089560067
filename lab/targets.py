"""The control plane's targets for a lab stack: services, probes and policies, as TOML."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from lab import postgres as pg
from lab.layout import HOST, StackLayout
from lab.monitoring import redis_url

BACKUP_INTERVAL_S = 3600  # the lab's WAL archive and data are small: hourly base backups


def dsn(layout: StackLayout, port: int, db: str = "postgres") -> str:
    """The superuser on one node; its password from the stack's pgpass file, which the
    postgres OS user reads too (pg_rewind and pg_basebackup are given these DSNs)."""
    return pg.dsn(port, db, passfile=layout.pgpass)


def primary_dsn(layout: StackLayout, db: str) -> str:
    """Whichever node accepts writes, so that the in-doubt resolver follows a failover."""
    return pg.dsn(
        f"{layout.pg_port(0)},{layout.pg_port(1)}",
        db,
        passfile=layout.pgpass,
        host=f"{HOST},{HOST}",
        target_session_attrs="read-write",
    )


def controlplane_targets(
    layout: StackLayout,
    *,
    shop_admin_token: str,
    redis_password: str,
    policy_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    shops = [f"shop-{i}" for i in range(layout.shop_count)]
    state_db = f"sqlite:///{layout.data_dir / 'controlplane' / 'state.db'}"
    nodes = {f"pg{i}": dsn(layout, layout.pg_port(i)) for i in range(2)}
    cache_url = redis_url(layout, redis_password)
    instances = [f"http://{HOST}:{layout.shop_port(i)}" for i in range(layout.shop_count)]
    services: list[dict[str, Any]] = [
        {
            "name": name,
            "labels": {"job": "shop", "instance": f"{HOST}:{layout.shop_port(i)}"},
            "component": name,
        }
        for i, name in enumerate(shops)
    ]
    services += [
        {"name": "pg0", "labels": {"node": "pg0"}, "component": "pg0"},
        {"name": "pg1", "labels": {"node": "pg1"}, "component": "pg1"},
        {"name": "redis", "labels": {"service": "shop-cache"}, "component": "redis"},
        # The monitoring: the control plane restarts it like any other dead process (its own
        # probes heal the shop meanwhile; Prometheus and Alertmanager only add to them).
        {"name": "prometheus", "labels": {"service": "prometheus"}, "component": "prometheus"},
        {
            "name": "alertmanager",
            "labels": {"service": "alertmanager"},
            "component": "alertmanager",
        },
        {"name": "shop-db", "labels": {"service": "shop-db"}},
        # The PostgreSQL cluster as a whole: failover, rejoin and switchover act on it, one at
        # a time, and never wait behind an in-doubt resolution of shop-db.
        {"name": "shop-db-cluster", "labels": {"service": "shop-db-cluster"}},
        # Backups apart: a stale backup is no reason to doubt a failover or a restore.
        {"name": "shop-db-backups", "labels": {"service": "shop-db-backups"}},
        # The WAL archive apart too: PostgreSQL retries a failing archive by itself, and no
        # action of ours frees a disk; its incident tells a human (the notifications).
        {"name": "shop-db-archive", "labels": {"service": "shop-db-archive"}},
    ]
    probes: list[dict[str, Any]] = [
        {
            "name": f"{name}-ready",
            "kind": "http",
            "service": name,
            "interval_s": 1,
            "timeout_s": 0.9,
            "failures_to_open": 2,
            "successes_to_resolve": 2,
            "params": {"url": f"{url}/readyz", "degraded_body_contains": '"status":"degraded"'},
        }
        for name, url in zip(shops, instances, strict=True)
    ]
    probes += [
        {
            "name": "pg0-postgres",
            "kind": "postgres",
            "service": "pg0",
            "interval_s": 2,
            "timeout_s": 1.5,
            "params": {"dsn": dsn(layout, layout.pg_port(0))},
        },
        {
            "name": "pg1-postgres",
            "kind": "postgres",
            "service": "pg1",
            "interval_s": 2,
            "timeout_s": 1.5,
            "params": {"dsn": dsn(layout, layout.pg_port(1))},
        },
        {
            "name": "redis-ping",
            "kind": "redis",
            "service": "redis",
            "interval_s": 2,
            "timeout_s": 1,
            "params": {"url": cache_url},
        },
        {
            # Wrong prices (or names) served from the shared cache: a stray script or a bad
            # deploy wrote them, and the TTL alone would serve them for a minute.
            "name": "shop-cache-truth",
            "kind": "cache_truth",
            "service": "redis",
            "interval_s": 2,
            "timeout_s": 1,
            "failures_to_open": 2,
            "successes_to_resolve": 1,
            "params": {"redis_url": cache_url, "inventory_dsn": primary_dsn(layout, "inventory")},
        },
        {
            "name": "prometheus-healthy",
            "kind": "http",
            "service": "prometheus",
            "interval_s": 2,
            "timeout_s": 1,
            "failures_to_open": 2,
            "params": {"url": f"http://{HOST}:{layout.prometheus_port}/-/healthy"},
        },
        {
            # Its API is behind basic auth: a 401 from it is an Alertmanager that answers.
            "name": "alertmanager-healthy",
            "kind": "http",
            "service": "alertmanager",
            "interval_s": 2,
            "timeout_s": 1,
            "failures_to_open": 2,
            "params": {
                "url": f"http://{HOST}:{layout.alertmanager_port}/-/healthy",
                "expect_status": 401,
            },
        },
        {
            # A refused connection is definite: one result opens the incident. A primary that
            # does not answer is given grace_s first (the probe stays UP meanwhile).
            "name": "shop-db-primary",
            "kind": "pg_primary",
            "service": "shop-db-cluster",
            "interval_s": 0.5,
            "timeout_s": 0.5,
            "failures_to_open": 1,
            "successes_to_resolve": 2,
            "params": {"nodes": nodes, "grace_s": 5},
        },
        {
            "name": "shop-db-standby",
            "kind": "pg_standby",
            "service": "shop-db-cluster",
            "interval_s": 1,
            "timeout_s": 1,
            "failures_to_open": 2,
            "successes_to_resolve": 2,
            "params": {"nodes": nodes},
        },
        {
            # Redundancy over time: no synchronous standby for 2 minutes, whatever the quick
            # rejoin tried, is an incident of its own (its action rebuilds the standby).
            "name": "shop-db-redundancy",
            "kind": "pg_standby",
            "service": "shop-db-cluster",
            "interval_s": 5,
            "timeout_s": 2,
            "failures_to_open": 1,
            "successes_to_resolve": 1,
            "params": {"nodes": nodes, "missing_for_s": 120},
        },
        {
            # On the cluster: a restore of damaged data and a failover never run together.
            "name": "shop-invariants",
            "kind": "invariant",
            "service": "shop-db-cluster",
            "interval_s": 5,
            "timeout_s": 5,
            "failures_to_open": 2,
            "params": {
                "orders_dsn": primary_dsn(layout, "orders"),
                "inventory_dsn": primary_dsn(layout, "inventory"),
            },
        },
        {
            "name": "shop-in-doubt",
            "kind": "prometheus",
            "service": "shop-db",
            "interval_s": 5,
            "timeout_s": 2,
            "failures_to_open": 3,
            "params": {
                "url": f"http://{HOST}:{layout.prometheus_port}",
                "query": "max(shop_in_doubt_transactions)",
                "op": ">",
                "threshold": 0,
                "unhealthy": "degraded",
            },
        },
        {
            "name": "shop-backups",
            "kind": "backup",
            "service": "shop-db-backups",
            "interval_s": 15,
            "timeout_s": 5,
            # The first backup and its drill take a while after start-up.
            "failures_to_open": 8,
            "params": {"database_url": state_db, "max_age_s": 2 * BACKUP_INTERVAL_S + 600},
        },
        {
            # The leader's pg_stat_archiver: a failing archive_command is an incident within
            # seconds (the archiver itself only retries and logs), the failing segment in it.
            "name": "shop-db-archive",
            "kind": "pg_archive",
            "service": "shop-db-archive",
            "interval_s": 5,
            "timeout_s": 2,
            "failures_to_open": 2,
            "successes_to_resolve": 2,
            "params": {"dsn": primary_dsn(layout, "postgres")},
        },
    ]
    # A dead process is started again, at most 3 times in 10 minutes (then a human's turn).
    restart = {
        "source": "probe",
        "action": "restart",
        "mode": "auto",
        "cooldown_s": 20,
        "max_runs": 3,
        "window_s": 600,
        "max_attempts": 3,
    }
    policies = [
        {
            "name": "restart-dead-shop",
            "match": {"job": "shop"},
            **restart,
            "verify_timeout_s": 15,
            "params": {"liveness_url": "http://{instance}/healthz"},
        },
        # Redis has no persistence here: a restart costs the cache only.
        {
            "name": "restart-dead-redis",
            "match": {"probe": "redis-ping"},
            **restart,
            "verify_timeout_s": 15,
        },
        {
            "name": "restart-dead-prometheus",
            "match": {"probe": "prometheus-healthy"},
            **restart,
            "verify_timeout_s": 30,
        },
        {
            "name": "restart-dead-alertmanager",
            "match": {"probe": "alertmanager-healthy"},
            **restart,
            "verify_timeout_s": 30,
        },
        {
            # The cached catalog disagrees with the database: drop it (Redis and each shop's
            # own level); the shops read the truth again.
            "name": "flush-untrue-cache",
            "source": "probe",
            "match": {"probe": "shop-cache-truth"},
            "action": "cache_flush",
            "mode": "auto",
            "cooldown_s": 10,
            "max_runs": 5,
            "window_s": 600,
            "verify_timeout_s": 15,
            "params": {
                "redis_url": cache_url,
                "instances": instances,
                "admin_token": shop_admin_token,
            },
        },
        {
            "name": "flush-shop-cache",
            "source": "alert",
            "match": {"alertname": "ShopCatalogStale"},
            "target": "redis",
            "action": "cache_flush",
            "mode": "auto",
            "cooldown_s": 30,
            "params": {
                "redis_url": cache_url,
                "instances": instances,
                "admin_token": shop_admin_token,
            },
        },
    ]
    in_doubt = {
        "action": "in_doubt",
        "mode": "auto",
        "cooldown_s": 5,
        "max_runs": 20,
        "verify_timeout_s": 15,
        "params": {
            "orders_dsn": primary_dsn(layout, "orders"),
            "inventory_dsn": primary_dsn(layout, "inventory"),
            "min_age_s": 10,
        },
    }
    # The limits guard against ping-pong; over them a failover still runs (no writable
    # primary and a synchronous standby waiting: holding back would keep the shop down) and
    # says so. No failover within 30 s of the primary's loss tells a human.
    failover = {
        "action": "failover",
        "mode": "auto",
        "cooldown_s": 30,
        "max_runs": 3,
        "window_s": 600,
        "over_limit": "notify",
        "max_attempts": 2,
        "verify_timeout_s": 30,
        "escalate_after_s": 30,
        "params": {"nodes": nodes, "observe_timeout_s": 0.5, "precheck_budget_s": 3},
    }
    policies += [
        {
            "name": "failover-primary",
            "source": "probe",
            "match": {"probe": "shop-db-primary"},
            **failover,
        },
        {
            # The shops' errors say "no primary" after 2 s: a stall the primary probe still
            # gives its grace (a failover would cost more than the stall). The alert acts
            # only when that probe does not say UP (it could not look, or has no result).
            "name": "failover-alert",
            "source": "alert",
            "match": {"alertname": "ShopDatabaseNoPrimary"},
            "target": "shop-db-cluster",
            **failover,
            "defer_while": {"probes_up": ["shop-db-primary"]},
        },
        {
            # Retried with back-off (1, 2, 4, 8 s between attempts) until redundancy is back,
            # then escalated with the last attempt's reason.
            "name": "rejoin-standby",
            "source": "probe",
            "match": {"probe": "shop-db-standby"},
            "action": "rejoin",
            "mode": "auto",
            "cooldown_s": 10,
            "max_runs": 5,
            "window_s": 600,
            "max_attempts": 5,
            "verify_timeout_s": 30,
            "escalate_after_s": 120,
            "params": {"nodes": nodes, "observe_timeout_s": 0.5, "precheck_budget_s": 3},
        },
        {
            "name": "rebuild-standby",
            "source": "probe",
            "match": {"probe": "shop-db-redundancy"},
            "action": "rejoin",
            "mode": "auto",
            "cooldown_s": 60,
            "max_runs": 3,
            "window_s": 3600,
            "max_attempts": 3,
            "verify_timeout_s": 60,
            "params": {"nodes": nodes, "rebuild": True},
        },
        {
            # Only an operator's request (POST /api/v1/actions) reaches it, never an incident:
            # the params and limits of a switchover.
            "name": "switchover",
            "source": "operator",
            "match": {"target": "shop-db-cluster"},
            "action": "switchover",
            "mode": "auto",
            "cooldown_s": 0,
            "verify_timeout_s": 30,
            "params": {"nodes": nodes},
        },
    ]
    policies.append(
        {
            # Discards every write after the restore point: an operator approves it.
            "name": "restore-damaged-data",
            "source": "probe",
            "match": {"probe": "shop-invariants"},
            "action": "restore",
            "mode": "approval",
            "cooldown_s": 60,
            "max_runs": 2,
            "window_s": 3600,
            "max_attempts": 1,
            "verify_timeout_s": 60,
            # Never proposed in the middle of a failover, or while no node accepts writes.
            "defer_while": {
                "actions_running": ["failover", "rejoin", "switchover"],
                "probes_not_up": ["shop-db-primary"],
            },
            "params": {
                "nodes": nodes,
                "backups_dir": str(layout.backups),
                "archive_dir": str(layout.wal_archive),
                "scratch_dir": str(layout.scratch),
                "cache": {
                    "redis_url": cache_url,
                    "instances": instances,
                    "admin_token": shop_admin_token,
                },
            },
        }
    )
    policies += [
        {
            "name": "resolve-in-doubt",
            "source": "probe",
            "match": {"probe": "shop-in-doubt"},
            **in_doubt,
        },
        {
            "name": "resolve-in-doubt-alert",
            "source": "alert",
            "match": {"alertname": "ShopInDoubtTransactions"},
            "target": "shop-db",
            **in_doubt,
        },
    ]
    overrides = dict(policy_overrides or {})
    unknown = set(overrides) - {p["name"] for p in policies}
    if unknown:
        raise ValueError(f"overrides for unknown policies: {sorted(unknown)}")
    policies = [{**p, **overrides.get(str(p["name"]), {})} for p in policies]
    return {
        "controlplane": {
            "database_url": state_db,
            "listen_host": HOST,
            "listen_port": layout.controlplane_port,
            "gamedays_dir": str(layout.gamedays),
            "loop_interval_s": 0.5,
        },
        # One executor acts on every service of the lab: its processes on this host.
        "executors": {"lab": {"kind": "lab", "params": {"stack_file": str(layout.stack_file)}}},
        "services": services,
        "probes": probes,
        "policies": policies,
        # Brings its policies: scheduled-backup (also "Start a backup" on the dashboard's
        # Backups page, or POST /api/v1/actions), scheduled-drill and backup-retention.
        "backups": {
            "service": "shop-db-cluster",
            "nodes": nodes,
            "backups_dir": str(layout.backups),
            "archive_dir": str(layout.wal_archive),
            "scratch_dir": str(layout.scratch),
            "interval_s": BACKUP_INTERVAL_S,
            "drill_interval_s": 6 * 3600,
            "first_after_s": 5,
            "keep_count": 3,
            "max_age_s": 24 * 3600,
        },
    }


def write_targets(path: Path, targets: dict[str, Any]) -> None:
    """Readable by its owner only: it holds the shop's admin token and Redis's password."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)  # the control plane's directory: its state store, its targets
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        tomli_w.dump(targets, fh)
