"""Work in flight during a failover (issue 18), on a stack of its own (its primary is killed):
a scheduled base backup or drill that is told to stop ends at once, its tool killed, with no
partial directory, no scratch instance and nothing half made in the catalog; a later backup
works as usual; and a failover that starts while one runs stops it and is not held up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from controlplane import store
from controlplane.backups import Backups
from controlplane.config import Settings
from controlplane.runtime import CLUSTER_ACTIONS, ControlPlane, acts_on_nodes
from lab.chaos import inject
from lab.layout import StackLayout, find_free_base_port
from lab.load import CarefulLoad, Ledger, verify_orders
from lab.process import wait_until
from lab.stack import Stack
from lab.targets import controlplane_targets, write_targets
from remediation import pitr
from remediation.executors.base import Cancel, Cancelled
from remediation.executors.lab import LabExecutor
from remediation.executors.processes import process_table, under_directory
from tests.conftest import stack_of_its_own
from tests.test_failover import view, wait_redundant

CANCELLED = "scheduled backup cancelled"


@pytest.fixture(scope="module")
def bc() -> Iterator[Stack]:
    # No control plane of the stack's own: each test runs the one it needs, in process, so
    # that it can watch the backup job it stops.
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


@pytest.fixture
def catalog_store(bc: Stack, tmp_path: Path) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    settings = lab_settings(bc, tmp_path, first_backup_after_s=3600)
    engine = store.make_engine(settings.database_url)
    store.migrate(engine)
    yield settings, store.session_factory(engine)
    engine.dispose()


def backups_of(
    stack: Stack, catalog: tuple[Settings, sessionmaker[Session]], max_rate: str | None = None
) -> Backups:
    settings, factory = catalog
    assert settings.backups is not None
    return Backups(
        settings.backups, LabExecutor(stack.layout.stack_file), factory, max_rate=max_rate
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


def cancelled_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "controlplane.backups" and r.getMessage().startswith(CANCELLED)
    ]


def backup_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "controlplane.backups" and r.levelno >= logging.ERROR
    ]


def test_only_a_change_of_the_backed_up_cluster_stops_its_backups(tmp_path: Path) -> None:
    layout = StackLayout(tmp_path, find_free_base_port())
    settings = settings_of(layout, tmp_path, shop_admin_token="t", redis_password="p")
    assert settings.backups is not None
    nodes = settings.backups.nodes
    for action in CLUSTER_ACTIONS:
        assert acts_on_nodes(settings, action, "shop-db-cluster", nodes), action
    assert not acts_on_nodes(settings, "failover", "shop-0", nodes)  # no such policy there
    assert not acts_on_nodes(settings, "failover", "shop-db-cluster", {"pg0": "host=elsewhere"})


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
    bc: Stack,
    catalog_store: tuple[Settings, sessionmaker[Session]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    backups_dir = bc.layout.backups
    before = entries(backups_dir)
    # Rate-limited to a crawl: it is still copying when it is cancelled.
    slow = backups_of(bc, catalog_store, max_rate="1M")
    job = threading.Thread(target=slow.scheduled_backup, name="backup job")
    job.start()
    wait_until(
        lambda: bool(entries(backups_dir) - before) and bool(processes_under(backups_dir)),
        timeout_s=30,
        what="pg_basebackup copying into a new backup directory",
    )

    assert slow.cancel("a failover of the cluster starting")
    wait_until(lambda: not job.is_alive(), timeout_s=30, what="the cancelled job ended")

    assert entries(backups_dir) == before  # the partial backup directory is gone
    assert processes_under(backups_dir) == set()  # pg_basebackup and its WAL streamer too
    with store.read(catalog_store[1]) as s:
        assert store.list_backups(s) == []
    assert cancelled_lines(caplog) == [f"{CANCELLED}: a failover of the cluster starting"]
    assert backup_errors(caplog) == []
    assert slow.in_flight is None
    assert not slow.cancel("nothing runs now")

    # The next backup, as the next schedule would take it, is whole and verified.
    backups_of(bc, catalog_store).scheduled_backup()
    with store.read(catalog_store[1]) as s:
        [taken] = store.list_backups(s)
        assert taken.verified_at is not None and taken.drill["passed"] is True
    assert partial_backups(backups_dir) == []


def test_a_backup_cancelled_during_its_drill_stops_the_scratch_instance_and_records_no_drill(
    bc: Stack,
    catalog_store: tuple[Settings, sessionmaker[Session]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    backups = backups_of(bc, catalog_store)
    assert backups.settings.scratch_dir == bc.layout.scratch
    scratch = bc.layout.scratch
    job = threading.Thread(target=backups.scheduled_backup, name="backup job")
    job.start()
    wait_until(
        lambda: any(p.name.startswith("drill-") for p in scratch.iterdir()),
        timeout_s=60,
        what="the drill restoring into its scratch directory",
    )

    assert backups.cancel("a switchover of the cluster starting")
    wait_until(lambda: not job.is_alive(), timeout_s=30, what="the cancelled job ended")

    assert entries(scratch) == set()  # no scratch directory left
    assert processes_under(scratch) == set()  # and no scratch instance
    assert cancelled_lines(caplog) == [f"{CANCELLED}: a switchover of the cluster starting"]
    assert backup_errors(caplog) == []
    # The backup had been taken and checked before the drill began: it stays, whole and in
    # the catalog, with no drill recorded (not a failed one): the next drill takes it.
    with store.read(catalog_store[1]) as s:
        [taken] = store.list_backups(s)
        assert taken.verified_at is None and "passed" not in taken.drill
        assert Path(taken.path, pitr.META_FILE).exists()
    assert partial_backups(bc.layout.backups) == []
    assert backups.drill().passed


def drill_in_flight(plane: ControlPlane) -> bool:
    """The scheduled job has taken its backup (it is in the catalog) and drills it now."""
    if plane.backups is None or plane.backups.in_flight is None:
        return False
    with store.read(plane.factory) as s:
        return any("at" not in b.drill for b in store.list_backups(s))


def failovers(plane: ControlPlane) -> list[str]:
    with store.read(plane.factory) as s:
        return [r.state for r in store.list_runs(s, incident_id=None, limit=10, action="failover")]


def test_a_scheduled_backup_running_when_the_primary_dies_is_cancelled_and_the_failover_succeeds(
    bc: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
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
        wait_until(lambda: drill_in_flight(plane), timeout_s=120, what="the backup's drill")
        inject("kill-primary", bc.layout.data_dir)  # every process of it, as a dying machine

        wait_until(
            lambda: "succeeded" in failovers(plane), timeout_s=120, what="a failover succeeded"
        )
        assert plane.backups is not None
        wait_until(
            lambda: plane.backups is not None and plane.backups.in_flight is None,
            timeout_s=60,
            what="the backup job ended",
        )
        assert wait_redundant(bc, timeout_s=120) != old
    finally:
        load.stop()
        plane.stop()

    assert failovers(plane) == ["succeeded"]
    assert cancelled_lines(caplog) == [f"{CANCELLED}: failover of shop-db-cluster starting"]
    assert backup_errors(caplog) == []
    assert entries(bc.layout.scratch) == set()  # the drill's scratch directory is gone
    assert processes_under(bc.layout.scratch) == set()  # and its instance
    assert partial_backups(bc.layout.backups) == []
    with store.read(plane.factory) as s:
        assert all("passed" not in b.drill for b in store.list_backups(s))  # no drill recorded
    wait_until(lambda: stack.prepared_count() == 0, timeout_s=90, what="no transaction in doubt")
    verified = verify_orders(stack, load.acknowledged(), before)
    assert verified["acknowledged"] > 10
    assert verified["lost"] == 0 and verified["duplicates"] == 0, verified
