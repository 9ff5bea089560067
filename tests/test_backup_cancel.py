"""Work in flight during a change of the cluster (issues 18 and 20), on a stack of its own:
a backup or drill run that is told to stand aside ends at once, its tool killed, with no
partial directory, no scratch instance and nothing half made in the catalog; a later backup
works as usual; a failover that starts while one runs stops it and is not held up; and a
backup and a switchover requested together never run at the same time, whichever came first."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controlplane import store
from controlplane.backups import sync_catalog
from controlplane.config import Settings
from controlplane.errors import ConfigError
from controlplane.models import ActionRun
from controlplane.runtime import ControlPlane
from controlplane.services import ActionRequestIn, request_action
from lab.chaos import inject
from lab.layout import StackLayout, find_free_base_port
from lab.load import CarefulLoad, Ledger, verify_orders
from lab.process import wait_until
from lab.stack import Stack
from lab.targets import controlplane_targets, write_targets
from remediation import pitr
from remediation.backup import Backup
from remediation.base import ActionContext, Check
from remediation.drill import Drill
from remediation.executors.base import Cancel, Cancelled
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import process_table, under_directory
from remediation.registry import action_class
from tests.conftest import stack_of_its_own
from tests.test_failover import view, wait_redundant

CLUSTER_CHANGES = ("failover", "rejoin", "switchover", "restore")


@pytest.fixture(scope="module")
def bc() -> Iterator[Stack]:
    # No control plane of the stack's own: each test runs the one it needs, in process, so
    # that it can watch the runs it stops.
    with stack_of_its_own(
        "shop-backup-cancel", products=50, stock=100_000, with_controlplane=False
    ) as lab:
        yield lab


def lab_settings(stack: Stack, tmp_path: Path, *, first_backup_after_s: float) -> Settings:
    """The control plane's settings as the lab writes them, with a state store of the test's
    own and the first scheduled backup when the test wants it."""
    return settings_of(
        stack.layout,
        tmp_path,
        shop_admin_token=stack.admin_token,
        redis_password=stack.redis_password,
        first_backup_after_s=first_backup_after_s,
    )


def settings_of(
    layout: StackLayout,
    tmp_path: Path,
    *,
    shop_admin_token: str,
    redis_password: str,
    first_backup_after_s: float = 5,
) -> Settings:
    targets = controlplane_targets(
        layout, shop_admin_token=shop_admin_token, redis_password=redis_password
    )
    targets["backups"]["first_after_s"] = first_backup_after_s
    path = tmp_path / "targets.toml"
    write_targets(path, targets)
    return Settings.load(
        environ={}, targets_file=path, database_url=f"sqlite:///{tmp_path / 'state.db'}"
    )


def context(
    stack: Stack, settings: Settings, policy: str, cancel: Cancel | None = None, **params: Any
) -> ActionContext:
    """A run's context as the engine builds it, for the policy `[backups]` brings."""
    spec = settings.policy(policy)
    assert spec is not None
    return ActionContext(
        target="shop-db-cluster",
        component=None,
        params={**spec.params, **params},
        executor=LabExecutor(stack.layout.stack_file),
        is_healthy=lambda: Check.go("n/a"),
        cancel=cancel,
    )


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def partial_backups(backups_dir: Path) -> list[str]:
    """Directories that are not a whole backup (a whole one describes itself)."""
    return [p.name for p in backups_dir.iterdir() if not (p / pitr.META_FILE).exists()]


def processes_under(directory: Path) -> set[int]:
    """Processes that work in `directory` or name a path below it (pg_basebackup -D DIR/x, a
    scratch postgres in its data directory)."""
    return {p.pid for p in under_directory(directory)(process_table())}


def in_thread(call: Any) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # what the engine would see
            raised.append(exc)

    job = threading.Thread(target=run, name="backup run")
    job.start()
    return job, raised


