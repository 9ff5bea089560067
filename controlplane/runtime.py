"""ControlPlane: everything built from one Settings (state store, probes, executor, engine,
loop, scheduler, notifier, metrics), started and stopped together."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.triggers.interval import IntervalTrigger

from controlplane import store
from controlplane.backups import Backups
from controlplane.config import ProbeSpec, Settings
from controlplane.engine import ActionEngine, utcnow
from controlplane.errors import ConfigError
from controlplane.loop import Loop
from controlplane.metrics import Metrics
from controlplane.notify import Notifier
from controlplane.scheduler import LoopThread, make_scheduler
from probes.base import Health, Probe, ProbeConfigError, ProbeResult
from probes.registry import build_probe
from remediation.base import Check
from remediation.executors.base import Executor, ExecutorError
from remediation.executors.lab import LabExecutor
from remediation.registry import ACTIONS

logger = logging.getLogger(__name__)


class NoExecutor:
    """Used when no process table is configured: every process action fails, clearly."""

    def is_running(self, component: str) -> bool:
        return False

    def restart(self, component: str) -> int:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def components(self) -> list[str]:
        return []

    def fence(self, component: str) -> bool:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def stop(self, component: str, timeout_s: float = 30) -> None:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def run_tool(
        self,
        component: str,
        tool: str,
        args: Sequence[str],
        *,
        stdin: str | None = None,
        timeout_s: float = 300,
    ) -> str:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def data_dir(self, component: str) -> str:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def reset_data_dir(self, component: str) -> None:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def put_files(
        self,
        component: str,
        dest_dir: str,
        *,
        source_dir: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def fact(self, key: str) -> Any:
        return None

    def set_fact(self, key: str, value: Any) -> None:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")

    def set_role(self, component: str, role: str) -> None:
        raise ExecutorError("no executor configured (set CP_STACK_FILE)")


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
        if executor is None:
            executor = (
                LabExecutor(Path(settings.stack_file)) if settings.stack_file else NoExecutor()
            )
        self.executor = executor
        self.backups = (
            Backups(settings.backups, executor, self.factory, clock=clock)
            if settings.backups
            else None
        )
        self.engine = ActionEngine(
            settings,
            self.factory,
            executor,
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
        self.engine.on_finished = self.loop_thread.wake
        self.scheduler = make_scheduler(self.metrics)
        self.last_health: dict[str, Health] = {}
        self.started = False

    # -- probing ------------------------------------------------------------------------------
    def run_probe(self, spec: ProbeSpec) -> ProbeResult:
        """One scheduled probe run: look, record, and wake the loop if the health changed."""
        try:
            result = self.probes[spec.name].run()
        except Exception as exc:  # the job's catch-all: a probe bug is recorded as DOWN
            logger.exception("probe %s crashed", spec.name)
            result = ProbeResult(Health.DOWN, f"probe crashed: {type(exc).__name__}: {exc}")
        with store.transaction(self.factory) as s:
            store.record_probe_run(
                s,
                probe=spec.name,
                kind=spec.kind,
                target=spec.service,
                health=result.health,
                latency_ms=result.latency_ms,
                summary=result.summary,
                details=dict(result.details),
                at=self.clock(),
            )
        self.metrics.probe_seconds.labels(spec.name, result.health).observe(
            result.latency_ms / 1000
        )
        if result.health is not Health.UNKNOWN:
            # Could not look: the gauge keeps the last known answer, so that Prometheus does
            # not alert (ShopDataInvariantsViolated) on a database that is failing over.
            self.metrics.probe_up.labels(spec.name, spec.service).set(
                1 if result.health is Health.UP else 0
            )
        if self.last_health.get(spec.name) is not result.health:
            self.last_health[spec.name] = result.health
            self.loop_thread.wake()
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
        for spec in self.settings.probes:
            self.scheduler.add_job(
                self.run_probe,
                IntervalTrigger(seconds=spec.interval_s),
                args=[spec],
                id=f"probe:{spec.name}",
                name=f"probe {spec.name}",
                next_run_time=self.clock(),
            )
        self.scheduler.add_job(self.prune, IntervalTrigger(seconds=60), id="prune")
        if self.backups is not None:
            b = self.settings.backups
            assert b is not None
            self.scheduler.add_job(
                self.backups.scheduled_backup,
                IntervalTrigger(seconds=b.interval_s),
                id="backup",
                name="base backup, drill, retention",
                next_run_time=self.clock() + timedelta(seconds=b.first_after_s),
                misfire_grace_time=None,
            )
            self.scheduler.add_job(
                self.backups.scheduled_drill,
                IntervalTrigger(seconds=b.drill_interval_s),
                id="drill",
                name="restore drill",
            )
        self.scheduler.start()
        self.loop_thread.start()
        self.started = True
        return self

    def wake(self) -> None:
        self.loop_thread.wake()

    def stop(self) -> None:
        if self.started:
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
