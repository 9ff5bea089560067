"""Point-in-time restore: the control plane's `restore` action against the same restore done
by hand with PostgreSQL's tools, alternately on one lab stack in one run (the control plane
paused while the tools run). Both restore the leader from a fresh base backup to a time just
before the last orders, then rebuild the standby. Measured end to end from outside: from the
operator's approval (or first command) to a writable restored leader (a primary on a new
timeline), the control plane's proof in a scratch instance included, and to a synchronous
standby again. Goal (bench/goals.toml): the end-to-end ratio.

    .venv/bin/python bench/restore.py --trials 3
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.failover import paused_controlplane
from lab import postgres as pg
from lab.bench_goals import Figure, save
from lab.errors import NotReadyError
from lab.layout import StackLayout, find_free_base_port
from lab.observe import StackView
from lab.process import wait_until
from lab.stack import Stack
from remediation import pitr
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import signal_all
from tests.conftest import lab_tmpdir
from tests.test_failover import described, is_redundant, leader, order

ORDERS_BEFORE, ORDERS_AFTER = 200, 20
POLL_S = 0.02


def sql(stack: Stack, port: int, query: str, db: str = "postgres") -> Any:
    with pg.connect(port, db, passfile=stack.pg_auth.passfile) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def leader_port(stack: Stack) -> int:
    name = leader(stack)
    assert name is not None
    return stack.layout.pg_port(int(name[-1]))


def place(stack: Stack, n: int) -> None:
    """n acknowledged orders; a shop just back from a restore may answer 503 for a moment."""
    last: list[str] = []

    def acknowledged(product_id: int) -> bool:
        response = order(stack, product_id=product_id)
        last[:] = [f"{response.status_code} {response.text[:300]}"]
        return response.status_code == 201

    for i in range(n):
        try:
            wait_until(partial(acknowledged, 1 + i % 50), timeout_s=30, interval_s=0.2)
        except NotReadyError:
            raise NotReadyError(f"no order acknowledged in 30 s; the shop said {last}") from None


def make_history(stack: Stack) -> datetime:
    """Orders, a restore point, then the orders a restore to it discards."""
    place(stack, ORDERS_BEFORE)
    point: datetime = sql(stack, leader_port(stack), "SELECT now()")
    time.sleep(0.2)
    place(stack, ORDERS_AFTER)
    return point


def new_stack() -> Stack:
    stack = Stack(
        StackLayout(lab_tmpdir("shop-bench-restore-"), find_free_base_port(), shop_count=1),
        products=1000,
        stock=100000,
    )
    stack.start()
    return stack


def take_backup(stack: Stack) -> pitr.BackupInfo:
    """A backup as an operator asks for one: the control plane's `backup` run (taken,
    verified, drilled), before the timed part."""
    info = described(stack)
    url = info["components"]["controlplane"]["url"] + "/api/v1"
    headers = {"Authorization": f"Bearer {stack.api_token}"}
    body = {"action": "backup", "target": "shop-db-cluster", "reason": "bench"}
    response = requests.post(f"{url}/actions", json=body, headers=headers, timeout=10)
    response.raise_for_status()
    run_id = response.json()["id"]

    def run() -> dict[str, Any]:
        found: dict[str, Any] = requests.get(
            f"{url}/actions/{run_id}", headers=headers, timeout=10
        ).json()
        return found

    ended = ("succeeded", "failed", "skipped", "abandoned")
    wait_until(lambda: run()["state"] in ended, timeout_s=600, what="the backup run")
    done = run()
    if done["state"] != "succeeded":
        raise RuntimeError(f"the backup run {done['state']}: {done.get('output')}")
    label = next(a["data"]["label"] for a in done["audit"] if a["verb"] == "output")
    return next(b for b in pitr.list_backups(stack.layout.backups) if b.label == label)


def drilled(stack: Stack) -> bool:
    url = described(stack)["components"]["controlplane"]["url"] + "/api/v1/backups"
    headers = {"Authorization": f"Bearer {stack.api_token}"}
    rows = requests.get(url, headers=headers, timeout=10).json()["backups"]
    return any("passed" in row["drill"] for row in rows)


def by_control_plane(stack: Stack, point: datetime) -> dict[str, Any]:
    """The operator's approval (the request, with the loss accepted) to the run's end, and
    its own timings."""
    info = described(stack)
    url = info["components"]["controlplane"]["url"] + "/api/v1"
    headers = {"Authorization": f"Bearer {stack.api_token}"}
    response = requests.post(
        f"{url}/actions",
        json={
            "action": "restore",
            "target": "shop-db-cluster",
            "reason": "bench",
            # The same operation as by hand: a full restore, discarding the orders after the
            # point (a plain `to` repairs instead, keeping them: a different, cheaper thing).
            "params": {"full": True, "to": point.isoformat(), "accept_loss": ORDERS_AFTER},
        },
        headers=headers,
        timeout=10,
    )
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]

    def finished() -> bool:
        state = requests.get(f"{url}/actions/{run_id}", headers=headers, timeout=10).json()
        return str(state["state"]) in ("succeeded", "failed", "skipped")

    wait_until(finished, timeout_s=600, interval_s=0.1, what="the restore finished")
    run = requests.get(f"{url}/actions/{run_id}", headers=headers, timeout=10).json()
    assert run["state"] == "succeeded", run
    output = next(a for a in run["audit"] if a["verb"] == "output")
    timings = dict(output["data"]["timings"])
    for entry in run["audit"]:
        if entry["duration_ms"] is not None:
            timings[f"{entry['verb']}_s"] = round(entry["duration_ms"] / 1000, 3)
    return timings


def as_postgres(*argv: str) -> None:
    user = pg.pg_os_user()
    prefix = ["runuser", "-u", user, "--"] if user else []
    subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=600)


def resolve_in_doubt(stack: Stack, port: int) -> None:
    """The 2PC a restore leaves prepared, finished by the shop's decision log, in plain SQL."""
    passfile = stack.pg_auth.passfile
    with pg.connect(port, "orders", passfile=passfile) as log:
        for db in ("inventory", "orders"):
            with pg.connect(port, db, passfile=passfile) as c:
                gids = c.execute(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
                ).fetchall()
                for (gid,) in gids:
                    txid = gid.rsplit(":", 1)[0]
                    log.execute(
                        "INSERT INTO tx_decisions (gid, decision, decided_by)"
                        " VALUES (%s, 'abort', 'operator') ON CONFLICT (gid) DO NOTHING",
                        (txid,),
                    )
                    row = log.execute(
                        "SELECT decision FROM tx_decisions WHERE gid = %s", (txid,)
                    ).fetchone()
                    verb = "COMMIT" if row and row[0] == "commit" else "ROLLBACK"
                    c.execute(f"{verb} PREPARED '{gid}'")