def test_backup_drill_and_retention_runs_stand_aside_for_every_change_of_the_cluster(
    tmp_path: Path,
) -> None:
    layout = StackLayout(tmp_path, find_free_base_port())
    settings = settings_of(layout, tmp_path, shop_admin_token="t", redis_password="p")
    for kind, policy in (("backup", "scheduled-backup"), ("drill", "scheduled-drill"),
                         ("prune-backups", "backup-retention")):  # fmt: skip
        assert set(CLUSTER_CHANGES) <= action_class(kind).yields_to, kind
        spec = settings.policy(policy)
        assert spec is not None and spec.action == kind
        # ... and they run on the cluster's service, where its failovers run: one at a time.
        assert settings.targets_of(spec) == frozenset({"shop-db-cluster"}), policy
    failover = next(p for p in settings.policies if p.action == "failover")
    assert settings.targets_of(failover) == frozenset({"shop-db-cluster"})


def test_a_change_of_the_backed_up_nodes_on_another_service_is_refused_at_load(
    tmp_path: Path,
) -> None:
    # The engine's one run per target is what keeps a backup from running beside a failover:
    # a failover of the same nodes on another service would escape it.
    layout = StackLayout(tmp_path, find_free_base_port())
    targets = controlplane_targets(layout, shop_admin_token="t", redis_password="p")
    failover = next(p for p in targets["policies"] if p["action"] == "failover")
    failover["source"], failover["target"] = "alert", "shop-db"
    failover["match"] = {"alertname": "PrimaryDown"}
    path = tmp_path / "targets.toml"
    write_targets(path, targets)
    with pytest.raises(ConfigError, match=r"failover acts on the backed-up nodes but on shop-db"):
        Settings.load(environ={}, targets_file=path)


def test_junk_in_the_backup_directory_is_skipped_never_trusted(tmp_path: Path) -> None:
    real = pitr.BackupInfo("base-1", "/srv", "pg0", datetime.now(UTC), datetime.now(UTC),
                           "000000010000000000000002", "0" * 64, 1)  # fmt: skip
    for name, text in (
        ("base-1", json.dumps(real.to_json())),  # names another path: it is this directory
        ("base-2", json.dumps({**real.to_json(), "label": "base-9"})),  # not its directory
        ("base-3", "{not json"),
        ("base-4", json.dumps({**real.to_json(), "label": "base-4",
                               "started_at": "2026-01-01T00:00:00"})),  # no zone
        ("base-5", json.dumps({**real.to_json(), "label": "base-5", "size_bytes": "abc"})),
        ("base-6", json.dumps({**real.to_json(), "label": "base-6", "size_bytes": 10**30})),
    ):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / pitr.META_FILE).write_text(text)
    # A link planted as a backup, to a directory that describes itself as one: never taken
    # (retention would delete through it, a drill write through it).
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / pitr.META_FILE).write_text(json.dumps({**real.to_json(), "label": "base-7"}))
    (tmp_path / "base-7").symlink_to(elsewhere)
    [found] = pitr.list_backups(tmp_path)
    assert (found.label, found.path) == ("base-1", str(tmp_path / "base-1"))
    (tmp_path / "base-1" / pitr.DRILL_FILE).write_text('{"passed": "yes"}')
    assert pitr.drill_of(found) == {}  # not a verdict: never drilled, so never verified
    # A verdict written never follows a link planted at its name.
    victim = elsewhere / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "base-1" / pitr.DRILL_FILE).unlink()
    (tmp_path / "base-1" / pitr.DRILL_FILE).symlink_to(victim)
    assert pitr.drill_of(found) == {}
    drill = pitr.Drill("base-1", True, "1 orders consistent", {"orders": 1})
    pitr.record_drill(found, drill, datetime.now(UTC), 1.0)
    assert victim.read_text() == "mine"
    assert pitr.drill_of(found)["passed"] is True


def test_a_cancel_kills_what_runs_for_the_work_then_and_every_later_step_refuses() -> None:
    token = Cancel()
    killed: list[str] = []
    with token.on_cancel(lambda: killed.append("finished before")):
        pass
    with token.on_cancel(lambda: killed.append("running")):
        token.cancel("a failover starting")
        token.cancel("asked twice")
    with token.on_cancel(lambda: killed.append("started after")):
        pass
    assert killed == ["running", "started after"]
    with pytest.raises(Cancelled, match=r"^a failover starting$"):
        token.check()


