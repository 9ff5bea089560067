"""HostsStack: the shop on the multi-host lab's hosts, each service a unit of its host.

    db-1, db-2   a PostgreSQL node each (pg0 the first primary, pg1 its synchronous standby)
    app-1, app-2 a shop instance each (shop-0, shop-1)
    mon          Redis (the shared catalog cache)
    cp           the control plane (Restart=always), reaching the others only over SSH

The lab itself, in this namespace (the bridge's first address), stands for the operator's
machine: it provisions the hosts (initdb, a base backup, the schema), then starts each unit
through the host's systemctl. Prometheus and Alertmanager are not on `mon` yet: the control
plane's own probes drive every action here.

    shoplab up --hosts [--data-dir DIR]      shoplab down --data-dir DIR"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from lab import postgres as pg
from lab.binaries import Binaries, find_binaries
from lab.hosts.lab import HostsLab
from lab.hosts.net import HostNet
from lab.monitoring import http_ok, private_dir
from lab.process import is_port_open, wait_until
from lab.targets import toml_value, write_targets
from shop.config import ShopSettings
from shop.db import make_engine
from shop.schema import create_schema, seed_products

PG_PORT = 5432
SHOP_PORT = 8000
REDIS_PORT = 6379
CP_PORT = 8080
NODES = {"pg0": "db-1", "pg1": "db-2"}
SHOPS = {"shop-0": "app-1", "shop-1": "app-2"}
STACK_FILE = "hosts-stack.json"


@dataclass(slots=True)
class HostsStack:
    data_dir: Path
    products: int = 200
    stock: int = 100_000
    binaries: Binaries = field(default_factory=find_binaries)
    hosts: HostsLab = field(init=False)
    pg_auth: pg.PgAuth = field(init=False)
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    webhook_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    redis_password: str = field(default_factory=pg.new_password)

    def __post_init__(self) -> None:
        self.hosts = HostsLab(self.data_dir, HostNet.new())
        self.pg_auth = pg.PgAuth.generate(self.pg_root / "pgpass")

    # -- where things are ------------------------------------------------------------------------
    @property
    def pg_root(self) -> Path:
        return self.data_dir / "pg"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    def address(self, host: str) -> str:
        return self.hosts.address(host)

    def node_address(self, node: str) -> str:
        return self.address(NODES[node])

    def dsn(self, node: str, dbname: str = "postgres") -> str:
        return pg.dsn(PG_PORT, dbname, passfile=self.pg_auth.passfile, host=self.node_address(node))

    def primary_dsn(self, database: str) -> str:
        """Whichever node accepts writes (the in-doubt resolver follows a failover)."""
        return pg.writable_dsn(
            database,
            [(self.node_address(n), PG_PORT) for n in NODES],
            passfile=self.pg_auth.passfile,
        )

    def shop_url(self, database: str) -> str:
        return pg.shop_url(
            database,
            [PG_PORT] * len(NODES),
            self.pg_auth.shop_password,
            hosts=[self.node_address(n) for n in NODES],
        )

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@{self.address('mon')}:{REDIS_PORT}/0"

    def shop_base_url(self, shop: str) -> str:
        return f"http://{self.address(SHOPS[shop])}:{SHOP_PORT}"

    @property
    def controlplane_url(self) -> str:
        return f"http://{self.address('cp')}:{CP_PORT}"

    @property
    def targets_file(self) -> Path:
        return self.data_dir / "controlplane" / "targets.toml"

    def components(self) -> dict[str, dict[str, Any]]:
        """The executor's components: each unit, its host, and what a node's tools need."""
        comps: dict[str, dict[str, Any]] = {}
        for index, (node, host) in enumerate(NODES.items()):
            comps[node] = {
                "unit": f"postgresql-{node}.service",
                "host": host,
                "role": "primary" if index == 0 else "standby",
                "user": "postgres",
                "data_dir": str(self.pg_root / node),
                "log": str(self.logs / f"{node}.log"),
            }
        for shop, host in SHOPS.items():
            comps[shop] = {
                "unit": f"{shop}.service",
                "host": host,
                "log": str(self.logs / f"{shop}.log"),
            }
        comps["redis"] = {
            "unit": "redis.service",
            "host": "mon",
            "log": str(self.logs / "redis.log"),
        }
        return comps

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self) -> dict[str, Any]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o711)
        private_dir(self.logs)
        self.logs.chmod(0o711)  # each unit's user writes its own log in it
        self.hosts.up()
        try:
            self._postgres()
            self._redis()
            self._shops()
            self._controlplane()
        except BaseException:
            self.down()
            raise
        description = self.describe()
        (self.data_dir / STACK_FILE).write_text(json.dumps(description, indent=2))
        (self.data_dir / STACK_FILE).chmod(0o600)
        return description

    def _node(self, node: str) -> pg.PgNode:
        return pg.PgNode(
            name=node,
            port=PG_PORT,
            data_dir=self.pg_root / node,
            log_path=self.logs / f"{node}.log",
            binaries=self.binaries,
            os_user=pg.pg_os_user(),
            passfile=self.pg_auth.passfile,
            host=self.node_address(node),
            hba_networks=(str(self.hosts.net.subnet),),
        )

    def _node_unit(self, node: pg.PgNode) -> None:
        self.hosts.add_unit(
            NODES[node.name],
            f"postgresql-{node.name}.service",
            {
                "argv": [
                    self.binaries.pg("postgres"),
                    "-D",
                    str(node.data_dir),
                    "-c",
                    f"port={PG_PORT}",
                    "-c",
                    f"cluster_name={node.name}",
                    # Its own host's address (a base backup copies the primary's lab.conf).
                    "-c",
                    f"listen_addresses={node.host}",
                    # The failover's witness: an idle primary still speaks to its standby
                    # (a keepalive after 2 s of the standby's silence, which replies only
                    # every 10 s unless asked), so "heard from it within 4 s" means it lives.
                    "-c",
                    "wal_sender_timeout=4s",
                    "-c",
                    "wal_receiver_status_interval=10s",
                ],
                "user": node.os_user,
                "cwd": str(node.data_dir.parent),
                "log": str(node.log_path),
                "kill_signal": "SIGINT",
                "timeout_stop_s": 30,
                "restart": "no",  # the control plane decides when a node runs
            },
        )

    def _start_node(self, node: pg.PgNode) -> None:
        self._node_unit(node)
        self.hosts.systemctl(NODES[node.name], "start", f"postgresql-{node.name}.service")
        wait_until(
            lambda: pg.is_accepting(PG_PORT, self.pg_auth.passfile, node.host),
            timeout_s=60,
            what=f"{node.name} on {NODES[node.name]} accepting",
        )

    def _postgres(self) -> None:
        user = pg.pg_os_user()
        archive = self.pg_root / "wal_archive"
        for path in (self.pg_root, archive):
            private_dir(path)
            pg.chown_to(path, user)
        self.pg_auth.write_passfile(user)
        primary, standby = self._node("pg0"), self._node("pg1")
        for node in (primary, standby):
            node.log_path.touch()
            pg.chown_to(node.log_path, user)
        primary.init_primary(archive, self.pg_auth.superuser_password)
        self._start_node(primary)
        pg.create_shop_databases(PG_PORT, self.pg_auth, host=primary.host)
        settings_env = {"orders": self.shop_url("orders"), "inventory": self.shop_url("inventory")}
        settings = ShopSettings(
            orders_url=settings_env["orders"],
            inventory_url=settings_env["inventory"],
            redis_url=self.redis_url,
            instance_id="lab",
            admin_token=self.admin_token,
        )
        orders = make_engine(settings_env["orders"], settings, role="lab", with_deadline=False)
        inventory = make_engine(
            settings_env["inventory"], settings, role="lab", with_deadline=False
        )
        try:
            create_schema(orders, inventory)
            seed_products(inventory, count=self.products, stock=self.stock)
        finally:
            orders.dispose()
            inventory.dispose()
        standby.base_backup_from(PG_PORT, source_host=primary.host)
        self._start_node(standby)
        pg.enable_synchronous_replication(
            PG_PORT, standby.name, timeout_s=60, passfile=self.pg_auth.passfile, host=primary.host
        )

    def _redis(self) -> None:
        workdir = private_dir(self.data_dir / "redis")
        config = workdir / "redis.conf"
        pg.write_private(config, f"requirepass {self.redis_password}\n")
        address = self.address("mon")
        self.hosts.add_unit(
            "mon",
            "redis.service",
            {
                "argv": [
                    self.binaries.redis_server,
                    str(config),
                    "--port",
                    str(REDIS_PORT),
                    "--bind",
                    address,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                    "--daemonize",
                    "no",
                ],
                "log": str(self.logs / "redis.log"),
                "restart": "no",
            },
        )
        self.hosts.systemctl("mon", "start", "redis.service")
        wait_until(lambda: is_port_open(address, REDIS_PORT), timeout_s=20, what="redis on mon")

    def _shops(self) -> None:
        for index, (shop, host) in enumerate(SHOPS.items()):
            self.hosts.add_unit(
                host,
                f"{shop}.service",
                {
                    "argv": [
                        sys.executable,
                        "-m",
                        "gunicorn",
                        "-c",
                        "python:shop.gunicorn_conf",
                        "-b",
                        f"{self.address(host)}:{SHOP_PORT}",
                        "--worker-tmp-dir",
                        "/dev/shm",
                        "shop.wsgi:app",
                    ],
                    "env": {
                        "SHOP_ORDERS_URL": self.shop_url("orders"),
                        "SHOP_INVENTORY_URL": self.shop_url("inventory"),
                        "SHOP_REDIS_URL": self.redis_url,
                        "SHOP_INSTANCE_ID": f"shop-{index}",
                        "SHOP_ADMIN_TOKEN": self.admin_token,
                    },
                    "log": str(self.logs / f"{shop}.log"),
                    "restart": "on-failure",
                },
            )
            self.hosts.systemctl(host, "start", f"{shop}.service")
        for shop in SHOPS:
            url = f"{self.shop_base_url(shop)}/readyz"
            wait_until(lambda u=url: http_ok(u), timeout_s=60, what=f"{shop} ready")  # type: ignore[misc]

    def render_targets(self) -> str:
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("lab", "hosts"),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,  # TOML: `toml` quotes every value
        )
        env.filters["toml"] = toml_value
        shops = [
            {
                "name": shop,
                "instance": f"{self.address(host)}:{SHOP_PORT}",
                "url": self.shop_base_url(shop),
            }
            for shop, host in SHOPS.items()
        ]
        hosts = sorted({c["host"] for c in self.components().values()})
        return env.get_template("targets.toml.j2").render(
            state_db=f"sqlite:///{self.data_dir / 'controlplane' / 'state.db'}",
            cp_address=self.address("cp"),
            controlplane_port=CP_PORT,
            api_token=self.api_token,
            known_hosts=str(self.hosts.known_hosts),
            key_file=str(self.hosts.client_key),
            systemctl=self.hosts.systemctl_argv,
            tools_dir=str(Path(self.binaries.pg("postgres")).parent),
            passfile=str(self.pg_auth.passfile),
            hosts={h: {"address": self.address(h)} for h in hosts},
            components=self.components(),
            shops=shops,
            nodes={node: self.dsn(node) for node in NODES},
            primary={db: self.primary_dsn(db) for db in ("orders", "inventory", "postgres")},
            cache_url=self.redis_url,
        )

    def _controlplane(self) -> None:
        write_targets(self.targets_file, self.render_targets())
        self.hosts.add_unit(
            "cp",
            "controlplane.service",
            {
                "argv": [
                    sys.executable,
                    "-m",
                    "web.cli",
                    "serve",
                    "--targets",
                    str(self.targets_file),
                ],
                "env": {
                    "CP_API_TOKEN": self.api_token,
                    "CP_WEBHOOK_TOKEN": self.webhook_token,
                    "CP_ADMIN_PASSWORD": self.admin_password,
                    "CP_INSTANCE_ID": "cp-hosts",
                },
                "log": str(self.logs / "controlplane.log"),
                "restart": "always",
            },
        )
        self.hosts.systemctl("cp", "start", "controlplane.service")
        wait_until(
            lambda: http_ok(f"{self.controlplane_url}/readyz"),
            timeout_s=90,
            what="the control plane ready",
        )

    def describe(self) -> dict[str, Any]:
        return {
            "hosts": {h: self.address(h) for h in self.hosts.net.hosts},
            "nodes": {n: {"host": NODES[n], "dsn": self.dsn(n)} for n in NODES},
            "shops": {s: self.shop_base_url(s) for s in SHOPS},
            "controlplane": {"url": self.controlplane_url, "api_token": self.api_token},
            "redis": self.redis_url,
        }

    def down(self) -> list[str]:
        return self.hosts.down()
