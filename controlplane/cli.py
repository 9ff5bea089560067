"""The product's commands (the `controlplane` console script is `web.cli`, which adds `serve`):
`check-config`, `user`, `facts`, `backup`, `backups` and `restore`. Each reads the control
plane's targets file (`--targets FILE`, CP_TARGETS_FILE, or `--data-dir DIR` for the one a
lab stack writes in DIR/controlplane/targets.toml) and the CP_* variables, as `serve` does.

`user` and `facts` change the state store directly (compare-and-set, audited). `backup` and
`restore` ask the running control plane (its API at `listen_host:listen_port`, with its
`api_token`), which runs them as guarded, audited actions (one at a time on the cluster, a
backup standing aside for a failover), and print the run's steps as they happen; `backups`
reads the catalog in the state store."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import requests
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from controlplane import accounts, facts, store
from controlplane.backups import catalog_rows
from controlplane.check_config import check_config_command
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.errors import ControlPlaneError
from controlplane.models import Role
from remediation.facts import FactsConflict

TARGETS = click.option(
    "--targets",
    envvar="CP_TARGETS_FILE",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="the control plane's targets file; or CP_TARGETS_FILE",
)
DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="a lab stack's directory: its control plane's targets file",
)


def load_settings(targets: Path | None, data_dir: Path | None) -> Settings:
    """The control plane's settings, from its targets file: never the defaults alone (they
    would name a fresh state store in the current directory, and act on it)."""
    if targets is None and data_dir is not None:
        targets = data_dir.absolute() / "controlplane" / "targets.toml"
        if not targets.exists():
            raise click.ClickException(f"no {targets} (is a stack running in {data_dir}?)")
    if targets is None:
        raise click.ClickException("which control plane? give --targets FILE (or CP_TARGETS_FILE)")
    try:
        return Settings.load(targets_file=targets)
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from None


def why(exc: Exception) -> str:
    """A database error's first line: the driver's own message, not SQLAlchemy's wrapping."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def open_store(settings: Settings) -> sessionmaker[Session]:
    try:
        db = store.make_engine(settings.database_url)
        store.migrate(db)
    except (SQLAlchemyError, ArgumentError, OSError) as exc:
        raise click.ClickException(f"the state store cannot be opened: {why(exc)}") from None
    return store.session_factory(db)


def in_store(
    targets: Path | None, data_dir: Path | None, change: Callable[[sessionmaker[Session]], None]
) -> None:
    factory = open_store(load_settings(targets, data_dir))
    try:
        change(factory)
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from None
    except SQLAlchemyError as exc:
        raise click.ClickException(f"the state store failed: {why(exc)}") from None


# -- user ------------------------------------------------------------------------------------
@click.group()
def user() -> None:
    """Dashboard users."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice([r.value for r in Role]), default="viewer",
              show_default=True)  # fmt: skip
@TARGETS
@DATA_DIR
@click.password_option(prompt="Password", confirmation_prompt=True)
def add(name: str, role: str, targets: Path | None, data_dir: Path | None, password: str) -> None:
    """Add a user NAME with role R (viewer, operator or admin); prompts for its password."""
    in_store(targets, data_dir, lambda f: accounts.add_user(f, name, role, password, utcnow()))
    click.echo(f"user {name} ({role}) added")


def _state_command(verb: str, disabled: bool, doc: str) -> None:
    """`user disable NAME` and `user enable NAME`: one command each, the same steps."""

    @user.command(verb, help=doc)
    @click.argument("name")
    @TARGETS
    @DATA_DIR
    def command(name: str, targets: Path | None, data_dir: Path | None) -> None:
        in_store(
            targets, data_dir, lambda f: accounts.set_disabled(f, name, disabled, "cli", utcnow())
        )
        click.echo(f"user {name} {verb}d")


_state_command("disable", True, "Disable user NAME: its logins fail and its sessions end at once.")
_state_command("enable", False, "Enable user NAME again.")


@user.command("password")
@click.argument("name")
@TARGETS
@DATA_DIR
@click.password_option(prompt="New password", confirmation_prompt=True)
def password(name: str, targets: Path | None, data_dir: Path | None, password: str) -> None:
    """Set user NAME's password (prompted for); its sessions end."""
    in_store(targets, data_dir, lambda f: accounts.set_password(f, name, password, "cli", utcnow()))
    click.echo(f"user {name}: password set, sessions ended")


# -- facts -----------------------------------------------------------------------------------
@click.command("facts")
@click.argument("cluster")
@click.option("--synchronous", type=click.Choice(["yes", "no"]), default=None,
              help="record that every acknowledged commit is (yes) or may not be (no) on a "
              "standby: an operator's word, with --reason")  # fmt: skip
