"""The `shoplab` command: `up`, `demo`, `down` and `status` for a lab stack (and, from
chaos_cli, `chaos`, `load` and `gameday`). The product's own commands are `controlplane`'s
(`web.cli`)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from lab.chaos_cli import chaos, gameday_command, load
from lab.errors import LabError
from lab.hosts.lab import HostsLab, ensure_hosts_supported
from lab.hosts.stack import HostsStack
from lab.layout import StackLayout
from lab.load import run_order_load
from lab.options import base_port_option, data_dir_option
from lab.stack import (
    Stack,
    ensure_not_running,
    prepare_data_dir,
    read_stack_file,
    running_components,
    running_supervisors,
    stop_described,
    wait_forever,
)
from web.cli import VERBOSE, log_to_stderr

logger = logging.getLogger("lab")


@click.group()
@VERBOSE
def main(verbose: bool) -> None:
    """The lab: a shop and its control plane on loopback, faults, load and game days."""
    log_to_stderr(verbose)


def print_urls(description: dict[str, Any]) -> None:
    click.echo(f"stack in {description['data_dir']} (described in stack.json):")
    for name, comp in description["components"].items():
        where = comp.get("url") or comp.get("dsn")
        click.echo(f"  {name:<13} {comp['role']:<13} {where}  pid {comp['pid']}")


def _start(
    data_dir: Path, base_port: int, shops: int, products: int
) -> tuple[Stack, dict[str, Any]]:
    data_dir = data_dir.absolute()
    try:
        layout = StackLayout(data_dir, base_port, shop_count=shops)
        ensure_not_running(data_dir)
        layout.check_ports_free()
        prepare_data_dir(data_dir)
        stack = Stack(layout, products=products)
        click.echo(f"starting the stack in {data_dir} on ports {base_port}..{base_port + 19}")
        description = stack.start()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    print_urls(description)
    return stack, description


def _supervise(stack: Stack, before_stop: Callable[[], None] | None = None) -> None:
    """Stay in the foreground, reporting components that die, until Ctrl-C or SIGTERM."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        wait_forever(stack)
    except KeyboardInterrupt:
        click.echo("stopping...")
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if before_stop:
            before_stop()
        stack.stop()
        click.echo("stopped")


@main.command()
@data_dir_option
@base_port_option
@click.option("--shops", type=int, default=2, show_default=True, help="shop instances")
@click.option("--products", type=int, default=1000, show_default=True, help="catalog size")
@click.option("--detach", is_flag=True, help="return once everything is ready")
@click.option(
    "--hosts",
    "on_hosts",
    is_flag=True,
    help="on network-namespace hosts (db-1, db-2, app-1, app-2, cp, mon), reached by SSH",
)
def up(
    data_dir: Path, base_port: int, shops: int, products: int, detach: bool, on_hosts: bool
) -> None:
    """Start PostgreSQL primary + standby, Redis, Alertmanager, Prometheus and the shop."""
    if on_hosts:
        _up_on_hosts(data_dir, products, detach)
        return
    stack, _ = _start(data_dir, base_port, shops, products)
    if detach:
        click.echo(f"detached; stop it with: shoplab down --data-dir {data_dir}")
        return
    click.echo("running; Ctrl-C stops everything")
    _supervise(stack)


