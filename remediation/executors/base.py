"""The executor interface: how an action reaches the processes it acts on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class ExecutorError(Exception):
    pass


class Executor(Protocol):
    def is_running(self, component: str) -> bool: ...

    def restart(self, component: str) -> int:
        """Stop what is left of it, start it again; returns the new pid."""
        ...

    def components(self) -> list[str]: ...

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
    ) -> str:
        """Run one of the component's server tools (e.g. pg_rewind) as its OS user."""
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

    def fact(self, key: str) -> Any:
        """A fact the actions keep about the cluster (e.g. whether commits are synchronous)."""
        ...

    def set_fact(self, key: str, value: Any) -> None: ...

    def set_role(self, component: str, role: str) -> None: ...
