"""The probe runner: every probe on its interval, on one asyncio event loop in one thread.

A probe kind with `check_async` (http, tcp) runs on the event loop itself: a thousand I/O-bound
probes in flight cost a socket each, not a thread each. Any other kind runs in a small thread
pool, as before. A probe is due every `interval_s` on a fixed grid (no drift); while a run of
it is in flight, its next tick is skipped, so runs of one probe never overlap. First runs are
spread `START_STEP_S` apart (modulo the interval), so a thousand probes do not all fire in the
same millisecond every interval.

Results go to a `Recorder` in batches: one write transaction for all the runs that finished in
the last `FLUSH_S`, at once when a probe's health changed (the loop is woken only after the run
is written, so its snapshot sees it). The recorder also keeps the probe metrics.

The runner starts and stops with the APScheduler scheduler it follows (the prune, backup and
drill jobs stay there)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.events import EVENT_SCHEDULER_SHUTDOWN, EVENT_SCHEDULER_STARTED, SchedulerEvent
from prometheus_client import Gauge
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from controlplane import facts, store
from controlplane.config import ProbeSpec
from controlplane.metrics import Metrics
from probes.base import Health, Probe, ProbeResult

logger = logging.getLogger(__name__)

START_STEP_S = 0.005  # between two probes' first runs: at most 200 first runs a second
FLUSH_S = 0.05  # a finished run waits at most this long to be written (a change: not at all)
BATCH_MAX = 2000  # runs per write transaction, at most
THREAD_WORKERS = 16  # for the kinds without `check_async` (postgres, redis, ...)
OUTER_GRACE_S = 1.0  # beyond its own timeout, a probe's run is given up on
WRITE_DEADLINE_S = 10.0  # retrying a batch on "database is locked"; then it is dropped, logged
LAG_SAMPLES = 100_000  # kept for `take_lags` (the benchmark), newest


class AsyncCheck(Protocol):
    def check_async(self) -> Coroutine[Any, Any, ProbeResult]: ...


@dataclass(frozen=True, slots=True)
class FinishedRun:
    spec: ProbeSpec
    result: ProbeResult
    at: datetime


def run_once(probe: Probe) -> ProbeResult:
    """One blocking run; a probe bug is reported as DOWN rather than raised."""
    try:
        return probe.run()
    except Exception as exc:  # the job's catch-all: a probe bug is recorded as DOWN
        logger.exception("probe %s crashed", probe.name)
        return crashed(exc)


def crashed(exc: BaseException) -> ProbeResult:
    return ProbeResult(Health.DOWN, f"probe crashed: {type(exc).__name__}: {exc}")


def gave_up(spec: ProbeSpec, probe: Probe, how: str, latency_ms: float = 0.0) -> ProbeResult:
    """A run past its timeout: what the probe itself says of it (`Probe.overran`). DOWN for
    most kinds; UNKNOWN for one that judges data through another service (the invariants
    behind a hung node: that is no damage, and no reason to propose a restore); within its
    grace for the primary probe (a busy machine is no reason to fail over sooner)."""
    said = probe.overran(f"no answer within {spec.timeout_s:g} s ({how})")
    return ProbeResult(said.health, said.summary, latency_ms, said.details)


class Recorder:
    """Writes finished runs in one transaction; then the probe metrics, and wakes the loop if
    a probe's health changed. `last_health` is the control plane's (shared with `run_probe`)."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        metrics: Metrics,
        wake: Callable[[], None],
        last_health: dict[str, Health],
    ) -> None:
        self.factory = factory
        self.metrics = metrics
        self.wake = wake
        self.last_health = last_health
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def _learn_facts(self, run: FinishedRun) -> None:
        """A run that looked at a cluster's leader (its details' `facts`: pg_primary) tells
        the cluster facts whether its commits wait for a standby (controlplane/facts.py
        `observe`: only from a look no action could have raced)."""
        seen = run.result.details.get("facts")
        if run.result.health is not Health.UP or not isinstance(seen, dict):
            return
        leader, synchronous = seen.get("leader"), seen.get("synchronous")
        if not isinstance(leader, str) or not isinstance(synchronous, bool):
            return  # None: commits wait for a standby not there: nothing new
        try:
            facts.observe(
                self.factory,
                run.spec.service,
                looked_from=run.at - timedelta(milliseconds=run.result.latency_ms),
                leader=leader,
                synchronous=synchronous,
                by=f"probe {run.spec.name}",
                now=self.clock(),
            )
        except OperationalError as exc:  # the next look tells it again
            logger.warning("cluster facts of %s not recorded: %s", run.spec.service, exc)

    def record(self, runs: Sequence[FinishedRun]) -> None:
        if not runs:
            return
        rows = [
            {
                "probe": r.spec.name,
                "kind": r.spec.kind,
                "target": r.spec.service,
                "health": r.result.health,
                "latency_ms": r.result.latency_ms,
                "summary": r.result.summary,
                "details": r.result.details,
                "at": r.at,
            }
            for r in runs
        ]

        def write() -> None:
            with store.transaction(self.factory) as s:
                store.record_probe_runs(s, rows)

        store.with_retries(write, what="record probe runs", deadline_s=WRITE_DEADLINE_S)
        changed = False
        for r in runs:
            spec, result = r.spec, r.result
            self.metrics.probe_seconds.labels(spec.name, result.health).observe(
                result.latency_ms / 1000
            )
            if result.health is not Health.UNKNOWN:
                # Could not look: the gauge keeps the last known answer, so that Prometheus
                # does not alert (ShopDataInvariantsViolated) on a database that fails over.
                self.metrics.probe_up.labels(spec.name, spec.service).set(
                    1 if result.health is Health.UP else 0
                )
            if self.last_health.get(spec.name) is not result.health:
                self.last_health[spec.name] = result.health
                changed = True
            self._learn_facts(r)
        if changed:
            self.wake()