def test_a_backup_cancelled_while_pg_basebackup_runs_stops_and_leaves_nothing_behind(
    bc: Stack, tmp_path: Path
) -> None:
    settings = lab_settings(bc, tmp_path, first_backup_after_s=3600)
    backups_dir = bc.layout.backups
    before = entries(backups_dir)
    token = Cancel()
    # Rate-limited to a crawl: it is still copying when it is cancelled.
    slow = context(bc, settings, "scheduled-backup", token, max_rate="1M")
    job, raised = in_thread(lambda: Backup().execute(slow))
    wait_until(
        lambda: bool(entries(backups_dir) - before) and bool(processes_under(backups_dir)),
        timeout_s=30,
        what="pg_basebackup copying into a new backup directory",
    )

    token.cancel("a failover of the cluster starting")
    wait_until(lambda: not job.is_alive(), timeout_s=30, what="the cancelled run ended")

    assert [type(e) for e in raised] == [Cancelled], raised
    assert str(raised[0]) == "a failover of the cluster starting"
    assert entries(backups_dir) == before  # the partial backup directory is gone
    assert processes_under(backups_dir) == set()  # pg_basebackup and its WAL streamer too

    # The next backup, as the next schedule would take it, is whole and verified.
    outcome = Backup().execute(context(bc, settings, "scheduled-backup"))
    db = store.make_engine(settings.database_url)
    store.migrate(db)
    factory = store.session_factory(db)
    sync_catalog(factory, backups_dir)
    with store.read(factory) as s:
        [taken] = [b for b in store.list_backups(s) if b.label == outcome.data["label"]]
        assert taken.verified_at is not None and taken.drill["passed"] is True
    assert partial_backups(backups_dir) == []


def test_a_backup_cancelled_during_its_drill_stops_the_scratch_instance_and_records_no_drill(
    bc: Stack, tmp_path: Path
) -> None:
    settings = lab_settings(bc, tmp_path, first_backup_after_s=3600)
    scratch = bc.layout.scratch
    before = {b.label for b in pitr.list_backups(bc.layout.backups)}
    token = Cancel()
    job, raised = in_thread(
        lambda: Backup().execute(context(bc, settings, "scheduled-backup", token))
    )
    wait_until(
        lambda: any(p.name.startswith("drill-") for p in scratch.iterdir()),
        timeout_s=60,
        what="the drill restoring into its scratch directory",
    )

    token.cancel("a switchover of the cluster starting")
    wait_until(lambda: not job.is_alive(), timeout_s=30, what="the cancelled run ended")

    assert [type(e) for e in raised] == [Cancelled], raised
    assert entries(scratch) == set()  # no scratch directory left
    assert processes_under(scratch) == set()  # and no scratch instance
    # The backup had been taken and checked before the drill began: it stays, whole, with no
    # drill recorded (not a failed one): the next drill takes it.
    [taken] = [b for b in pitr.list_backups(bc.layout.backups) if b.label not in before]
    assert pitr.drill_of(taken) == {}
    assert partial_backups(bc.layout.backups) == []
    assert Drill().execute(context(bc, settings, "scheduled-drill")).data["label"] == taken.label
    assert pitr.drill_of(taken)["passed"] is True


def runs(plane: ControlPlane, action: str) -> list[ActionRun]:
    with store.read(plane.factory) as s:
        found = store.list_runs(s, incident_id=None, limit=20, action=action)
        for run in found:
            s.expunge(run)
        return found


def states(plane: ControlPlane, action: str) -> list[str]:
    return [r.state for r in runs(plane, action)]


def drill_in_flight(plane: ControlPlane, scratch: Path) -> bool:
    """The scheduled backup run has taken its backup and drills it now."""
    return "running" in states(plane, "backup") and any(
        p.name.startswith("drill-") for p in scratch.iterdir()
    )


