"""`controlplane serve`: the control plane alone (web, API, probes, loop), under gunicorn.

It lives in web/ because it serves the web app: controlplane/ never imports web/."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from gunicorn.app.base import BaseApplication

from controlplane.config import Settings
from controlplane.errors import ConfigError

logger = logging.getLogger(__name__)


class Server(BaseApplication):  # type: ignore[misc]
    """One worker, many threads: the control plane owns a scheduler and a loop, which must
    not be forked into copies. The app (and the control plane) is built in that worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        self.cfg.set("bind", f"{self.settings.listen_host}:{self.settings.listen_port}")
        self.cfg.set("workers", 1)
        self.cfg.set("worker_class", "gthread")
        self.cfg.set("threads", 16)
        self.cfg.set("graceful_timeout", 10)
        self.cfg.set("timeout", 60)

    def load(self) -> Any:
        from web import create_app

        return create_app(self.settings)


@click.command()
@click.option(
    "--targets",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="TOML targets file (services, probes, policies); or CP_TARGETS_FILE",
)
@click.option("--port", type=int, help="listen port (or CP_LISTEN_PORT)")
def serve(targets: Path | None, port: int | None) -> None:
    """Run the control plane: probes, incidents, remediations, API and webhook intake."""
    overrides: dict[str, Any] = {"listen_port": port} if port else {}
    try:
        settings = Settings.load(targets_file=targets, **overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per job run is noise
    logger.info("serving on %s:%d", settings.listen_host, settings.listen_port)
    Server(settings).run()
