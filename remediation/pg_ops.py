"""PostgreSQL operations shared by failover, switchover and rejoin: fence, promote, switch
synchronous replication off and on, and bring a node back as a streaming standby.

The `synchronous` fact (kept by the executor, as Patroni keeps its /sync key in the DCS) is
true only while every acknowledged commit is known to be on the standby: it is cleared
*before* commits may go asynchronous and set *after* a commit has waited for the standby."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from pgcluster.nodes import NodeState, NodeView, follows, observe, observe_all
from remediation.base import ActionError
from remediation.executors.base import Executor, ExecutorError
from remediation.facts import FactsKeeper, not_synchronous, synchronous_again

logger = logging.getLogger(__name__)

ANY_STANDBY = "*"  # FIRST 1 of any standby: whichever node is the standby counts
REWOUND_OR_CLEAN = ("shut down", "shut down in recovery")
CRASHED_STANDBY = "in archive recovery"  # single-user mode cannot run a standby


def connect(dsn: str, timeout_s: float = 3) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, connect_timeout=max(2, round(timeout_s)), autocommit=True)
    except psycopg.OperationalError as exc:
        raise ActionError(f"cannot reach {dsn}: {exc}") from exc


WAIT_POLL_S = 0.05  # each look is a new session: 20 a second at most, for the moments it lasts


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            raise ActionError(f"{what} not reached within {timeout_s:g}s")
        time.sleep(WAIT_POLL_S)


class Laps:
    """What a multi-step operation did, each step with its seconds (an operator reads where a
    rejoin's time went in its output)."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.last = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.steps.append(f"{step} {now - self.last:.2f}s")
        self.last = now

    def __str__(self) -> str:
        return ", ".join(self.steps)


def set_sync_names(dsn: str, names: str) -> None:
    """ALTER SYSTEM + reload: commits waiting on the old setting are released at once."""
    with connect(dsn) as conn:
        conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        conn.execute("SELECT pg_reload_conf()")


def degrade_to_async(facts: FactsKeeper, dsn: str) -> None:
    not_synchronous(facts)  # first: from here on a commit may be local only
    set_sync_names(dsn, "")


def restore_sync(facts: FactsKeeper | None, leader: str, dsn: str, timeout_s: float) -> None:
    """Synchronous commits on `leader` again, proven by a commit that waited for its standby;
    then recorded in `facts` (None: by hand, nobody records it, as bench/failover.py's
    limit does)."""
    set_sync_names(dsn, ANY_STANDBY)

    def synchronous() -> bool:
        view = observe(leader, dsn, 2)
        return view.state is NodeState.PRIMARY and bool(view.sync_standbys)

    wait_for(synchronous, timeout_s, f"a synchronous standby of {leader}")
    commit_a_write(dsn)  # this commit waited for the standby: all before it is there too
    if facts is not None:
        synchronous_again(facts, leader)


def commit_a_write(dsn: str, timeout_s: float = 5) -> None:
    """A transaction with an xid and a commit record: proof that writes commit."""
    with connect(dsn) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout_s * 1000)}")
        conn.autocommit = False
        conn.execute("SELECT txid_current()")
        conn.commit()


def fence(executor: Executor, view: NodeView) -> bool:
    try:
        return executor.fence(view.name)
    except ExecutorError as exc:
        raise ActionError(f"cannot fence {view.name}: {exc}") from exc


PROMOTED_POLL_S = 0.005


def promote(view: NodeView, dsn: str, timeout_s: float, laps: Laps | None = None) -> None:
    with connect(dsn) as conn:
        # Before promoting: the new primary has no standby yet, so it starts asynchronous.
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
        conn.execute("SELECT pg_reload_conf()")
        if laps is not None:
            laps.lap(f"{view.name} asynchronous")
        # pg_promote(wait => true) looks every 100 ms, and a promotion takes a few: on the
        # path of every failover's outage, so look here, more often.
        row = conn.execute("SELECT pg_promote(false)").fetchone()
        if not (row and row[0]):
            raise ActionError(f"{view.name} could not be asked to promote")
        deadline = time.monotonic() + timeout_s
        while True:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row and not row[0]:
                if laps is not None:
                    laps.lap(f"promoted {view.name}")
                return
            if time.monotonic() >= deadline:
                raise ActionError(f"{view.name} did not finish promotion within {timeout_s:g}s")
            time.sleep(PROMOTED_POLL_S)