def by_hand(stack: Stack, point: datetime, backup: pitr.BackupInfo) -> None:
    """What an operator would type: the same steps, PostgreSQL's tools, the control plane
    paused meanwhile (SIGSTOP, as an operator would stop it first). The nodes are stopped and
    started through the lab's executor: the control plane may have started them last."""
    executor = LabExecutor(stack.layout.stack_file)
    bin_dir = stack.binaries.pg_bin
    lead = leader(stack)
    assert lead is not None
    other = "pg1" if lead == "pg0" else "pg0"
    port = stack.layout.pg_port(int(lead[-1]))
    data = Path(described(stack)["components"][lead]["data_dir"])
    archive = stack.layout.wal_archive
    as_postgres(str(bin_dir / "pg_verifybackup"), "--ignore", pitr.META_FILE, backup.path)
    segment = sql(stack, port, "SELECT pg_walfile_name(pg_switch_wal())")
    wait_until(
        lambda: (archive / segment).exists(), timeout_s=60, interval_s=0.05, what="WAL archived"
    )
    executor.stop(lead)
    executor.stop(other)
    shutil.rmtree(data)
    as_postgres("cp", "-a", backup.path, str(data))
    (data / pitr.META_FILE).unlink()
    (data / "backup_manifest").unlink()
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write(pitr.recovery_conf(archive, point, {}))
    as_postgres("touch", str(data / "recovery.signal"))
    executor.restart(lead)
    wait_until(
        lambda: sql(stack, port, "SELECT NOT pg_is_in_recovery()"),
        timeout_s=300,
        interval_s=0.05,
        what="promoted",
    )
    resolve_in_doubt(stack, port)
    with pg.connect(port, passfile=stack.pg_auth.passfile) as c:
        for name in pitr.RECOVERY_SETTINGS:
            c.execute(f"ALTER SYSTEM RESET {name}")
        c.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        c.execute("SELECT pg_reload_conf()")
        c.execute("CHECKPOINT")
    other_data = described(stack)["components"][other]["data_dir"]
    source = stack.pg_auth.dsn(port, application_name=other)
    as_postgres(str(bin_dir / "pg_rewind"), "-D", other_data, "--source-server", source, "-R")
    executor.restart(other)


class WritableWatch:
    """From outside, every POLL_S: when a node first answers as a primary on a newer timeline
    than the leader's at the start (a restore to a point in time always begins one)."""

    def __init__(self, stack: Stack) -> None:
        self.view = StackView.of(stack.layout.data_dir)
        lead = self.view.leader()
        assert lead is not None
        timeline = self.view.node_state(lead)[1]
        assert timeline is not None
        self.timeline = timeline
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> WritableWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for node in self.view.pg_nodes():
                role, timeline = self.view.node_state(node)
                if role == "primary" and timeline is not None and timeline > self.timeline:
                    self.at = time.monotonic()
                    return
            self._stop.wait(POLL_S)