@main.command()
@data_dir_option
@base_port_option
@click.option(
    "--load-s",
    type=click.FloatRange(1, 3600),
    default=600,
    show_default=True,
    help="how long the background order load runs",
)
def demo(data_dir: Path, base_port: int, load_s: float) -> None:
    """The stack plus a gentle background order load; Ctrl-C stops everything."""
    stack, description = _start(data_dir, base_port, shops=2, products=1000)
    shop = description["shop"]["instances"][0]
    prometheus = description["components"]["prometheus"]["url"]
    cp = description["components"]["controlplane"]["url"]
    click.echo(
        "\ntry:\n"
        f"  curl {shop}/products/1\n"
        f"  curl -X POST {shop}/orders -H 'Idempotency-Key: demo-1' "
        "-H 'Content-Type: application/json' "
        """-d '{"product_id": 1, "quantity": 1, "customer": "you", "address": "here"}'\n"""
        f"  {prometheus}/graph?g0.expr=sum(rate(shop_orders_total[1m]))%20by%20(result)\n"
        f"  {prometheus}/alerts   (kill -9 a shop's pid and watch ShopInstanceDown fire)\n"
        f"  the dashboard: {cp}/dashboard/   log in as admin / {stack.admin_password}\n"
        f"  curl -H 'Authorization: Bearer {stack.api_token}' {cp}/api/v1/health\n"
        f"  curl -H 'Authorization: Bearer {stack.api_token}' {cp}/api/v1/incidents\n"
        f"  kill -9 -{description['components']['shop-1']['pid']}   (shop-1 dies; the control "
        "plane restarts it)\n"
    )
    stop_load = threading.Event()
    load = threading.Thread(
        target=run_order_load,
        kwargs={
            "shop_urls": description["shop"]["instances"],
            "clients": 4,
            "duration_s": load_s,
            "product_ids": range(1, 1001),
            "think_s": 0.1,
            "stop": stop_load,
        },
        daemon=True,
    )
    load.start()
    click.echo(f"background load: 4 clients, ~40 orders/s, for {load_s:g}s; Ctrl-C stops all")
    _supervise(stack, before_stop=stop_load.set)


main.add_command(chaos)
main.add_command(load)
main.add_command(gameday_command)


def _up_on_hosts(data_dir: Path, products: int, detach: bool) -> None:
    """The multi-host lab (lab/hosts/stack.py): root only (it makes network namespaces)."""
    try:
        ensure_hosts_supported()
        prepare_data_dir(data_dir.absolute())
        stack = HostsStack(data_dir.absolute(), products=products)
        click.echo("starting the hosts, their sshd and units...")
        description = stack.up()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(description, indent=2))
    if detach:
        click.echo(f"detached; stop it with: shoplab down --data-dir {data_dir}")
        return
    click.echo("running; Ctrl-C stops everything")
    try:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(1)
    except (KeyboardInterrupt, SystemExit):
        click.echo("stopping...")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        left = stack.down()
        click.echo(f"stopped{'; left: ' + ', '.join(left) if left else ''}")


@main.command()
@data_dir_option
def down(data_dir: Path) -> None:
    """Stop the stack described in DATA_DIR/stack.json (or the multi-host lab described in
    DATA_DIR/hosts.json); kill whatever of it is left."""
    hosts = HostsLab.described(data_dir.absolute())
    if hosts is not None:
        left = hosts.down()
        if left:
            raise click.ClickException(f"left behind: {', '.join(left)}")
        click.echo("stopped: every host of the multi-host lab")
        return
    try:
        stopped = stop_described(data_dir.absolute())
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@main.command()
@data_dir_option
def status(data_dir: Path) -> None:
    """Print the stack's description (stack.json, without its secrets) as JSON, each component
    and supervisor with `"running"`: whether its recorded process is alive now; `"dead"` names
    those that are not."""
    try:
        description = read_stack_file(data_dir.absolute())
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    mark_running(description)
    secrets = description.pop("secrets", {})
    text = json.dumps(description, indent=2)
    # The secrets also sit in URLs and start recipes (the shop's, the control plane's).
    for key, value in secrets.items():
        if key.endswith(("_password", "_token")) and isinstance(value, str) and value:
            text = text.replace(value, "***")
    click.echo(text)


def mark_running(description: dict[str, Any]) -> None:
    """stack.json says what was started; whether each recorded process still runs is looked up
    now: `"running"` on each component and supervisor, and `"dead"`, the names of those that
    do not run."""
    alive = running_components(description)
    supervising = running_supervisors(description)
    dead = []
    for name, comp in description.get("components", {}).items():
        comp["running"] = name in alive
        if not comp["running"]:
            dead.append(name)
    for component, entry in description.get("supervisors", {}).items():
        entry["running"] = component in supervising
        if not entry["running"]:
            dead.append(f"supervisor of {component}")
    description["dead"] = dead
