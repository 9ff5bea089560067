"""The `controlplane` command: `up` and `down` for a lab stack (later: `serve` and more)."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

import click

from lab.errors import LabError
from lab.layout import StackLayout
from lab.stack import Stack, prepare_data_dir, read_stack_file, stop_described, wait_forever

logger = logging.getLogger("lab")

DEFAULT_DATA_DIR = Path(".lab")
DEFAULT_BASE_PORT = 25400


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log debug details")
def main(verbose: bool) -> None:
    """Self-healing control plane for a transactional shop, and the lab that runs it."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def print_urls(description: dict[str, object]) -> None:
    comps = description["components"]
    assert isinstance(comps, dict)
    click.echo(f"stack in {description['data_dir']} (described in stack.json):")
    for name, comp in comps.items():
        where = comp.get("url") or comp.get("dsn")
        click.echo(f"  {name:<13} {comp['role']:<13} {where}  pid {comp['pid']}")


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR,
              show_default=True, help="where the stack keeps its data, logs and stack.json")
@click.option("--base-port", type=int, default=DEFAULT_BASE_PORT, show_default=True,
              help="first of the 20 loopback ports the stack uses")
@click.option("--shops", type=int, default=2, show_default=True, help="shop instances")
@click.option("--products", type=int, default=1000, show_default=True, help="catalog size")
@click.option("--detach", is_flag=True, help="return once everything is ready")
def up(data_dir: Path, base_port: int, shops: int, products: int, detach: bool) -> None:
    """Start PostgreSQL primary + standby, Redis, Alertmanager, Prometheus and the shop."""
    data_dir = data_dir.absolute()
    try:
        layout = StackLayout(data_dir, base_port, shop_count=shops)
        layout.check_ports_free()
        prepare_data_dir(data_dir)
        stack = Stack(layout, products=products)
        click.echo(f"starting the stack in {data_dir} on ports {base_port}..{base_port + 19}")
        description = stack.start()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    print_urls(description)
    if detach:
        click.echo(f"detached; stop it with: controlplane down --data-dir {data_dir}")
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    click.echo("running; Ctrl-C stops everything")
    try:
        wait_forever(stack)
    except KeyboardInterrupt:
        click.echo("stopping...")
    finally:
        stack.stop()
        click.echo("stopped")


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR,
              show_default=True)
def down(data_dir: Path) -> None:
    """Stop the stack described in DATA_DIR/stack.json."""
    try:
        stopped = stop_described(data_dir.absolute())
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR,
              show_default=True)
def status(data_dir: Path) -> None:
    """Print the running stack's description (stack.json) as JSON."""
    try:
        description = read_stack_file(data_dir.absolute())
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    description.pop("secrets", None)
    json.dump(description, sys.stdout, indent=2)
    click.echo()
