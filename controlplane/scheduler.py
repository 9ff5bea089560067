"""APScheduler 3.x wiring: pruning, backups and drills, and the loop thread, which a webhook or
a changed probe result wakes at once. The probes run on the probe runner
(`controlplane.probe_runner`), which starts and stops with this scheduler."""

from __future__ import annotations

import logging
import threading
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler

from controlplane.loop import Loop
from controlplane.metrics import Metrics

logger = logging.getLogger(__name__)

MIN_GAP_S = 0.05  # between two cycles, however often the loop is woken
JOB_WORKERS = 4  # prune, backup, drill: each never beside itself


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
    """A few long, rare jobs (prune, backup, drill): the probes' lag is the probe runner's
    to report (`metrics.scheduler_lag`)."""
    return BackgroundScheduler(
        timezone=UTC,
        executors={"default": {"type": "threadpool", "max_workers": JOB_WORKERS}},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
    )
