"""The control plane's targets for a lab stack: its template (targets.toml.j2, plain TOML)
rendered with the stack's ports, directories and secrets."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
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
    return pg.writable_dsn(
        db, [(HOST, layout.pg_port(0)), (HOST, layout.pg_port(1))], passfile=layout.pgpass
    )


TEMPLATE = "targets.toml.j2"


def toml_value(value: Any) -> str:
    """A value as TOML writes it inline (a string, number, bool, list or table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A TOML basic string: JSON's escapes, but no surrogate pairs (TOML refuses them).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ "
            + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
            + " }"
        )
    raise TypeError(f"no TOML for {type(value).__name__}")


def render_targets(
    layout: StackLayout, *, shop_admin_token: str, redis_password: str, api_token: str = ""
) -> str:
    """The lab's targets file (lab/targets.toml.j2) with this stack's ports, directories and
    secrets: plain TOML, as an operator would write it."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lab", "."),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # TOML, not HTML: `toml` quotes every value
    )
    env.filters["toml"] = toml_value
    shops = [
        {
            "name": f"shop-{i}",
            "instance": f"{HOST}:{layout.shop_port(i)}",
            "url": f"http://{HOST}:{layout.shop_port(i)}",
        }
        for i in range(layout.shop_count)
    ]
    return env.get_template(TEMPLATE).render(
        host=HOST,
        state_db=f"sqlite:///{layout.data_dir / 'controlplane' / 'state.db'}",
        controlplane_port=layout.controlplane_port,
        gamedays_dir=str(layout.gamedays),
        stack_file=str(layout.stack_file),
        shops=shops,
        instances=[s["url"] for s in shops],
        nodes={f"pg{i}": dsn(layout, layout.pg_port(i)) for i in range(2)},
        primary={db: primary_dsn(layout, db) for db in ("orders", "inventory", "postgres")},
        cache_url=redis_url(layout, redis_password),
        admin_token=shop_admin_token,
        prometheus_url=f"http://{HOST}:{layout.prometheus_port}",
        alertmanager_url=f"http://{HOST}:{layout.alertmanager_port}",
        backups_dir=str(layout.backups),
        archive_dir=str(layout.wal_archive),
        scratch_dir=str(layout.scratch),
        backup_interval_s=BACKUP_INTERVAL_S,
        api_token=api_token,
    )


def controlplane_targets(
    layout: StackLayout,
    *,
    shop_admin_token: str,
    redis_password: str,
    policy_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The rendered targets file, read; `policy_overrides` (a test's or a game day's: a policy
    name -> keys) applied."""
    targets = tomllib.loads(
        render_targets(layout, shop_admin_token=shop_admin_token, redis_password=redis_password)
    )
    overrides = dict(policy_overrides or {})
    unknown = set(overrides) - {p["name"] for p in targets["policies"]}
    if unknown:
        raise ValueError(f"overrides for unknown policies: {sorted(unknown)}")
    targets["policies"] = [{**p, **overrides.get(p["name"], {})} for p in targets["policies"]]
    return targets


def write_targets(path: Path, targets: dict[str, Any] | str) -> None:
    """Readable by its owner only: it holds the shop's admin token and Redis's password.
    `targets` is the file's text (rendered, with its comments) or a table to write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)  # the control plane's directory: its state store, its targets
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(targets.encode() if isinstance(targets, str) else tomli_w.dumps(targets).encode())
