"""A whole stack on loopback: start it in order, describe it in stack.json, stop it cleanly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from lab import postgres as pg
from lab.binaries import Binaries, find_binaries
from lab.errors import LabError
from lab.layout import HOST, StackLayout
from lab.monitoring import (
    ALERTMANAGER_USER,
    alertmanager_server,
    http_ok,
    private_dir,
    prometheus_server,
    redis_server,
    redis_url,
)
from lab.process import ServerProcess
from lab.receiver import CONTROLPLANE_PATH, receiver_server, receiver_url
from lab.supervisor import supervisor_server
from lab.targets import controlplane_targets, render_targets, write_targets
from remediation.executors.base import ExecutorError
from remediation.executors.lab import LabExecutor
from remediation.executors.local import running_pid, stop_signal
from remediation.executors.processes import (
    descendants,
    describe_processes,
    is_alive,
    is_pid_alive,
    kill_tree,
    process_table,
    runs_program,
    stop_tree,
    terminate_pid,
    under_directory,
)
from shop.config import ShopSettings
from shop.db import make_engine
from shop.schema import create_schema, seed_products

logger = logging.getLogger(__name__)

STACK_FILE_VERSION = 1
# Stop order: the control plane first (else it "heals" what is being stopped), clients before
# the servers they use; the primary before its standby so that
# the standby receives the primary's shutdown checkpoint.
# The receiver after every sender (its last words are recorded).
STOP_ORDER = (
    "controlplane",
    "shop",
    "prometheus",
    "alertmanager",
    "receiver",
    "cache",
    "primary",
    "standby",
)


@dataclass(slots=True)
class Stack:
    layout: StackLayout
    binaries: Binaries = field(default_factory=find_binaries)
    products: int = 1000
    stock: int = 100
    with_controlplane: bool = True
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    webhook_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    redis_password: str = field(default_factory=pg.new_password)
    alertmanager_password: str = field(default_factory=pg.new_password)
    pg_auth: pg.PgAuth = field(init=False)
    processes: dict[str, ServerProcess] = field(default_factory=dict)
    # What stands in for systemd (lab/supervisor.py): per supervised component, its process.
    supervisors: dict[str, ServerProcess] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, pg.PgNode] = field(default_factory=dict)
    started_at: str = ""
    # Per policy name, settings that replace the lab's defaults (benchmarks lift rate limits).
    policy_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pg_auth = pg.PgAuth.generate(self.layout.pgpass)

    # -- building blocks ---------------------------------------------------------------------
    def _node(self, index: int) -> pg.PgNode:
        name = f"pg{index}"
        return pg.PgNode(
            name=name,
            port=self.layout.pg_port(index),
            data_dir=self.layout.pg_data(index),
            log_path=self.layout.logs / f"{name}.log",
            binaries=self.binaries,
            os_user=pg.pg_os_user(),
            passfile=self.layout.pgpass,
        )

    @property
    def pg_ports(self) -> list[int]:
        return [self.layout.pg_port(0), self.layout.pg_port(1)]

    def dsn(self, node: str, dbname: str = "postgres") -> str:
        """The superuser's DSN for one node (`pg0`, `pg1`): its password from the pgpass file."""
        return self.pg_auth.dsn(self.layout.pg_port(int(node.removeprefix("pg"))), dbname)

    def connect(self, node: str, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(node, dbname), connect_timeout=2, autocommit=True)

    def shop_url(self, database: str, ports: list[int] | None = None) -> str:
        return pg.shop_url(database, ports or self.pg_ports, self.pg_auth.shop_password)

    @property
    def redis_url(self) -> str:
        return redis_url(self.layout, self.redis_password)

    @property
    def alertmanager_auth(self) -> tuple[str, str]:
        return (ALERTMANAGER_USER, self.alertmanager_password)

    def shop_env(self, index: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The SHOP_* variables of instance `index` (on top of the lab's own environment)."""
        env: dict[str, str] = {}
        env.update(
            {
                "SHOP_ORDERS_URL": self.shop_url("orders"),
                "SHOP_INVENTORY_URL": self.shop_url("inventory"),
                "SHOP_REDIS_URL": self.redis_url,
                "SHOP_INSTANCE_ID": f"shop-{index}",
                "SHOP_ADMIN_TOKEN": self.admin_token,
            }
        )
        env.update(extra or {})
        return env

    def shop_settings(self, index: int = 0, **overrides: Any) -> ShopSettings:
        env = self.shop_env(index)
        values: dict[str, Any] = {
            "orders_url": env["SHOP_ORDERS_URL"],
            "inventory_url": env["SHOP_INVENTORY_URL"],
            "redis_url": env["SHOP_REDIS_URL"],
            "instance_id": env["SHOP_INSTANCE_ID"],
            "admin_token": self.admin_token,
        }
        values.update(overrides)
        return ShopSettings(**values)

    def shop_server(
        self, index: int, *, port: int | None = None, extra_env: Mapping[str, str] | None = None
    ) -> ServerProcess:
        port = port or self.layout.shop_port(index)
        name = f"shop-{index}"
        return ServerProcess(
            name=name,
            argv=[
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "python:shop.gunicorn_conf",
                "-b",
                f"{HOST}:{port}",
                "--log-level",
                "info",
                "--worker-tmp-dir",
                "/dev/shm",
                "shop.wsgi:app",
            ],
            env_overrides=self.shop_env(index, extra_env),
            log_path=self.layout.logs / f"{name}.log",
            ready=lambda: http_ok(f"http://{HOST}:{port}/healthz"),
        )

    def _add(self, name: str, role: str, proc: ServerProcess) -> ServerProcess:
        self.processes[name] = proc
        self.roles[name] = role
        return proc

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        self.layout.check_ports_free()
        self.started_at = datetime.now(UTC).isoformat()
        # Others may pass through to what the postgres OS user must reach, never list it.
        self.layout.data_dir.chmod(0o711)
        private_dir(self.layout.logs)
        try:
            # First: whatever tells a human (the control plane's notifications) has a listener.
            self._add("receiver", "receiver", receiver_server(self.layout)).start()
            self._start_postgres()
            redis = redis_server(self.layout, self.binaries, password=self.redis_password)
            self._add("redis", "cache", redis).start()
            # Alertmanager first: Prometheus drops alerts sent before it found Alertmanager.
            am = alertmanager_server(
                self.layout,
                self.binaries,
                password=self.alertmanager_password,
                webhook_token=self.webhook_token,
            )
            self._add("alertmanager", "alertmanager", am).start()
            self.processes["redis"].wait_ready()
            self.processes["receiver"].wait_ready()
            am.wait_ready()
            prometheus = prometheus_server(
                self.layout,
                self.binaries,
                alertmanager_password=self.alertmanager_password,
                with_controlplane=self.with_controlplane,
            )
            self._add("prometheus", "prometheus", prometheus)
            self.processes["prometheus"].start()
            shops = [
                self._add(f"shop-{i}", "shop", self.shop_server(i)).start()
                for i in range(self.layout.shop_count)
            ]
            for proc in (*shops, self.processes["prometheus"]):
                proc.wait_ready()
            # The control plane reads stack.json (its executor's process table) from the start.
            write_stack_file(self.layout.stack_file, self.describe())
            if self.with_controlplane:
                self._add("controlplane", "controlplane", self.controlplane_server())
                self.processes["controlplane"].start().wait_ready()
                # Its supervisor reads the control plane's recipe and pid from stack.json.
                write_stack_file(self.layout.stack_file, self.describe())
                supervisor = supervisor_server(self.layout, "controlplane")
                self.supervisors["controlplane"] = supervisor.start().wait_ready()
        except BaseException:
            self.stop()
            raise
        description = self.describe()
        write_stack_file(self.layout.stack_file, description)
        return description

    @property
    def targets_file(self) -> Path:
        return self.layout.data_dir / "controlplane" / "targets.toml"

    def controlplane_server(self, extra_env: Mapping[str, str] | None = None) -> ServerProcess:
        secrets = {"shop_admin_token": self.admin_token, "redis_password": self.redis_password}
        if self.policy_overrides:  # a test's or a game day's limits: the table, changed
            targets = controlplane_targets(
                self.layout, **secrets, policy_overrides=self.policy_overrides
            )
            targets["controlplane"]["api_token"] = self.api_token
            write_targets(self.targets_file, targets)
        else:  # the rendered file itself, its comments kept
            write_targets(
                self.targets_file,
                render_targets(self.layout, **secrets, api_token=self.api_token),
            )
        url = f"http://{HOST}:{self.layout.controlplane_port}"
        return ServerProcess(
            name="controlplane",
            argv=[sys.executable, "-m", "web.cli", "serve", "--targets", str(self.targets_file)],
            env_overrides={
                "CP_API_TOKEN": self.api_token,
                "CP_WEBHOOK_TOKEN": self.webhook_token,
                "CP_ADMIN_PASSWORD": self.admin_password,
                "CP_INSTANCE_ID": "cp-lab",
                # What the control plane tells a human reaches the lab's recorder.
                "CP_NOTIFY_WEBHOOK_URL": receiver_url(self.layout, CONTROLPLANE_PATH),
                **(extra_env or {}),
            },
            log_path=self.layout.logs / "controlplane.log",
            ready=lambda: http_ok(f"{url}/readyz"),
            ready_timeout_s=60,
        )

    def _start_postgres(self) -> None:
        user = pg.pg_os_user()
        for path in (
            self.layout.pg_root,
            self.layout.wal_archive,
            self.layout.backups,
            self.layout.scratch,
        ):
            private_dir(path)
            pg.chown_to(path, user)
        _check_reachable_by(self.layout.pg_root, user)
        self.pg_auth.write_passfile(user)
        primary, standby = self._node(0), self._node(1)
        self.nodes = {primary.name: primary, standby.name: standby}
        for node in (primary, standby):
            _own_log(node.log_path, user)
        primary.init_primary(self.layout.wal_archive, self.pg_auth.superuser_password)
        self._add(primary.name, "primary", primary.server()).start().wait_ready()
        pg.create_shop_databases(primary.port, self.pg_auth)
        settings = self.shop_settings()
        orders = make_engine(
            self.shop_url("orders", [primary.port]), settings, role="lab", with_deadline=False
        )
        inventory = make_engine(
            self.shop_url("inventory", [primary.port]), settings, role="lab", with_deadline=False
        )
        try:
            create_schema(orders, inventory)
            seed_products(inventory, count=self.products, stock=self.stock)
        finally:
            orders.dispose()
            inventory.dispose()
        # The standby is cloned before synchronous mode is on: with it on and no standby,
        # every commit would wait forever.
        standby.base_backup_from(primary.port)
        self._add(standby.name, "standby", standby.server()).start().wait_ready()
        pg.enable_synchronous_replication(
            primary.port, standby.name, timeout_s=60, passfile=self.pg_auth.passfile
        )

    def restart(self, name: str) -> ServerProcess:
        """Start a stopped or killed component again and record its new pid in stack.json."""
        if name in self.supervisors:
            raise LabError(f"{name} has a supervisor: it starts {name} again, nobody else")
        proc = self.processes[name]
        proc.stop()
        proc.start().wait_ready()
        # Only this component's entry: the control plane may have recorded other pids since.
        assert proc.pid is not None
        LabExecutor(self.layout.stack_file).record_pid(name, proc.pid)
        return proc

    def stop(self) -> None:
        # The supervisors first: else they start again what is being stopped.
        for proc in self.supervisors.values():
            try:
                proc.stop()
            except Exception:
                logger.exception("stopping %s failed", proc.name)
        self._stop_restarted_controlplane()
        for proc in self._in_stop_order():
            try:
                proc.stop()
            except Exception:
                logger.exception("stopping %s failed", proc.name)
        # Processes the control plane restarted are not our children: stack.json knows them;
        # and what nobody recorded (a server an action was starting) is found under DIR.
        if self.layout.stack_file.exists():
            try:
                stop_described(self.layout.data_dir)
            except LabError:
                logger.exception("stopping the stack in %s failed", self.layout.data_dir)

    def _stop_restarted_controlplane(self) -> None:
        """A control plane its supervisor started again is not our child, yet it must stop
        before anything else (else it "heals" what is being stopped): by its recorded pid."""
        ours = self.processes.get("controlplane")
        try:
            recorded = running_components(read_stack_file(self.layout.data_dir))
        except (LabError, ValueError):
            return
        pid = recorded.get("controlplane")
        if pid is not None and (ours is None or pid != ours.pid):
            terminate_pid(pid, timeout_s=15)

    def _in_stop_order(self) -> list[ServerProcess]:
        rank = {role: i for i, role in enumerate(STOP_ORDER)}
        names = sorted(self.processes, key=lambda n: rank.get(self.roles.get(n, ""), -1))
        return [self.processes[n] for n in names]

    # -- description -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        components: dict[str, dict[str, Any]] = {}
        for name, proc in self.processes.items():
            port = self.layout.all_ports()[name]
            entry: dict[str, Any] = {
                "role": self.roles[name],
                "host": HOST,
                "port": port,
                "pid": proc.pid,
                "argv0": proc.argv[0],
                "log": str(proc.log_path),
                # How to start it again: what the control plane's lab executor runs.
                "start": {
                    "argv": list(proc.argv),
                    "env": dict(proc.env_overrides or {}),
                    "cwd": str(proc.cwd) if proc.cwd else None,
                    "user": proc.user,
                },
            }
            if name in self.nodes:
                entry["data_dir"] = str(self.nodes[name].data_dir)
                entry["dsn"] = self.pg_auth.dsn(port)
            elif name == "redis":
                entry["url"] = f"redis://{HOST}:{port}/0"  # its password: in `secrets`
            else:
                entry["url"] = f"http://{HOST}:{port}"
            components[name] = entry
        return {
            "version": STACK_FILE_VERSION,
            "lab": True,  # made by the lab: `shoplab chaos` refuses any other stack
            "data_dir": str(self.layout.data_dir),
            "base_port": self.layout.base_port,
            "started_at": self.started_at,
            "supervisor_pid": os.getpid(),
            "components": components,
            # Not components: nothing of the stack's, the control plane included, acts on them.
            "supervisors": {
                component: {
                    "pid": proc.pid,
                    "argv0": proc.argv[0],
                    "argv": list(proc.argv),
                    "log": str(proc.log_path),
                }
                for component, proc in self.supervisors.items()
            },
            "postgres": {
                "bin_dir": str(self.binaries.pg_bin),
                "os_user": pg.pg_os_user(),
                "passfile": str(self.pg_auth.passfile),
                "wal_archive": str(self.layout.wal_archive),
                "databases": list(pg.DATABASES),
            },
            "shop": {
                "orders_url": self.shop_url("orders"),
                "inventory_url": self.shop_url("inventory"),
                "redis_url": self.redis_url,
                "instances": [
                    f"http://{HOST}:{self.layout.shop_port(i)}"
                    for i in range(self.layout.shop_count)
                ],
            },
            "secrets": {
                "shop_admin_token": self.admin_token,
                "controlplane_api_token": self.api_token,
                "alertmanager_webhook_token": self.webhook_token,
                "controlplane_admin_password": self.admin_password,
                # PostgreSQL's roles (and the pgpass file every DSN above names), Redis's
                # requirepass, and Alertmanager's basic auth.
                "postgres_superuser_password": self.pg_auth.superuser_password,
                "postgres_shop_password": self.pg_auth.shop_password,
                "postgres_replication_password": self.pg_auth.replication_password,
                "pgpass": str(self.pg_auth.passfile),
                "redis_password": self.redis_password,
                "alertmanager_user": ALERTMANAGER_USER,
                "alertmanager_password": self.alertmanager_password,
            },
        }


def _own_log(path: Path, user: str | None) -> None:
    """A PostgreSQL node's log: its own (0600), though the lab opens it for the server."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    pg.chown_to(path, user)


def _check_reachable_by(path: Path, user: str | None) -> None:
    if user is None:
        return
    done = subprocess.run(["test", "-w", str(path)], user=user, check=False)
    if done.returncode != 0:
        raise LabError(
            f"the {user} OS user cannot write {path}: every parent directory must be "
            "traversable by it (choose a --data-dir such as /tmp/shop-lab or one under /var/tmp)"
        )


def write_stack_file(path: Path, description: Mapping[str, Any]) -> None:
    """Atomically, readable by its owner only: it holds the stack's tokens."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(description, fh, indent=2)
    os.replace(tmp, path)


def read_stack_file(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "stack.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no stack described at {path}: is a stack running there?") from None
    return data


def running_components(description: Mapping[str, Any]) -> dict[str, int]:
    """Components whose recorded pid is alive and still runs the recorded program; else the
    one process started from the component's own command line by its user, if there is one:
    a control plane that keeps its own recipes (the `local` executor) restarts a component
    without recording it here, and `down` must stop it all the same."""
    alive: dict[str, int] = {}
    for name, comp in description.get("components", {}).items():
        try:
            pid = running_pid(comp)
        except ExecutorError:  # its user is gone: nothing of it can run as that user
            continue
        if pid is not None:
            alive[name] = pid
    return alive


def running_supervisors(description: Mapping[str, Any]) -> dict[str, int]:
    """Per supervised component, its supervisor's pid, if that process is alive."""
    alive: dict[str, int] = {}
    for component, entry in description.get("supervisors", {}).items():
        pid = entry.get("pid")
        if isinstance(pid, int) and runs_program(pid, entry.get("argv0", "")):
            alive[component] = pid
    return alive


def stop_described(data_dir: Path, *, timeout_s: float = 20) -> list[str]:
    """`shoplab down`: leave nothing of the stack described in DIR/stack.json running,
    whatever its control plane is doing. The control plane first, waited for (its actions end
    with it); then every recorded component, cleanly, in order; then whatever is left is
    killed: what the recorded processes started, and every process working in DIR or naming a
    path below it (a PostgreSQL an action was starting, a pg_basebackup). Returns the
    components stopped; raises LabError naming any process that survived SIGKILL."""
    description = read_stack_file(data_dir)
    # The supervisors first: else they start again what is being stopped.
    for pid in running_supervisors(description).values():
        terminate_pid(pid, timeout_s=timeout_s)
    alive = running_components(description)
    # Taken before anything stops: an orphan is re-parented, no longer found from its parent.
    remembered = descendants(alive.values(), process_table())
    stopped = []
    for name in sorted(n for n in alive if description["components"][n]["role"] == "controlplane"):
        terminate_pid(alive[name], timeout_s=timeout_s)
        stopped.append(name)
    # Read again: until it exited, the control plane's actions may have recorded new pids.
    description = read_stack_file(data_dir)
    comps = description["components"]
    alive = {n: pid for n, pid in running_components(description).items() if n not in stopped}
    remembered |= descendants(alive.values(), process_table())
    rank = {role: i for i, role in enumerate(STOP_ORDER)}
    for name in sorted(alive, key=lambda n: rank.get(comps[n]["role"], -1)):
        role = comps[name]["role"]
        data = comps[name].get("data_dir")
        stop_tree(alive[name], sig=stop_signal(role), timeout_s=timeout_s, data_dir=data)
        stopped.append(name)
    supervisor = description.get("supervisor_pid")
    spare = [supervisor] if isinstance(supervisor, int) else []
    find = under_directory(data_dir.absolute(), spare=spare)
    leftovers = {proc for proc in remembered if is_alive(proc)} | find(process_table())
    survivors = set()
    if leftovers:
        logger.warning("killing what is left of the stack: %s", describe_processes(leftovers))
        survivors = kill_tree(leftovers, find=find)
    if isinstance(supervisor, int) and supervisor != os.getpid() and is_pid_alive(supervisor):
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
    if survivors:
        raise LabError(f"these survived SIGKILL: {describe_processes(survivors)}")
    return stopped


def ensure_not_running(data_dir: Path) -> None:
    """Refuse a directory whose stack still runs (checked before ports: the clearer error)."""
    if (data_dir / "stack.json").exists():
        alive = running_components(read_stack_file(data_dir))
        if alive:
            raise LabError(
                f"a stack is already running in {data_dir} ({', '.join(sorted(alive))}): "
                f"run `shoplab down --data-dir {data_dir}` first"
            )


def prepare_data_dir(data_dir: Path) -> None:
    """Clear a stale stack's directory (never a foreign one) and make it reachable."""
    ensure_not_running(data_dir)
    if data_dir.exists() and any(data_dir.iterdir()):
        if not (data_dir / "stack.json").exists() and not (data_dir / "pg").exists():
            raise LabError(f"{data_dir} is not empty and holds no lab stack: choose another")
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o711)  # the postgres OS user passes through to DIR/pg; nobody lists DIR


def wait_forever(stack: Stack, *, poll_s: float = 1.0) -> None:
    """Stay in the foreground until SIGINT/SIGTERM, saying when a component dies and when it
    runs again (whoever started it: the control plane, or the control plane's supervisor),
    as stack.json records them."""
    reported: set[str] = set()
    while True:
        try:
            description = read_stack_file(stack.layout.data_dir)
        except (LabError, ValueError):  # being replaced: look again
            description = {}
        alive = running_components(description)
        for name, comp in description.get("components", {}).items():
            if name not in reported and name not in alive:
                reported.add(name)
                logger.error("%s is not running (log: %s)", name, comp.get("log"))
            elif name in reported and name in alive:
                reported.discard(name)
                logger.info("%s runs again (pid %d)", name, alive[name])
        time.sleep(poll_s)
