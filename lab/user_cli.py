"""`controlplane user add NAME --role R`: a dashboard login in the control plane's state store
(the password is prompted for, never an argument); `user disable|enable NAME` and `user
password NAME` for a login that must end or whose password leaked (its sessions end)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
from sqlalchemy.orm import Session, sessionmaker

from controlplane import accounts, store
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.errors import ControlPlaneError
from controlplane.models import Role


@click.group()
def user() -> None:
    """Dashboard users."""


TARGETS = click.option(
    "--targets",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="the control plane's targets file (its state store); or CP_TARGETS_FILE",
)
DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="a lab stack's directory: its control plane's targets file",
)


def in_store(
    targets: Path | None, data_dir: Path | None, change: Callable[[sessionmaker[Session]], None]
) -> None:
    if targets is None and data_dir is not None:
        targets = data_dir / "controlplane" / "targets.toml"
    try:
        settings = Settings.load(targets_file=targets)
        db = store.make_engine(settings.database_url)
        store.migrate(db)
        change(store.session_factory(db))
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from None


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