@click.option("--reason", default="", help="why (audited with the change)")
@TARGETS
@DATA_DIR
def facts_command(
    cluster: str,
    synchronous: str | None,
    reason: str,
    targets: Path | None,
    data_dir: Path | None,
) -> None:
    """The cluster facts of CLUSTER (the failover policies' target), as JSON."""
    if synchronous is not None and not reason.strip():
        raise click.UsageError("--synchronous needs --reason: what was checked, by whom")

    def show(factory: sessionmaker[Session]) -> None:
        if synchronous is not None:
            keeper = facts.StoreFacts(
                factory, cluster, by=f"operator (cli): {reason.strip()}"[:200], clock=utcnow
            )
            try:
                keeper.change(keeper.read(), synchronous=synchronous == "yes")
            except FactsConflict:
                raise click.ClickException("the facts changed meanwhile: look again") from None
        found = facts.read(factory, cluster)
        click.echo(json.dumps(dataclasses.asdict(found), indent=2, default=str))

    in_store(targets, data_dir, show)


# -- backups and restore ---------------------------------------------------------------------
def open_catalog(targets: Path | None, data_dir: Path | None) -> sessionmaker[Session]:
    """The control plane's state store, where its backup catalog is."""
    return open_store(load_settings(targets, data_dir))


def the_cluster(settings: Settings) -> str:
    if settings.backups is None:
        raise click.ClickException("the targets file configures no backups")
    return settings.backups.service


def api_of(settings: Settings) -> tuple[str, dict[str, str]]:
    """The running control plane's API, as its settings say it listens, and its token."""
    if not settings.api_token:
        raise click.ClickException(
            "no API token: set CP_API_TOKEN (or api_token in the targets file's [controlplane])"
        )
    host = settings.listen_host
    if host in ("0.0.0.0", "::"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    netloc = f"[{host}]" if ":" in host else host  # an IPv6 literal
    base = f"http://{netloc}:{settings.listen_port}/api/v1"
    return base, {"Authorization": f"Bearer {settings.api_token}"}


def echo_step(message: str) -> None:
    click.echo(f"{datetime.now(UTC):%H:%M:%S} {message}")


@click.command()
@TARGETS
@DATA_DIR
@click.option("--timeout-s", type=float, default=900, show_default=True)
def backup(targets: Path | None, data_dir: Path | None, timeout_s: float) -> None:
    """Take a base backup of the leader now, verify it, and drill it (restore + invariants):
    the control plane's `backup` action, as the schedule runs it. Prints its label last."""
    settings = load_settings(targets, data_dir)
    body = {"action": "backup", "target": the_cluster(settings), "reason": "operator: cli"}
    run = request_and_follow(settings, body, "backup", timeout_s)
    output: dict[str, Any] = next((a["data"] for a in run["audit"] if a["verb"] == "output"), {})
    if run["state"] != "succeeded" or "label" not in output:
        raise click.ClickException(f"backup {run['state']}: {run.get('output')}")
    click.echo(output["label"])


@click.command(name="backups")
@TARGETS
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="the catalog as JSON")
def list_backups(targets: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """The backup catalog, newest first: size, checksum, and the last drill's result."""
    rows = catalog_rows(open_catalog(targets, data_dir))
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


@click.command()
@TARGETS
@DATA_DIR
@click.option("--to", "to", required=True, help="restore point, ISO 8601 (UTC if no offset)")
@click.option("--reason", default="operator's point-in-time restore", show_default=True)
@click.option("--timeout-s", type=float, default=900, show_default=True)
def restore(
    targets: Path | None, data_dir: Path | None, to: str, reason: str, timeout_s: float
) -> None:
    """Restore the whole PostgreSQL cluster to TIME (every write after it is discarded), then
    rebuild the standby and flush the caches. Runs as the control plane's `restore` action."""
    point = parse_time(to)
    settings = load_settings(targets, data_dir)
    body = {
        "action": "restore",
        "target": the_cluster(settings),
        "reason": reason,
        "params": {"to": point.isoformat()},
    }
    run = request_and_follow(settings, body, f"restore to {point.isoformat()}", timeout_s)
    if run["state"] != "succeeded":
        raise click.ClickException(f"restore {run['state']}: {run.get('output')}")
    echo_step("restore verified")


def request_and_follow(
    settings: Settings, body: dict[str, Any], what: str, timeout_s: float
) -> dict[str, Any]:
    """Ask the running control plane for a run (an operator's request), print its steps as
    they happen, and return it ended."""
    base, headers = api_of(settings)
    try:
        response = requests.post(f"{base}/actions", json=body, headers=headers, timeout=10)
    except requests.RequestException as exc:
        raise click.ClickException(f"no control plane answers at {base}: {exc}") from None
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
            response = requests.get(f"{base}/actions/{run_id}", headers=headers, timeout=10)
            run: dict[str, Any] = response.json()
        except (requests.RequestException, ValueError) as exc:
            echo_step(f"(control plane unreachable: {exc}; retrying)")
            time.sleep(1)
            continue
        if response.status_code != 200 or not isinstance(run.get("audit"), list):
            said = run.get("error") if isinstance(run, dict) else None
            echo_step(f"(control plane answered {response.status_code}: {said}; retrying)")
            time.sleep(1)
            continue
        for entry in run["audit"][seen:]:
            echo_step(f"{entry['verb']}: {entry['message']}")
        seen = len(run["audit"])
        if run["state"] in ("succeeded", "failed", "skipped", "abandoned"):
            return run
        time.sleep(0.5)
    raise click.ClickException(f"action run {run_id} still running after {timeout_s:g}s")


COMMANDS = (check_config_command, user, facts_command, backup, list_backups, restore)