def controldata(executor: Executor, node: str, label: str) -> str:
    """One line of pg_controldata for the node's data directory, e.g. "Database cluster state"."""
    out = executor.run_tool(node, "pg_controldata", ["-D", executor.data_dir(node)])
    for line in out.splitlines():
        if line.startswith(f"{label}:"):
            return line.split(":", 1)[1].strip()
    raise ActionError(f"pg_controldata of {node} has no {label!r}")


def cluster_state(executor: Executor, node: str) -> str:
    return controldata(executor, node, "Database cluster state")


def rejoin(
    executor: Executor,
    node: str,
    leader: NodeView,
    nodes: Mapping[str, str],
    *,
    timeout_s: float,
    rebuild: bool = False,
) -> str:
    """Make `node` a standby streaming from `leader`: stop it, finish its crash recovery in
    single-user mode (never as a server: it would accept writes), pg_rewind it from the
    leader (a fresh base backup if that fails, or at once with `rebuild`), start it. Returns
    how it was done. A failure of a tool or a process is an ActionError worth another try
    (the node may be busy dying, or unreachable for a while)."""
    try:
        return _rejoin(executor, node, leader, nodes, timeout_s=timeout_s, rebuild=rebuild)
    except ExecutorError as exc:
        raise ActionError(f"rejoin of {node} failed: {exc}") from exc


def _rejoin(
    executor: Executor,
    node: str,
    leader: NodeView,
    nodes: Mapping[str, str],
    *,
    timeout_s: float,
    rebuild: bool,
) -> str:
    laps = Laps()
    executor.fence(node)  # whatever it is now (a rogue primary, a stuck standby): gone
    data_dir = executor.data_dir(node)
    state = cluster_state(executor, node)
    laps.lap(f"fenced (was {state})")

    def streaming() -> bool:
        return follows(observe(node, nodes[node], 2), leader)

    if state == CRASHED_STANDBY and not rebuild:
        # A standby that died: started again it replays and streams on, if it still can.
        executor.restart(node)
        try:
            wait_streaming(executor, node, streaming, min(timeout_s, 15), f"{node} streaming again")
            laps.lap("restarted as it was (a crashed standby), streaming")
            return str(laps)
        except StoppedAtStart:
            # Still "in archive recovery", which single-user mode cannot recover (a standby);
            # and a server that does not stay up (a port taken, a bad setting, a full disk)
            # is not started by new data either. Its own reason, for the retry, the operator,
            # or the rebuild that redundancy missing for long enough asks for.
            raise
        except ActionError:
            executor.stop(node)  # cleanly: "shut down in recovery", which pg_rewind reads
            state = cluster_state(executor, node)
            laps.lap("restarted, did not follow")
    # A just-promoted leader's control file still names the old timeline until its first
    # checkpoint, and pg_rewind would then wrongly find "no rewind required". On the leader,
    # beside the node's own crash recovery.
    checkpoint = _CHECKPOINTS.submit(checkpoint_on, leader.name, nodes[leader.name])
    try:
        if state not in REWOUND_OR_CLEAN and not rebuild:
            # A crashed primary: pg_rewind cannot read it until crash recovery has run. With
            # fsync off, as pg_rewind runs it itself: what it writes is flushed before the
            # node serves (below), and its checkpoints' flushes were most of its time.
            executor.run_tool(
                node,
                "postgres",
                ["--single", "-F", "-D", data_dir, "-c", "archive_mode=off", "postgres"],
                stdin="",
            )
            laps.lap("crash recovery in single-user mode")
    finally:
        checkpoint.result()
    laps.lap(f"checkpoint on {leader.name}")
    source = f"{nodes[leader.name]} application_name={node}"
    try:
        if rebuild:
            raise ExecutorError("a rebuild was asked for")
        # --no-sync: the node's start flushes its whole data directory anyway (pg_rewind
        # leaves it "in archive recovery", which a start syncs before replaying, in one
        # syncfs() with the lab's recovery_init_sync_method), not file by file twice.
        out = executor.run_tool(
            node, "pg_rewind", ["-D", data_dir, "--source-server", source, "-R", "--no-sync"]
        )
        if "no rewind required" in out:
            # Left "shut down": nothing makes its start flush what was written with fsync off.
            executor.run_tool(node, "initdb", ["--sync-only", "-D", data_dir])
            laps.lap("no rewind needed, synced")
        else:
            laps.lap("pg_rewind")
    except ExecutorError as exc:
        logger.warning("no pg_rewind of %s (%s): taking a base backup", node, exc)
        executor.reset_data_dir(node)
        executor.run_tool(
            node,
            "pg_basebackup",
            ["-D", data_dir, "-d", source, "-X", "stream", "-R", "--checkpoint=fast"],
            timeout_s=max(timeout_s, 600),
        )
        laps.lap(f"base backup (pg_rewind failed: {str(exc)[-200:]})")
    executor.restart(node)
    laps.lap("started")
    wait_streaming(executor, node, streaming, timeout_s, f"{node} streaming from {leader.name}")
    laps.lap("streaming")
    return str(laps)


