"""The `controlplane` command: `serve` (the control plane: its loop, probes, actions, API and
dashboard) and the product's other commands (`controlplane.cli`). A lab stack has its own
command, `shoplab` (`lab.cli`)."""

from __future__ import annotations

import logging

import click

from controlplane.cli import COMMANDS
from web.server import serve

VERBOSE = click.option("-v", "--verbose", is_flag=True, help="log debug details")


def log_to_stderr(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group()
@VERBOSE
def main(verbose: bool) -> None:
    """Self-healing control plane for a transactional shop."""
    log_to_stderr(verbose)


main.add_command(serve)
for command in COMMANDS:
    main.add_command(command)

if __name__ == "__main__":
    main()
