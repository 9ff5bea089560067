"""CPU hogs for a game day under stress: Debian's stress-ng, one worker per core, at the stack's
own priority, for as long as the game day runs (always killed at its end); and the machine's
load average meanwhile, for the report."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from types import TracebackType
from typing import Any

from lab.errors import MissingBinaryError
from remediation.executors.processes import instance_processes, kill_tree

LOAD_SAMPLE_S = 5.0
MAX_LOAD_SAMPLES = 720  # an hour at 5 s; a longer day keeps its first hour's samples
STOP_TIMEOUT_S = 5.0


def stress_ng() -> str:
    found = shutil.which("stress-ng")
    if found is None:
        raise MissingBinaryError(
            "stress-ng is not installed: run `apt-get install -y stress-ng` (or `make setup`)"
        )
    return found


class CpuHogs:
    """`with CpuHogs(priority_of=pid):` stress-ng hogs every core at the niceness of `pid` (the
    stack's control plane; this process's own when None) until the block ends, however it
    ends. `timeout_s` is stress-ng's own deadline: the hogs end even if this process is
    SIGKILLed before it can stop them."""

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout_s: float = 6 * 3600,
        priority_of: int | None = None,
        sample_s: float = LOAD_SAMPLE_S,
    ) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.priority_of = priority_of
        self.sample_s = sample_s
        self.popen: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self.nice = 0
        self.samples: list[tuple[float, float]] = []  # (seconds since start, 1-min load)
        self.at_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.at_end: tuple[float, float, float] | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="load-sampler", daemon=True)

    def __enter__(self) -> CpuHogs:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> CpuHogs:
        self.nice = _niceness(self.priority_of)
        hogs = [stress_ng(), "--cpu", str(self.workers), "--timeout", f"{int(self.timeout_s)}s"]
        # `nice -n` adjusts from this process's niceness to the stack's (root may lower it).
        shift = self.nice - _niceness(None)
        self.argv = ["nice", "-n", str(shift), *hogs] if shift else hogs
        self.at_start = os.getloadavg()
        self._started = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its workers with it: one process group to stop
        )
        self._sampler.start()
        return self

    def stop(self) -> None:
        """SIGTERM to stress-ng's group (it stops its workers), SIGKILL to whatever of it is
        left after STOP_TIMEOUT_S. Safe to call twice."""
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join(timeout=self.sample_s + 1)
        if self.popen is None or self.at_end is not None:
            return
        members = instance_processes(self.popen.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        kill_tree(members)
        self.popen.wait(timeout=STOP_TIMEOUT_S)
        self.at_end = os.getloadavg()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_s):
            if len(self.samples) < MAX_LOAD_SAMPLES:
                elapsed = round(time.monotonic() - self._started, 1)
                self.samples.append((elapsed, round(os.getloadavg()[0], 2)))

    def report(self) -> dict[str, Any]:
        """For the game day's report: what ran, and the 1-minute load average while it did."""
        loads = [load for _, load in self.samples]
        return {
            "command": self.argv,
            "pid": self.popen.pid if self.popen else None,
            "cpu_workers": self.workers,
            "cpus": os.cpu_count(),
            "nice": self.nice,
            "load_avg_at_start": [round(x, 2) for x in self.at_start],
            "load_avg_at_end": [round(x, 2) for x in self.at_end] if self.at_end else None,
            "load_avg_1m": {
                "min": min(loads, default=None),
                "mean": round(sum(loads) / len(loads), 2) if loads else None,
                "max": max(loads, default=None),
            },
            "load_samples": [list(s) for s in self.samples],
            "sample_s": self.sample_s,
        }


def _niceness(pid: int | None) -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, pid or 0)
    except OSError:  # gone: this process's own
        return os.getpriority(os.PRIO_PROCESS, 0)