class StoppedAtStart(ActionError):
    """The server exited right after it was started: waiting for it to stream is in vain."""


def wait_streaming(
    executor: Executor, node: str, streaming: Callable[[], bool], timeout_s: float, what: str
) -> None:
    """Wait for a node just started to stream; at once, with the end of its log, if it stops
    (else a port taken would cost the whole timeout, and read as "not streaming")."""

    stopped_looks = 0  # in a row

    def check() -> bool:
        nonlocal stopped_looks
        if streaming():
            return True
        # Twice in a row, a look apart: the launcher's child is not yet the server (still
        # `setsid`) for a moment after the start returns.
        stopped_looks = 0 if executor.is_running(node) else stopped_looks + 1
        if stopped_looks >= 2:
            raise StoppedAtStart(f"{node} stopped right after its start: {executor.log_tail(node)}")
        return False

    wait_for(check, timeout_s, what)


_CHECKPOINTS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pg-checkpoint")


def checkpoint_on(name: str, dsn: str) -> None:
    try:
        with connect(dsn) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error as exc:
        raise ActionError(f"CHECKPOINT on {name} failed: {exc}") from exc


def views(nodes: Mapping[str, str], timeout_s: float = 2) -> list[NodeView]:
    return observe_all(nodes, timeout_s)


def views_until(
    nodes: Mapping[str, str],
    enough: Callable[[list[NodeView]], bool],
    *,
    timeout_s: float,
    budget_s: float,
) -> list[NodeView]:
    """Looks at the nodes until `enough(views)` holds or `budget_s` is spent, each look
    waiting longer than the one before (timeout_s, twice that, ...) within what is left: a
    node slow for a second on a busy machine is not gone. Returns the last look."""
    deadline = time.monotonic() + budget_s
    wait_s = timeout_s
    while True:
        looked_at = time.monotonic()
        found = views(nodes, wait_s)
        left_s = deadline - time.monotonic()
        if enough(found) or left_s < 0.05:
            return found
        if time.monotonic() - looked_at < LOOK_AGAIN_AFTER_S:  # answered, just not enough
            time.sleep(min(LOOK_AGAIN_AFTER_S, left_s))
            left_s = deadline - time.monotonic()
        wait_s = max(0.05, min(wait_s * 2, left_s))


LOOK_AGAIN_AFTER_S = 0.2  # a refused look is quick: the next waits this long
