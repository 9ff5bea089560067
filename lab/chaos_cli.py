"""The `shoplab chaos`, `load` and `gameday` commands."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live

from lab.chaos import FAULTS, inject
from lab.errors import LabError
from lab.gameday import DEFAULT_FAULTS, gameday
from lab.layout import StackLayout, find_free_base_port
from lab.load import CarefulLoad, Ledger, verify_orders
from lab.observe import StackView
from lab.options import data_dir_option
from lab.stack import Stack
from lab.verdict import DEFAULT_OBJECTIVES, load_objectives, verdict_table

# A game day on a stack of its own lifts the guards against a flapping cluster (3 failovers
# per 10 minutes, 30 s apart...): back-to-back trials would measure the guards, not healing.
GAMEDAY_LIMITS = {
    name: {"cooldown_s": 1, "max_runs": 1000}
    for name in (
        "failover-primary",
        "failover-alert",
        "rejoin-standby",
        "restart-dead-shop",
        "restart-dead-redis",
        "restart-dead-prometheus",
        "restart-dead-alertmanager",
        "flush-untrue-cache",
        "resolve-in-doubt",
        "resolve-in-doubt-alert",
        "flush-shop-cache",
    )
}


def _view(data_dir: Path) -> StackView:
    try:
        return StackView.of(data_dir)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@data_dir_option
@click.argument("fault", type=click.Choice(sorted(FAULTS)))
@click.option("--duration-s", type=float, default=None, help="for hangs and stops")
def chaos(data_dir: Path, fault: str, duration_s: float | None) -> None:
    """Inject FAULT into the running lab stack in DATA_DIR (never into one the lab did not
    make); prints its exact start and end as JSON."""
    _view(data_dir)
    try:
        record = inject(fault, data_dir, duration_s=duration_s)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    json.dump(record.to_json(), sys.stdout, indent=2)
    click.echo()


@click.command()
@data_dir_option
@click.option("--clients", type=int, default=4, show_default=True)
@click.option("--duration-s", type=click.FloatRange(1, 3600), default=30, show_default=True)
def load(data_dir: Path, clients: int, duration_s: float) -> None:
    """Orders as a careful client makes them (a key each, retried on 503 and timeouts), with
    live progress; then every acknowledged order checked present exactly once, stock + sold
    = initial, no oversell, nothing left prepared."""
    view = _view(data_dir)
    with view.leader_db("inventory") as conn:
        products = [int(r[0]) for r in conn.execute("SELECT id FROM products").fetchall()]
    before = Ledger.read(view)
    running = CarefulLoad(view.shop_urls(), products, clients=clients).start()
    deadline = time.monotonic() + duration_s
    with Live(console=Console(stderr=True), refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            live.update(_progress_line(running.report(), deadline - time.monotonic()))
            time.sleep(0.25)
    running.stop()
    report = {"load": running.report()}
    report["verification"] = verify_orders(view, running.acknowledged(), before)
    json.dump(report, sys.stdout, indent=2)
    click.echo()
    if not report["verification"]["ok"]:
        raise SystemExit(1)


def _progress_line(r: dict[str, Any], left_s: float) -> str:
    return (
        f"{r['acknowledged']} acknowledged, {r['orders_per_s']}/s, p50 {r['latency_p50_ms']} ms, "
        f"p99 {r['latency_p99_ms']} ms, errors {r['errors']}, longest gap "
        f"{r['longest_gap_s']} s; {max(0, left_s):.0f} s left"
    )


@contextlib.contextmanager
def _stack(data_dir: Path | None) -> Iterator[Path]:
    """The stack in `data_dir`, or a stack of its own with the flapping guards lifted."""
    if data_dir is not None:
        yield data_dir.absolute()
        return
    own = Path(tempfile.mkdtemp(prefix="shop-gameday-", dir="/tmp"))
    own.chmod(0o711)  # the postgres OS user passes through it
    stack = Stack(
        StackLayout(own, find_free_base_port(), shop_count=2),
        products=50,
        stock=100000,
        policy_overrides=GAMEDAY_LIMITS,
    )
    click.echo(f"starting a stack of its own in {own}", err=True)
    try:
        stack.start()
        yield own
    finally:
        stack.stop()
        shutil.rmtree(own / "pg", ignore_errors=True)  # the report and logs stay


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r}: a duration such as 90s, 30m or 2h") from None


@click.command(name="gameday")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="a running lab stack (default: a stack of its own, its guards lifted)",
)
@click.option("--faults", default=",".join(DEFAULT_FAULTS), show_default=True)
@click.option("--trials", type=int, default=1, show_default=True, help="of each fault")
@click.option(
    "--objectives", type=click.Path(path_type=Path, exists=True), default=DEFAULT_OBJECTIVES
)
@click.option("--soak", default=None, help="random faults at random times for this long: 30m")
@click.option("--approve", is_flag=True, help="approve the restores data damage proposes")
@click.option(
    "--stress",
    is_flag=True,
    help="CPU hogs (stress-ng) on every core all along; the objectives' [stress] durations",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="also write here")
def gameday_command(
    data_dir: Path | None,
    faults: str,
    trials: int,
    objectives: Path,
    soak: str | None,
    approve: bool,
    stress: bool,
    out: Path | None,
) -> None:
    """Each fault TRIALS times under load, measured from outside the control plane; a
    PASS/FAIL verdict per fault against OBJECTIVES; the results as JSON."""
    kinds = [k.strip() for k in faults.split(",") if k.strip()]
    goals = load_objectives(objectives, stress=stress)
    with _stack(data_dir) as where:
        try:
            report = gameday(
                where,
                faults=kinds,
                trials=trials,
                objectives=goals,
                soak_s=_duration(soak) if soak else None,
                approve=approve,
                progress=lambda line: click.echo(line, err=True),
                stress=stress,
            )
        except (LabError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    if out is not None:
        out.write_text(json.dumps(report, indent=2, default=str))
    click.echo(verdict_table(report["verdicts"]))
    click.echo(f"\nload: {json.dumps(report['load'])}")
    click.echo(f"verification: {json.dumps(report['verification'])}")
    if report["stress"] is not None:
        hogs = report["stress"]
        click.echo(
            f"under stress: {hogs['cpu_workers']} CPU hogs, load average (1 min) "
            f"{json.dumps(hogs['load_avg_1m'])}"
        )
    if report["stopped"]:
        click.echo(f"stopped early: {report['stopped']}")
    click.echo(f"verdict: {report['verdict']} (written to {report['written_to']})")
    if data_dir is not None:  # a stack of its own is gone by now, and its dashboard with it
        url = _view(data_dir).components().get("controlplane", {}).get("url")
        if url:
            click.echo(
                f"on the dashboard: {url}/dashboard/gamedays/{Path(report['written_to']).stem}"
            )
    if report["verdict"] != "PASS":
        raise SystemExit(1)
