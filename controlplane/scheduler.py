"""APScheduler 3.x wiring: one job per probe (its interval, never overlapping), pruning, and
the loop thread, which a webhook or a changed probe result wakes at once."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from controlplane.loop import Loop
from controlplane.metrics import Metrics

logger = logging.getLogger(__name__)

MIN_GAP_S = 0.05  # between two cycles, however often the loop is woken


class LoopThread:
    """Runs `run_cycle` every `interval_s`, or sooner when woken."""

    def __init__(self, loop: Loop, interval_s: float) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self.wake_event = threading.Event()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="decision-loop", daemon=True)

    def wake(self) -> None:
        self.wake_event.set()

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            if not self.loop.backlog:  # else the last cycle left decisions: go on at once
                self.wake_event.wait(self.interval_s)
            # A burst of wakes (a webhook flood) is one cycle, not one each: wait a moment,
            # then take them all.
            self.stop_event.wait(MIN_GAP_S)
            self.wake_event.clear()
            if self.stop_event.is_set():
                break
            try:
                self.loop.run_cycle()
            except Exception:  # the loop's catch-all: log, go on with the next tick
                logger.exception("decision cycle failed")

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()
        self.thread.join(timeout=10)


def make_scheduler(metrics: Metrics) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(
        timezone=UTC,
        executors={"default": {"type": "threadpool", "max_workers": 16}},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
    )

    def on_submit(event: JobSubmissionEvent) -> None:
        if event.scheduled_run_times:
            lag = datetime.now(UTC) - event.scheduled_run_times[-1]
            metrics.scheduler_lag.set(max(0.0, lag.total_seconds()))

    scheduler.add_listener(on_submit, EVENT_JOB_SUBMITTED)
    return scheduler
