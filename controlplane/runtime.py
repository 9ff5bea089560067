"""ControlPlane: everything built from one Settings (state store, probes, executor, engine,
loop, scheduler, notifier, metrics), started and stopped together.

Served, it is split in processes: the leader process runs the ControlPlane (probes, loop,
actions) and a `CoreChannel`; the web runs in worker processes, each with a `WebControlPlane`
(the state store, and the channel to wake the loop and read its status and metrics), so web
traffic never competes with probing for one interpreter."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from controlplane import store
from controlplane.backups import BACKUP_ACTIONS, request_scheduled, sync_catalog
from controlplane.config import ProbeSpec, Settings
from controlplane.engine import ActionEngine, utcnow
from controlplane.errors import ConfigError
from controlplane.executors import Executors
from controlplane.loop import Loop
from controlplane.metrics import Metrics
from controlplane.notify import Notifier
from controlplane.probe_runner import FinishedRun, ProbeRunner, Recorder, run_once
from controlplane.scheduler import LoopThread, make_scheduler
from probes.base import Health, Probe, ProbeConfigError, ProbeResult
from probes.registry import build_probe
from remediation.base import Check
from remediation.executors.base import Executor
from remediation.registry import ACTIONS

logger = logging.getLogger(__name__)

# What the web workers count of the alerts they take in (or refuse: 429), for /metrics.
ALERT_COUNTS = ("firing", "resolved", "refused")


def build_probes(settings: Settings) -> dict[str, Probe]:
    probes = {}
    for i, spec in enumerate(settings.probes):
        try:
            probes[spec.name] = build_probe(spec.kind, spec.name, spec.params, spec.timeout_s)
        except ProbeConfigError as exc:
            raise ConfigError(f"probes[{i}]: {exc}") from None
    for i, policy in enumerate(settings.policies):
        if policy.action not in ACTIONS:
            raise ConfigError(
                f"policies[{i}].action: unknown action {policy.action!r} "
                f"(known: {', '.join(sorted(ACTIONS))})"
            )
    return probes


class ControlPlane:
    def __init__(
        self,
        settings: Settings,
        *,
        executor: Executor | None = None,
        clock: Callable[[], datetime] = utcnow,
        action_backoff_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.probes = build_probes(settings)
        self.db = store.make_engine(settings.database_url)
        store.migrate(self.db)
        self.factory = store.session_factory(self.db)
        self.metrics = Metrics()
        self.notifier = Notifier(settings, self.metrics)
        self.executors = Executors(settings, only=executor)
        self.engine = ActionEngine(
            settings,
            self.factory,
            self.executors.of,
            self.health_of,
            self.notifier,
            self.metrics,
            clock=clock,
            backoff_s=action_backoff_s,
        )
        self.loop = Loop(
            settings, self.factory, self.engine, self.notifier, self.metrics, clock=clock
        )
        self.loop_thread = LoopThread(self.loop, settings.loop_interval_s)
        self.engine.on_finished = self._after_run
        self.scheduler = make_scheduler(self.metrics)
        self.last_health: dict[str, Health] = {}
        # Writes probe runs (the runner's batches and `run_probe`'s one), keeps the probe
        # metrics, wakes the loop on a changed health.
        self.recorder = Recorder(
            self.factory, self.metrics, self.loop_thread.wake, self.last_health
        )
        self.recorder.clock = self.clock
        self.started = False

    def _after_run(self, action: str) -> None:
        """A run ended: the loop looks again at once; a backup, drill or retention run
        changed the backup directory, and the catalog follows it."""
        self.loop_thread.wake()
        if action in BACKUP_ACTIONS:
            self.sync_backups()

    def sync_backups(self) -> None:
        if self.settings.backups is None:
            return
        try:
            sync_catalog(self.factory, self.settings.backups.backups_dir)
        except Exception:  # never stops a start or a worker: the next run's end tries again
            logger.exception("the backup catalog could not follow the backup directory")

    def schedule_backups(self, *actions: str) -> None:
        """The schedule's tick: runs requested, the engine does the rest. Only the control
        plane that holds the lease asks (two would ask twice)."""
        if self.settings.backups is None or not self.loop.is_leader:
            return
        if request_scheduled(self.factory, self.settings.backups, list(actions), self.clock()):
            self.wake()

    # -- probing ------------------------------------------------------------------------------
    def run_probe(self, spec: ProbeSpec) -> ProbeResult:
        """One probe run, at once, in the calling thread: look, record, and wake the loop if
        the health changed. (Scheduled runs go through `self.probe_runner`, which does the
        same for many runs at a time.)"""
        result = run_once(self.probes[spec.name])
        self.recorder.record([FinishedRun(spec, result, self.clock())])
        return result

    def health_of(self, service: str) -> Check:
        """Right now: every probe of `service` UP, and every business invariant UP."""
        specs = [p for p in self.settings.probes if p.service == service or p.kind == "invariant"]
        if not any(p.service == service for p in specs):
            return Check(False, f"no probe watches {service}")
        failing = []
        for spec in specs:
            result = self.probes[spec.name].run()
            if result.health is not Health.UP:
                failing.append(f"{spec.name}: {result.summary}")
        return Check(not failing, "; ".join(failing) or "all probes pass")

    def prune(self) -> None:
        with store.transaction(self.factory) as s:
            removed = store.prune_probe_runs(s, self.settings.probe_history_keep)
        if removed:
            logger.info("pruned %d old probe runs", removed)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> ControlPlane:
        # Every probe on its interval, on the probe runner's event loop (it starts and stops
        # with the scheduler, which keeps the other jobs).
        self.probe_runner = ProbeRunner(
            self.probes, self.recorder, clock=self.clock, lag_gauge=self.metrics.scheduler_lag
        )
        for spec in self.settings.probes:
            self.probe_runner.add(spec)
        self.probe_runner.follow(self.scheduler)
        self.scheduler.add_job(self.prune, IntervalTrigger(seconds=60), id="prune")
        b = self.settings.backups
        if b is not None:
            self.sync_backups()
            self.scheduler.add_job(
                self.schedule_backups,
                IntervalTrigger(seconds=b.interval_s),
                args=("backup", "prune-backups"),  # retention after the backup, in turn
                id="backup",
                name="base backup and drill, then retention",
                next_run_time=self.clock() + timedelta(seconds=b.first_after_s),
                misfire_grace_time=None,
            )
            self.scheduler.add_job(
                self.schedule_backups,
                IntervalTrigger(seconds=b.drill_interval_s),
                args=("drill",),
                id="drill",
                name="restore drill",
            )
        self.scheduler.start()
        self.loop_thread.start()
        self.started = True
        self._watch_stop = threading.Event()
        self._watchers = [self._start_watcher(spec) for spec in self.settings.probes]
        return self

    def _start_watcher(self, spec: ProbeSpec) -> threading.Thread | None:
        """A daemon thread for a probe that watches its target between runs (e.g. a held
        connection to the primary): an event runs the probe at once (`probe_now`)."""
        probe = self.probes[spec.name]
        if type(probe).watch is Probe.watch:
            return None

        def watch() -> None:
            try:
                probe.watch(lambda: self.probe_now(spec.name), self._watch_stop)
            except Exception:  # the watcher's catch-all: the probe's runs go on without it
                logger.exception("watcher of probe %s crashed", spec.name)

        thread = threading.Thread(target=watch, name=f"watch {spec.name}", daemon=True)
        thread.start()
        return thread

    def wake(self) -> None:
        self.loop_thread.wake()

    def probe_now(self, name: str) -> None:
        """Run probe `name` at once rather than at its next tick (an event such as a dropped
        connection says its answer has changed). Thread-safe. A run in flight is not doubled:
        one more run follows right after it (its answer may predate the event)."""
        if self.started and name in self.probes:
            self.probe_runner.run_now(name)

    def stop(self) -> None:
        if self.started:
            self._watch_stop.set()  # first: no watcher asks a stopping scheduler for a run
            for thread in self._watchers:
                if thread is not None:
                    thread.join(timeout=1)
            self.scheduler.shutdown(wait=False)
            self.loop_thread.stop()
        self.engine.shutdown()
        self.notifier.shutdown()
        self.db.dispose()
        self.started = False

    def wait_for(self, check: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.05)
        return False


# -- the leader process and the web worker processes ---------------------------------------------
LOOPBACK = "127.0.0.1"
STATUS_TTL_S = 0.25  # a web worker asks the leader process for its loop's status at most this often


@dataclass(frozen=True, slots=True)
class CoreAddress:
    """Where a web worker reaches the leader process: UDP to wake, HTTP for status/metrics."""

    wake_port: int
    status_url: str


def core_status(cp: ControlPlane) -> dict[str, Any]:
    last = cp.loop.last_cycle_at
    return {
        "scheduler_running": bool(cp.scheduler.running),
        "is_leader": cp.loop.is_leader,
        "last_cycle_at": last.isoformat() if last else None,
    }


class _StatusHandler(BaseHTTPRequestHandler):
    server: _StatusServer

    def do_GET(self) -> None:
        cp = self.server.control_plane
        if cp is None or self.path not in ("/status", "/metrics"):
            self.send_error(404 if cp else 503)
            return
        if self.path == "/status":
            body, kind = json.dumps(core_status(cp)).encode(), "application/json"
        else:
            body, kind = generate_latest(cp.metrics.registry), CONTENT_TYPE_LATEST
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per status request is noise


class _StatusServer(ThreadingHTTPServer):
    daemon_threads = True
    control_plane: ControlPlane | None = None


class CoreChannel:
    """The leader process's side. Its sockets are bound before the web workers are forked
    (so they know where) and served after: a UDP socket whose datagrams wake the loop (and
    carry the alerts a worker counted), and a loopback HTTP server with /status and /metrics."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((LOOPBACK, 0))
        self.http = _StatusServer((LOOPBACK, 0), _StatusHandler)
        self.address = CoreAddress(
            wake_port=self.udp.getsockname()[1],
            status_url=f"http://{LOOPBACK}:{self.http.server_port}",
        )
        self.threads: list[threading.Thread] = []

    def serve(self, cp: ControlPlane) -> None:
        self.http.control_plane = cp
        self.threads = [
            threading.Thread(target=self._receive, args=(cp,), name="wake", daemon=True),
            threading.Thread(target=self.http.serve_forever, name="core-status", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _receive(self, cp: ControlPlane) -> None:
        while True:
            try:
                data = self.udp.recv(4096)
            except OSError:
                return  # closed: stopping
            try:
                counted = json.loads(data).get("alerts", {})
                for status, count in counted.items():
                    if status in ALERT_COUNTS and isinstance(count, int) and count > 0:
                        cp.metrics.alerts_received.labels(status).inc(count)
            except (ValueError, AttributeError):
                pass  # any datagram still wakes the loop: waking is harmless
            cp.wake()

    def close(self) -> None:
        """Without serving (in a forked child), or after."""
        if self.threads:
            self.http.shutdown()
        self.http.server_close()
        self.udp.close()


class _CoreRegistry(CollectorRegistry):
    """The leader process's metrics, read over its status channel: what a worker's /metrics
    serves."""

    def __init__(self, status_url: str) -> None:
        super().__init__()
        self.status_url = status_url

    def collect(self) -> Iterator[Metric]:
        with urllib.request.urlopen(f"{self.status_url}/metrics", timeout=2) as response:
            text = response.read().decode()
        yield from text_string_to_metric_families(text)


class _SchedulerView:
    def __init__(self, web: WebControlPlane) -> None:
        self.web = web

    @property
    def running(self) -> bool:
        return bool(self.web.core_status().get("scheduler_running"))


class _LoopView:
    def __init__(self, web: WebControlPlane) -> None:
        self.web = web

    @property
    def is_leader(self) -> bool:
        return bool(self.web.core_status().get("is_leader"))

    @property
    def last_cycle_at(self) -> datetime | None:
        at = self.web.core_status().get("last_cycle_at")
        return datetime.fromisoformat(at) if at else None


def _refused(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, ConnectionRefusedError)


class WebControlPlane:
    """What a web worker process holds, in the shape `services` reads: settings, clock, the
    shared state store, and views of the leader process's scheduler, loop and metrics. It has
    no probes, loop or actions: `wake()` sends the leader a datagram."""

    def __init__(
        self, settings: Settings, core: CoreAddress, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.settings = settings
        self.core = core
        self.clock = clock
        self.db = store.make_engine(settings.database_url)
        self.factory = store.session_factory(self.db)
        self.metrics = Metrics()  # counted here, sent to the leader with each wake
        self.published = _CoreRegistry(core.status_url)
        self.metrics.registry = self.published
        self.scheduler = _SchedulerView(self)
        self.loop = _LoopView(self)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.status: tuple[float, dict[str, Any]] = (0.0, {})
        self.asking = threading.Lock()

    def core_status(self) -> dict[str, Any]:
        """The leader's loop status, cached for STATUS_TTL_S. When the leader process is slow
        to answer (its cores busy with web load, say), the last status it gave stands: its
        `last_cycle_at` ages, and readiness's own freshness bound turns it "not ready" once
        the loop has truly stopped. A late answer is not an outage. {} if it never answered."""
        at, status = self.status
        if time.monotonic() - at < STATUS_TTL_S:
            return status
        # One call at a time per worker: while one thread asks, the others take the last
        # answer (or, before there is any, wait for that call's).
        if not self.asking.acquire(blocking=not status):
            return status
        try:
            return self._ask_status(status)
        finally:
            self.asking.release()

    def _ask_status(self, status: dict[str, Any]) -> dict[str, Any]:
        try:
            url = f"{self.core.status_url}/status"
            with urllib.request.urlopen(url, timeout=1) as response:
                answer = json.loads(response.read())
            if not isinstance(answer, dict):
                raise ValueError("status is not an object")
            status = answer
        except (OSError, ValueError) as exc:
            logger.warning("the leader process does not answer: %s", exc)
            if _refused(exc):
                status = {}  # nothing listens: the leader process is gone, not slow
        self.status = (time.monotonic(), status)
        return status

    def wake(self) -> None:
        with self.lock:
            counted: dict[str, int] = {}
            for metric in self.metrics.alerts_received.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        status = sample.labels["status"]
                        delta = sample.value - self.sent.get(status, 0.0)
                        if delta > 0:
                            counted[status] = int(delta)
                            self.sent[status] = sample.value
            message = json.dumps({"alerts": counted}).encode()
        try:
            self.udp.sendto(message, (LOOPBACK, self.core.wake_port))
        except OSError as exc:  # the loop still ticks every loop_interval_s
            logger.warning("cannot wake the loop: %s", exc)

    def stop(self) -> None:
        self.udp.close()
        self.db.dispose()
