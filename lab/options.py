"""Options the `controlplane` commands share."""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_DATA_DIR = Path(".lab")
DEFAULT_BASE_PORT = 25400

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="where the stack keeps its data, logs and stack.json",
)
base_port_option = click.option(
    "--base-port",
    type=int,
    default=DEFAULT_BASE_PORT,
    show_default=True,
    help="first of the 20 loopback ports the stack uses",
)
