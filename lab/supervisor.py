"""What stands in for systemd's `Restart=always` in the lab: a small process that starts a
component (the control plane) again from its recipe in stack.json whenever its recorded
process is gone, whoever killed it and however.

The stack starts one per supervised component (`python -m lab.supervisor --stack-file
DIR/stack.json --component controlplane`), in a session of its own, so that a kill of the
component's process group does not reach it, and records it in stack.json under
`supervisors`. Like systemd, it watches the process, not its answers: a control plane that
hangs is Prometheus's to report (ControlPlaneDown). A component that keeps dying is started
again less and less often (at most every MAX_BACKOFF_S), never given up on. It stops on
SIGTERM, and by itself once stack.json is gone (the stack is gone)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType

from lab.layout import StackLayout
from lab.process import ServerProcess
from remediation.executors.base import ExecutorError
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import is_pid_alive

logger = logging.getLogger(__name__)

INTERVAL_S = 0.1  # how often the process is looked at: a kill is seen within this
# A start within RECENT_S of earlier ones waits 0.25 s, 0.5 s, 1 s ... up to MAX_BACKOFF_S
# (systemd: RestartSec, and StartLimitIntervalSec's 10 s), so a control plane that cannot
# start does not spin; the first start after a quiet while is immediate.
RECENT_S = 10.0
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 5.0


def backoff_s(recent_starts: int) -> float:
    """How long to wait before a start, given the starts within the last RECENT_S."""
    if recent_starts == 0:
        return 0.0
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2.0 ** (recent_starts - 1))


def supervise(
    stack_file: Path,
    component: str,
    stop: threading.Event,
    *,
    interval_s: float = INTERVAL_S,
) -> int:
    """Keep `component` running until `stop` is set or stack.json is gone; returns how many
    times it was started again."""
    executor = LabExecutor(stack_file)
    starts: deque[float] = deque()
    count = 0
    while not stop.is_set():
        if not stack_file.exists():
            logger.info("%s is gone: the stack is gone, so is its supervisor", stack_file)
            break
        try:
            running = executor.is_running(component)
        except (ExecutorError, OSError, ValueError) as exc:  # not described (yet): look again
            logger.debug("cannot look at %s: %s", component, exc)
            stop.wait(interval_s)
            continue
        if not running:
            now = time.monotonic()
            while starts and now - starts[0] > RECENT_S:
                starts.popleft()
            wait_s = backoff_s(len(starts))
            if wait_s and stop.wait(wait_s):
                break
            try:
                pid = executor.restart(component)
            except (ExecutorError, OSError) as exc:
                logger.error("cannot start %s again: %s", component, exc)
            else:
                count += 1
                logger.warning("%s was not running: started again as pid %d", component, pid)
            starts.append(time.monotonic())
        stop.wait(interval_s)
    return count


def supervisor_server(layout: StackLayout, component: str) -> ServerProcess:
    """The supervisor of `component` as a process of the stack (log: DIR/logs/)."""
    name = f"supervisor-{component}"
    proc = ServerProcess(
        name=name,
        argv=[
            sys.executable,
            "-m",
            "lab.supervisor",
            "--stack-file",
            str(layout.stack_file),
            "--component",
            component,
        ],
        log_path=layout.logs / f"{name}.log",
        ready=lambda: proc.pid is not None and is_pid_alive(proc.pid),
        stop_timeout_s=5,
    )
    return proc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stack-file", type=Path, required=True)
    parser.add_argument("--component", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("supervising %s of %s", args.component, args.stack_file)
    supervise(args.stack_file, args.component, stop)


if __name__ == "__main__":
    main()
