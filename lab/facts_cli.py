"""`controlplane facts CLUSTER`: what the control plane knows of a database cluster (commits
synchronous, leader, roles, timeline history, last primary known good), from its state
store. `--synchronous yes|no --reason TEXT` is an operator's own word on commits, for a
failover refused because they were not known synchronous: checked by hand (e.g. the old
primary's WAL against the standby's), written by compare-and-set and audited."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
from sqlalchemy.orm import Session, sessionmaker

from controlplane import facts
from controlplane.engine import utcnow
from lab.user_cli import DATA_DIR, TARGETS, in_store
from remediation.facts import FactsConflict


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
