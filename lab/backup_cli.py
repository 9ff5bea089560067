"""`controlplane backup`, `backups` and `restore --to TIME` for a lab stack's control plane.

A backup and a restore are asked of the running control plane, which runs them as guarded,
audited actions (one at a time on the cluster, a backup standing aside for a failover), and
the command follows the run's progress; `backups` reads the catalog in its state store."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import requests
from sqlalchemy.orm import Session, sessionmaker

from controlplane import store
from controlplane.backups import catalog_rows
from controlplane.config import Settings
from controlplane.errors import ConfigError
from lab.errors import LabError
from lab.options import data_dir_option
from lab.stack import read_stack_file

RESTORE_TARGET = "shop-db-cluster"


def _settings(data_dir: Path) -> Settings:
    targets = data_dir.absolute() / "controlplane" / "targets.toml"
    try:
        settings = Settings.load(environ={}, targets_file=targets)
    except ConfigError as exc:
        raise click.ClickException(f"{exc} (is a stack running in {data_dir}?)") from None
    if settings.backups is None:
        raise click.ClickException(f"{targets} configures no backups")
    return settings


def open_catalog(data_dir: Path) -> sessionmaker[Session]:
    """The stack's control plane's state store, where its backup catalog is."""
    engine = store.make_engine(_settings(data_dir).database_url)
    store.migrate(engine)
    return store.session_factory(engine)


def echo_step(message: str) -> None:
    click.echo(f"{datetime.now(UTC):%H:%M:%S} {message}")


@click.command()
@data_dir_option
@click.option("--timeout-s", type=float, default=900, show_default=True)
def backup(data_dir: Path, timeout_s: float) -> None:
    """Take a base backup of the leader now, verify it, and drill it (restore + invariants):
    the control plane's `backup` action, as the schedule runs it. Prints its label last."""
    backups = _settings(data_dir).backups
    assert backups is not None  # _settings refuses a targets file without
    body = {"action": "backup", "target": backups.service, "reason": "operator: backup command"}
    run = request_and_follow(data_dir, body, "backup", timeout_s)
    output: dict[str, Any] = next((a["data"] for a in run["audit"] if a["verb"] == "output"), {})
    if run["state"] != "succeeded" or "label" not in output:
        raise click.ClickException(f"backup {run['state']}: {run.get('output')}")
    click.echo(output["label"])


@click.command(name="backups")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="the catalog as JSON")
def list_backups(data_dir: Path, as_json: bool) -> None:
    """The backup catalog, newest first: size, checksum, and the last drill's result."""
    rows = catalog_rows(open_catalog(data_dir))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no backups")
    for row in rows:
        drill = row["drill"]
        verdict = (
            f"verified {row['verified_at']}"
            if row["verified_at"]
            else (
                "drill FAILED: " + str(drill.get("summary")) if "passed" in drill else "not drilled"
            )
        )
        click.echo(
            f"{row['label']}  {(row['size_bytes'] or 0) / 1e6:7.1f} MB  "
            f"sha256:{(row['checksum'] or '')[:12]}  {verdict}"
        )


def parse_time(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # a bare time is UTC


def _api(data_dir: Path) -> tuple[str, dict[str, str]]:
    try:
        description = read_stack_file(data_dir.absolute())
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    url = description["components"]["controlplane"]["url"]
    token = description["secrets"]["controlplane_api_token"]
    return f"{url}/api/v1", {"Authorization": f"Bearer {token}"}


@click.command()
@data_dir_option
@click.option("--to", "to", required=True, help="restore point, ISO 8601 (UTC if no offset)")
@click.option("--reason", default="operator's point-in-time restore", show_default=True)
@click.option("--timeout-s", type=float, default=900, show_default=True)
def restore(data_dir: Path, to: str, reason: str, timeout_s: float) -> None:
    """Restore the whole PostgreSQL cluster to TIME (every write after it is discarded), then
    rebuild the standby and flush the caches. Runs as the control plane's `restore` action."""
    point = parse_time(to)
    body = {
        "action": "restore",
        "target": RESTORE_TARGET,
        "reason": reason,
        "params": {"to": point.isoformat()},
    }
    run = request_and_follow(data_dir, body, f"restore to {point.isoformat()}", timeout_s)
    if run["state"] != "succeeded":
        raise click.ClickException(f"restore {run['state']}: {run.get('output')}")
    echo_step("restore verified")


def request_and_follow(
    data_dir: Path, body: dict[str, Any], what: str, timeout_s: float
) -> dict[str, Any]:
    """Ask the stack's control plane for a run (an operator's request), print its steps as
    they happen, and return it ended."""
    base, headers = _api(data_dir)
    response = requests.post(f"{base}/actions", json=body, headers=headers, timeout=10)
    if response.status_code != 202:
        raise click.ClickException(f"refused ({response.status_code}): {response.text.strip()}")
    run_id = response.json()["id"]
    echo_step(f"{what} requested: action run {run_id}")
    return follow(base, headers, run_id, timeout_s)


def follow(base: str, headers: dict[str, str], run_id: int, timeout_s: float) -> dict[str, Any]:
    """Print each audit entry of the run as it appears, until the run ends."""
    seen = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            run: dict[str, Any] = requests.get(
                f"{base}/actions/{run_id}", headers=headers, timeout=10
            ).json()
        except requests.RequestException as exc:
            echo_step(f"(control plane unreachable: {exc}; retrying)")
            time.sleep(1)
            continue
        for entry in run["audit"][seen:]:
            echo_step(f"{entry['verb']}: {entry['message']}")
        seen = len(run["audit"])
        if run["state"] in ("succeeded", "failed", "skipped", "abandoned"):
            return run
        time.sleep(0.5)
    raise click.ClickException(f"action run {run_id} still running after {timeout_s:g}s")
