"""starve-cpu: the standby's and the control plane's processes stopped in bursts, every one of
them continued at the end, also when the fault is cut short by an exception."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from lab.chaos import inject
from lab.chaos.base import processes_of
from lab.observe import StackView
from lab.process import wait_until
from lab.stack import Stack


def stopped(view: StackView, component: str) -> set[int]:
    """The pids of `component` the kernel shows stopped (state T)."""
    found = set()
    for proc in processes_of(view, component):
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state == "T":
            found.add(proc.pid)
    return found


class Watcher:
    """Counts, from beside the fault, the most processes of each component seen stopped."""

    def __init__(self, view: StackView, components: tuple[str, ...]) -> None:
        self.view = view
        self.most = dict.fromkeys(components, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for name in self.most:
                self.most[name] = max(self.most[name], len(stopped(self.view, name)))
            self._stop.wait(0.05)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def view(stack: Stack) -> Iterator[StackView]:
    seen = StackView.of(stack.layout.data_dir)
    wait_until(seen.is_whole, timeout_s=60, what="a whole stack")
    yield seen
    wait_until(seen.is_whole, timeout_s=60, what="a whole stack again")


def test_a_starved_standby_and_control_plane_are_stopped_in_bursts_then_all_continued(
    view: StackView,
) -> None:
    standby = view.standby()
    assert standby is not None
    with Watcher(view, (standby, "controlplane")) as watcher:
        record = inject("starve-cpu", view.data_dir, duration_s=2)
    assert record.kind == "starve-cpu"
    assert record.details["cycles"] >= 2
    # Every process of each, PostgreSQL's setsid() backends included (more than the postmaster).
    assert watcher.most[standby] > 1 and watcher.most["controlplane"] >= 1, watcher.most
    assert stopped(view, standby) == set() and stopped(view, "controlplane") == set()


class Interrupted(Exception):
    pass


def test_a_starve_cut_short_by_an_exception_still_continues_every_process(
    view: StackView,
) -> None:
    standby = view.standby()
    assert standby is not None

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.1)  # mid-cycle, while they are stopped
        with pytest.raises(Interrupted):
            inject("starve-cpu", view.data_dir, duration_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert stopped(view, standby) == set() and stopped(view, "controlplane") == set()
