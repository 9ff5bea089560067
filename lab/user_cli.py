"""`controlplane user add NAME --role R`: a dashboard login in the control plane's state store
(the password is prompted for, never an argument)."""

from __future__ import annotations

from pathlib import Path

import click

from controlplane import accounts, store
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.errors import ControlPlaneError
from controlplane.models import Role


@click.group()
def user() -> None:
    """Dashboard users."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice([r.value for r in Role]), default="viewer",
              show_default=True)  # fmt: skip
@click.option(
    "--targets",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="the control plane's targets file (its state store); or CP_TARGETS_FILE",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="a lab stack's directory: its control plane's targets file",
)
@click.password_option(prompt="Password", confirmation_prompt=True)
def add(name: str, role: str, targets: Path | None, data_dir: Path | None, password: str) -> None:
    """Add a user NAME with role R (viewer, operator or admin); prompts for its password."""
    if targets is None and data_dir is not None:
        targets = data_dir / "controlplane" / "targets.toml"
    try:
        settings = Settings.load(targets_file=targets)
        db = store.make_engine(settings.database_url)
        store.migrate(db)
        accounts.add_user(store.session_factory(db), name, role, password, utcnow())
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"user {name} ({role}) added")