@dataclass(slots=True)
class _Slot:
    """One probe's place in the runner (touched by the event loop thread only)."""

    spec: ProbeSpec
    probe: Probe
    is_async: bool
    running: bool = False
    again: bool = False  # `run_now` while a run was in flight: once more, right after it
    timer: asyncio.TimerHandle | None = None


class ProbeRunner:
    def __init__(
        self,
        probes: Mapping[str, Probe],
        recorder: Recorder,
        *,
        clock: Callable[[], datetime],
        lag_gauge: Gauge | None = None,
        thread_workers: int = THREAD_WORKERS,
    ) -> None:
        self.probes = probes
        self.recorder = recorder
        self.clock = clock
        self.lag_gauge = lag_gauge
        self.specs: list[ProbeSpec] = []
        self.slots: dict[str, _Slot] = {}
        self.tasks: set[asyncio.Future[None]] = set()
        self.pool = concurrent.futures.ThreadPoolExecutor(thread_workers, "probe")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._serve, name="probe-runner", daemon=True)
        self.writer = threading.Thread(target=self._write, name="probe-writer", daemon=True)
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.pending: list[FinishedRun] = []
        self.pending_changed = False
        self.queued_health: dict[str, Health] = {}
        self.has_pending = threading.Condition()
        self.lags_s: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)
        self.runs = 0  # started
        self.skipped = 0  # due while the previous run was still in flight

    def add(self, spec: ProbeSpec) -> None:
        """Before `start`."""
        self.specs.append(spec)

    def follow(self, scheduler: Any) -> None:
        """Start when the APScheduler `scheduler` starts; stop when it shuts down."""

        def on_event(event: SchedulerEvent) -> None:
            if event.code == EVENT_SCHEDULER_STARTED:
                self.start()
            elif event.code == EVENT_SCHEDULER_SHUTDOWN:
                self.stop()

        scheduler.add_listener(on_event, EVENT_SCHEDULER_STARTED | EVENT_SCHEDULER_SHUTDOWN)

    # -- lifecycle, from any thread -------------------------------------------------------------
    def start(self) -> None:
        if self.thread.is_alive():
            return
        self.writer.start()
        self.thread.start()
        self.ready.wait(10)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Runs in flight are cancelled (async) or left to end in their thread; what finished
        is written before this returns."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        loop = self.loop
        if loop is not None and self.thread.is_alive():
            loop.call_soon_threadsafe(self._cancel_all)
            self.thread.join(timeout_s)
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self.has_pending:
            self.has_pending.notify()
        if self.writer.is_alive():
            self.writer.join(timeout_s)

    def run_now(self, name: str) -> None:
        """Run probe `name` at once (thread-safe); its next tick comes an interval later. If a
        run of it is in flight, one more follows right after it, never beside it."""
        loop = self.loop
        if loop is not None and not self.stopping.is_set():
            loop.call_soon_threadsafe(self._run_now, name)

    def take_lags(self) -> list[float]:
        """How late each run started behind its tick (s), since the last call."""
        taken = []
        while self.lags_s:
            taken.append(self.lags_s.popleft())
        return taken

    # -- the event loop thread ------------------------------------------------------------------
    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            now = loop.time()
            for i, spec in enumerate(self.specs):
                probe = self.probes[spec.name]
                slot = _Slot(spec, probe, callable(getattr(probe, "check_async", None)))
                self.slots[spec.name] = slot
                due = now + (i * START_STEP_S) % spec.interval_s
                slot.timer = loop.call_at(due, self._tick, slot, due)
            self.ready.set()
            loop.run_forever()
            # Let the cancelled runs unwind (their sockets close).
            if self.tasks:
                loop.run_until_complete(asyncio.wait(self.tasks, timeout=1))
        finally:
            self.ready.set()
            loop.close()

    def _cancel_all(self) -> None:
        for slot in self.slots.values():
            if slot.timer is not None:
                slot.timer.cancel()
        for task in self.tasks:
            task.cancel()
        assert self.loop is not None
        self.loop.stop()

    def _tick(self, slot: _Slot, due: float) -> None:
        assert self.loop is not None
        interval_s = slot.spec.interval_s
        now = self.loop.time()
        following = due + interval_s
        if following <= now:  # this tick came late by more than an interval: skip to the grid
            following += interval_s * ((now - following) // interval_s + 1)
        slot.timer = self.loop.call_at(following, self._tick, slot, following)
        if slot.running:
            self.skipped += 1
            logger.warning("probe %s: still running at its next tick, skipped", slot.spec.name)
            return
        self._launch(slot, due)

    def _run_now(self, name: str) -> None:
        slot = self.slots.get(name)
        if slot is None or self.stopping.is_set():
            return
        if slot.running:
            slot.again = True
            return
        assert self.loop is not None
        now = self.loop.time()
        if slot.timer is not None:
            slot.timer.cancel()
        following = now + slot.spec.interval_s
        slot.timer = self.loop.call_at(following, self._tick, slot, following)
        self._launch(slot, now)

    def _launch(self, slot: _Slot, due: float) -> None:
        assert self.loop is not None
        slot.running = True
        self.runs += 1
        task = self.loop.create_task(self._run(slot, due))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, slot: _Slot, due: float) -> None:
        assert self.loop is not None
        lag_s = max(0.0, self.loop.time() - due)
        self.lags_s.append(lag_s)
        if self.lag_gauge is not None:
            self.lag_gauge.set(lag_s)
        try:
            if slot.is_async:
                result: ProbeResult | None = await self._look_async(slot)
            else:
                result = await self._look_in_thread(slot)
        except asyncio.CancelledError:
            slot.running = False
            raise
        self._finish(slot, result)

    async def _look_async(self, slot: _Slot) -> ProbeResult:
        check: AsyncCheck = slot.probe  # type: ignore[assignment]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(slot.spec.timeout_s + OUTER_GRACE_S):
                result = await check.check_async()
        except TimeoutError:
            result = gave_up(slot.spec, slot.probe, "probe gave up")
        except Exception as exc:  # the job's catch-all: a probe bug is recorded as DOWN
            logger.exception("probe %s crashed", slot.spec.name)
            result = crashed(exc)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        return ProbeResult(result.health, result.summary, latency_ms, result.details)

    async def _look_in_thread(self, slot: _Slot) -> ProbeResult | None:
        """A probe ignoring its own timeout is reported as a target it cannot reach (DOWN for
        most kinds) when it runs past it (plus grace); its thread is left to finish, and until
        it does the probe counts as running (so no second run of it starts beside the first).
        None: recorded already."""
        assert self.loop is not None
        future = self.loop.run_in_executor(self.pool, run_once, slot.probe)
        done, _ = await asyncio.wait({future}, timeout=slot.spec.timeout_s + OUTER_GRACE_S)
        if done:
            return future.result()
        logger.warning("probe %s: still running past its timeout", slot.spec.name)
        waited_ms = (slot.spec.timeout_s + OUTER_GRACE_S) * 1000
        result = gave_up(slot.spec, slot.probe, "probe still running", waited_ms)
        self._enqueue(FinishedRun(slot.spec, result, self.clock()))
        await future  # its late answer is not recorded: the DOWN above stands for it
        return None

    def _finish(self, slot: _Slot, result: ProbeResult | None) -> None:
        slot.running = False
        if result is not None:
            self._enqueue(FinishedRun(slot.spec, result, self.clock()))
        if slot.again and not self.stopping.is_set():
            slot.again = False
            assert self.loop is not None
            self._launch(slot, self.loop.time())

    # -- batching the writes --------------------------------------------------------------------
    def _enqueue(self, run: FinishedRun) -> None:
        with self.has_pending:
            self.pending.append(run)
            if self.queued_health.get(run.spec.name) is not run.result.health:
                self.queued_health[run.spec.name] = run.result.health
                self.pending_changed = True
            self.has_pending.notify()

    def _write(self) -> None:
        while True:
            with self.has_pending:
                while not self.pending and not self.stopping.is_set():
                    self.has_pending.wait()
                if not self.pending and self.stopping.is_set():
                    return
                # Gather what finishes in the next moment too, unless a health changed.
                deadline = time.monotonic() + FLUSH_S
                while (
                    not self.pending_changed
                    and not self.stopping.is_set()
                    and len(self.pending) < BATCH_MAX
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self.has_pending.wait(left)
                batch, self.pending = self.pending[:BATCH_MAX], self.pending[BATCH_MAX:]
                self.pending_changed = False
            try:
                self.recorder.record(batch)
            except Exception:  # the job's catch-all: log, drop this batch, go on
                logger.exception("could not record %d probe runs", len(batch))