def test_a_scheduled_backup_running_when_the_primary_dies_is_cancelled_and_the_failover_succeeds(
    bc: Stack, tmp_path: Path
) -> None:
    old = wait_redundant(bc)
    stack = view(bc)
    before = Ledger.read(stack)
    products = list(range(1, 51))
    # The first scheduled backup soon after the start, once the probes have had a look.
    settings = lab_settings(bc, tmp_path, first_backup_after_s=2)
    plane = ControlPlane(settings, executor=LabExecutor(bc.layout.stack_file))
    load = CarefulLoad(stack.shop_urls(), products, clients=4).start()
    try:
        wait_until(lambda: len(load.acknowledged()) >= 10, timeout_s=60, what="orders flowing")
        plane.start()
        wait_until(
            lambda: drill_in_flight(plane, bc.layout.scratch),
            timeout_s=120,
            what="the backup's drill",
        )
        inject("kill-primary", bc.layout.data_dir)  # every process of it, as a dying machine

        wait_until(
            lambda: "succeeded" in states(plane, "failover"),
            timeout_s=120,
            what="a failover succeeded",
        )
        wait_until(
            lambda: "running" not in states(plane, "backup"),
            timeout_s=60,
            what="the backup run ended",
        )
        assert wait_redundant(bc, timeout_s=120) != old
    finally:
        load.stop()
        plane.stop()

    assert states(plane, "failover") == ["succeeded"]
    [failover] = runs(plane, "failover")
    assert failover.started_at is not None
    # How long the failover waited for the drill to stand aside (a figure, not a goal: timing
    # goals are the bench's; run with -s to see it).
    print(f"failover claimed {(failover.started_at - failover.created_at).total_seconds():.3f}s "
          "after it was requested, behind a drill standing aside")  # fmt: skip
    [backup] = runs(plane, "backup")
    assert backup.state == "failed" and "cancelled: failover on shop-db-cluster waits for it" in (
        backup.output.get("error", "")
    ), backup.output
    with store.read(plane.factory) as s:
        said = [a.message for a in store.audit_of_run(s, backup.id)]
    assert any("stood aside" in m for m in said) and not any("escalated" in m for m in said), said
    assert entries(bc.layout.scratch) == set()  # the drill's scratch directory is gone
    assert processes_under(bc.layout.scratch) == set()  # and its instance
    assert partial_backups(bc.layout.backups) == []
    wait_until(lambda: stack.prepared_count() == 0, timeout_s=90, what="no transaction in doubt")
    verified = verify_orders(stack, load.acknowledged(), before)
    assert verified["acknowledged"] > 10
    assert verified["lost"] == 0 and verified["duplicates"] == 0, verified


def span(run: ActionRun) -> tuple[datetime, datetime]:
    assert run.started_at is not None and run.finished_at is not None, run.state
    return run.started_at, run.finished_at


@pytest.mark.parametrize("first", ["backup", "switchover"])
def test_a_backup_and_a_switchover_requested_together_never_run_at_once(
    bc: Stack, tmp_path: Path, first: str
) -> None:
    wait_redundant(bc, timeout_s=120)
    settings = lab_settings(bc, tmp_path, first_backup_after_s=3600)
    plane = ControlPlane(settings, executor=LabExecutor(bc.layout.stack_file))
    plane.start()
    try:
        # Only the control plane holding the lease schedules backups.
        wait_until(lambda: plane.loop.is_leader, timeout_s=30, what="the lease held")
        switchover = ActionRequestIn(
            action="switchover", target="shop-db-cluster", reason="test: the other one first"
        )
        if first == "backup":
            plane.schedule_backups("backup")
            wait_until(lambda: "running" in states(plane, "backup"), timeout_s=30,
                       what="the backup running")  # fmt: skip
            request_action(plane, switchover, "test")
        else:
            request_action(plane, switchover, "test")
            plane.schedule_backups("backup")
        wait_until(
            lambda: all(
                st in ("succeeded", "failed") for a in ("backup", "switchover")
                for st in states(plane, a)
            ) and bool(states(plane, "backup")) and bool(states(plane, "switchover")),
            timeout_s=300,
            what="both runs ended",
        )  # fmt: skip
    finally:
        plane.stop()
    [backup] = runs(plane, "backup")
    [moved] = runs(plane, "switchover")
    assert moved.state == "succeeded", moved.output
    b, m = span(backup), span(moved)
    assert b[1] <= m[0] or m[1] <= b[0], (b, m)  # never both at once
    if first == "backup":  # it stood aside: the switchover did not wait for the whole backup
        assert backup.state == "failed" and "cancelled" in backup.output.get("error", "")
    else:  # it waited, then ran
        assert backup.state == "succeeded", backup.output
        assert m[1] <= b[0]
    wait_redundant(bc, timeout_s=120)
