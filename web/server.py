"""`controlplane serve`: the control plane alone, in two parts. The leader process runs the
probes, the loop and the actions; the web (API, webhook intake, health) runs in gunicorn worker
processes of their own, at a lower CPU priority, so a flood of web requests cannot starve
probing. The workers share the state store and wake the loop through a `CoreChannel`.

It lives in web/ because it serves the web app: controlplane/ never imports web/."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, cast

import click
from gunicorn.app.base import BaseApplication

from controlplane import store
from controlplane.config import Settings
from controlplane.errors import ConfigError
from controlplane.runtime import ControlPlane, CoreAddress, CoreChannel, WebControlPlane
from web.alerts import SHARED_INTAKE, SharedIntakeLimit

logger = logging.getLogger(__name__)

WEB_WORKERS = 2
WEB_THREADS = 8
WEB_NICENESS = 5  # the leader process (probes, loop, actions) goes first for the CPU
PR_SET_PDEATHSIG = 1


class Server(BaseApplication):  # type: ignore[misc]
    """The web workers. Each builds its app with a `WebControlPlane` after the fork: no
    scheduler, loop or action runs in them."""

    def __init__(self, settings: Settings, core: CoreAddress) -> None:
        self.settings = settings
        self.core = core
        # Made before the workers fork: one intake bucket per source for all of them.
        self.intake = SharedIntakeLimit(
            settings.intake_alerts_per_minute, settings.intake_alerts_burst
        )
        super().__init__()

    def load_config(self) -> None:
        self.cfg.set("bind", f"{self.settings.listen_host}:{self.settings.listen_port}")
        self.cfg.set("workers", WEB_WORKERS)
        # gthread, but a request is read whole by the worker's event loop before a thread
        # serves it: slow clients cannot hold the threads (web/worker.py).
        self.cfg.set("worker_class", "web.worker.BufferedThreadWorker")
        self.cfg.set("threads", WEB_THREADS)
        self.cfg.set("graceful_timeout", 10)
        self.cfg.set("timeout", 60)

    def load(self) -> Any:
        from web import create_app

        # A WebControlPlane has what `services` reads of a ControlPlane (duck-typed).
        web = cast(ControlPlane, WebControlPlane(self.settings, self.core))
        app = create_app(control_plane=web)
        app.config[SHARED_INTAKE] = self.intake
        return app


def _die_with_parent(parent: int) -> None:
    """The web goes when the leader process goes, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)  # gunicorn: quick shutdown
    except (OSError, AttributeError):
        logger.warning("cannot tie the web workers' life to the leader process")
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def run_split(settings: Settings) -> int:
    """Fork the web (before any thread exists), then run the control plane here until a
    signal or the web's exit. Returns the exit status."""
    db = store.make_engine(settings.database_url)
    store.migrate(db)  # once, before the workers open the store
    db.dispose()
    channel = CoreChannel()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        status = 0
        try:
            channel.close()
            _die_with_parent(parent)
            os.nice(WEB_NICENESS)
            Server(settings, channel.address).run()
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            logger.exception("the web server failed")
            status = 1
        finally:
            os._exit(status)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cp = ControlPlane(settings).start()
    channel.serve(cp)
    logger.info("control plane %s runs; web worker processes under pid %d", parent, child)
    try:
        _, status = os.waitpid(child, 0)
    finally:
        channel.close()
        cp.stop()
    if not stopping:
        logger.error("the web server exited (status %d): stopping", status)
        return 1
    return 0


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
    sys.exit(run_split(settings))
