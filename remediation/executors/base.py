"""The executor interface: how an action reaches the processes it acts on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol


class ExecutorError(Exception):
    pass


class Unreachable(ExecutorError):
    """The node's host could not be reached, or stopped answering mid-step: nothing is known
    of what runs there (a fence that raises this fenced nothing that anyone knows of)."""


class Cancelled(Exception):
    """The work was stopped on purpose (its `Cancel` was set); the message says why. Not an
    ExecutorError: no handler of a failed tool takes it for one (a drill that was stopped did
    not fail)."""


class Cancel:
    """A token for long work (a base backup, a drill) that another thread may stop. `cancel`
    returns at once: it kills each tool running for the work at that moment (`run_tool`
    registers one with `on_cancel` while it runs), and the work, between its steps, raises
    `Cancelled` (`check`) and undoes what it had half made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._kills: dict[int, Callable[[], None]] = {}

    @property
    def reason(self) -> str | None:
        return self._reason

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            kills = list(self._kills.values())
        for kill in kills:
            kill()

    def check(self) -> None:
        """Raise `Cancelled` if the work was told to stop."""
        if self._reason is not None:
            raise Cancelled(self._reason)

    @contextmanager
    def on_cancel(self, kill: Callable[[], None]) -> Iterator[None]:
        """While inside, `cancel` calls `kill` (at once if it has been called already). `kill`
        must not block: it signals a process, it does not wait for it."""
        key = id(kill)
        with self._lock:
            self._kills[key] = kill
            cancelled = self._reason is not None
        if cancelled:
            kill()
        try:
            yield
        finally:
            with self._lock:
                self._kills.pop(key, None)


class Executor(Protocol):
    def is_running(self, component: str) -> bool: ...

    def restart(self, component: str) -> int:
        """Stop what is left of it, start it again; returns the new pid."""
        ...

    def fence(self, component: str) -> bool:
        """SIGKILL every process of it, stopped (SIGSTOP) ones too: the main process, its
        descendants, and whatever works in its data directory (PostgreSQL's backends, each in
        a session of its own, outlive their postmaster). Returns whether anything ran.
        Guarantees, when it returns: none of them is left (else ExecutorError names the
        survivors), so it accepts no write and holds no port, lock or shared memory; it can be
        started again."""
        ...

    def stop(self, component: str, timeout_s: float = 30) -> None:
        """A clean (fast) stop, as systemd does it: the stop signal to the main process and
        SIGCONT to all of them (a stopped one could not act on it); after `timeout_s`, a fence.
        Nothing of it is left when it returns (else ExecutorError)."""
        ...

    def run_tool(
        self,
        component: str,
        tool: str,
        args: Sequence[str],
        *,
        stdin: str | None = None,
        timeout_s: float = 300,
        cancel: Cancel | None = None,
    ) -> str:
        """Run one of the component's server tools (e.g. pg_rewind) as its OS user. With
        `cancel`: `Cancelled` when it is set, before or during the run (the tool and whatever
        it started in its process group are killed first)."""
        ...

    def data_dir(self, component: str) -> str: ...

    def log_tail(self, component: str, max_chars: int = 1000) -> str:
        """The end of its log ("" if it has none): why a server that exits at its start did
        (a port taken, a bad setting, a full disk), for an action's error."""
        ...

    def reset_data_dir(self, component: str) -> None:
        """Empty its (stopped) data directory, e.g. for a fresh base backup."""
        ...

    def put_files(
        self,
        component: str,
        dest_dir: str,
        *,
        source_dir: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        """Fill `dest_dir` (replaced if it exists; the component's own data directory only
        while it is stopped) with a copy of `source_dir` and then `files` (name -> text), all
        owned by the component's OS user."""
        ...