@dataclass(frozen=True, slots=True)
class Trial:
    way: str  # "control plane" | "raw tools"
    writable_s: float  # approval (or the operator's first command) -> a writable restored leader
    redundant_s: float  # ... -> a synchronous standby again
    proof_s: float = 0.0  # of which the proof in a scratch instance (control plane only)
    timings: dict[str, float] = field(default_factory=dict)


def restore_trial(stack: Stack, way: str) -> Trial:
    """One restore of the leader to a point just before the last orders, then the standby
    rebuilt: by the control plane (from the approval) or by hand (the control plane paused)."""
    backup = take_backup(stack)
    point = make_history(stack)
    with WritableWatch(stack) as watch:
        started = time.monotonic()
        if way == "control plane":
            timings = by_control_plane(stack, point)
        else:
            procs = paused_controlplane(StackView.of(stack.layout.data_dir))
            try:
                by_hand(stack, point, backup)
            finally:
                signal_all(procs, signal.SIGCONT)
            timings = {}
        wait_until(lambda: is_redundant(stack), timeout_s=120, interval_s=0.1, what="redundant")
        redundant_s = time.monotonic() - started
    writable_s = (watch.at - started) if watch.at is not None else float("inf")
    # The proof, in a scratch instance, before anything is touched: in the precheck, then the
    # loss counted again in it at the start of execute (it must still be the one accepted).
    # The raw tools prove nothing.
    proof_s = (
        timings["precheck_s"] + timings["execute #1_s"] - timings["total_s"] if timings else 0.0
    )
    return Trial(way, writable_s, redundant_s, proof_s, timings)


def headline(trials: list[Trial]) -> list[Figure]:
    """Medians per way. The goal is on the end to end ratio (approval -> writable, the proof
    included); the restore without its proof, and the ratio to redundancy, are context."""
    cp = [t for t in trials if t.way == "control plane"]
    raw = [t for t in trials if t.way == "raw tools"]
    med = statistics.median
    cp_w, raw_w = med(t.writable_s for t in cp), med(t.writable_s for t in raw)
    cp_r, raw_r = med(t.redundant_s for t in cp), med(t.redundant_s for t in raw)
    proof = med(t.proof_s for t in cp)
    return [
        Figure("restore.writable_vs_raw_tools", cp_w / raw_w, "x",
               "approval -> writable, proof included / raw tools"),
        Figure("restore.redundant_vs_raw_tools", cp_r / raw_r, "x",
               "approval -> redundant, proof included / raw tools"),
        Figure("restore.restore_only_vs_raw_tools",
               med(t.redundant_s - t.proof_s for t in cp) / raw_r, "x",
               "restore to redundant without its proof / raw tools (issue 11's moved goal)"),
        Figure("restore.cp_writable_s", cp_w, "s", "control plane: approval -> writable"),
        Figure("restore.raw_writable_s", raw_w, "s", "raw tools: first command -> writable"),
        Figure("restore.cp_redundant_s", cp_r, "s", "control plane: approval -> redundant"),
        Figure("restore.raw_redundant_s", raw_r, "s", "raw tools: first command -> redundant"),
        Figure("restore.proof_s", proof, "s", "control plane: proof in a scratch instance"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3, help="of each way")
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    trials: list[Trial] = []
    stack = new_stack()
    try:
        # Its first scheduled backup and drill run just after start-up: let them finish, or
        # the first trial competes with a scratch restore for the disk.
        wait_until(partial(drilled, stack), timeout_s=300, what="the first drill")
        for n in range(args.trials):
            for way in ("control plane", "raw tools"):  # alternately, on the same stack
                t = restore_trial(stack, way)
                trials.append(t)
                kept = sql(stack, leader_port(stack), "SELECT count(*) FROM orders", db="orders")
                print(
                    f"{way} trial {n + 1}: writable after {t.writable_s:.2f}s, redundant after "
                    f"{t.redundant_s:.2f}s"
                    + (f" (proof {t.proof_s:.2f}s)" if t.timings else "")
                    + f"; {kept} orders kept",
                    flush=True,
                )
                if t.timings:
                    print(f"  phases: {t.timings}")
    finally:
        data_dir = stack.layout.data_dir
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    figures = headline(trials)
    for f in figures:
        print(f"{f.what}: {f.value:.2f} {f.unit}")
    save(args.figures, figures)


if __name__ == "__main__":
    main()
