"""PostgreSQL nodes for the lab: initdb, configuration, base backups, synchronous replication."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from lab.binaries import Binaries
from lab.errors import LabError
from lab.layout import HOST
from lab.process import ServerProcess, wait_until

SUPERUSER = "postgres"
SHOP_ROLE = "shop"
DATABASES = ("orders", "inventory")

LAB_CONF = """\
# Written by the lab. Node-specific settings (port, cluster_name) come on the command line.
listen_addresses = '{host}'
unix_socket_directories = ''
max_connections = 200
shared_buffers = '128MB'
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '512MB'
hot_standby = on
hot_standby_feedback = on
max_prepared_transactions = 100
archive_mode = on
archive_command = 'test ! -f {archive}/%f && cp %p {archive}/%f'
archive_timeout = 60
synchronous_commit = on
wal_receiver_status_interval = 1s
# A standby whose primary just died retries the connection every interval, and only looks at
# a promote request between retries: the default 5s would be added to every failover.
wal_retrieve_retry_interval = '200ms'
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
log_checkpoints = off
"""

HBA = """\
# Written by the lab: loopback only, trust (a lab on one machine; never expose it).
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""


def pg_os_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` OS user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise LabError(
            "running as root, but there is no `postgres` OS user to run PostgreSQL as: "
            "run `apt-get install -y postgresql` (it creates the user)"
        ) from None
    return SUPERUSER


def chown_to(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def connect(port: int, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=HOST,
        port=port,
        user=SUPERUSER,
        dbname=dbname,
        connect_timeout=2,
        autocommit=True,
        **kwargs,
    )


def is_accepting(port: int) -> bool:
    try:
        with connect(port) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def is_in_recovery(port: int) -> bool:
    with connect(port) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


@dataclass(slots=True)
class PgNode:
    """One PostgreSQL instance of the lab (`pg0`, `pg1`)."""

    name: str
    port: int
    data_dir: Path
    log_path: Path
    binaries: Binaries
    os_user: str | None

    def run_tool(self, tool: str, *args: str, timeout_s: float = 120) -> str:
        argv = [self.binaries.pg(tool), *args]
        done = subprocess.run(
            argv,
            user=self.os_user,
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise LabError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def server(self) -> ServerProcess:
        return ServerProcess(
            name=self.name,
            argv=[
                self.binaries.pg("postgres"),
                "-D",
                str(self.data_dir),
                "-c",
                f"port={self.port}",
                "-c",
                f"cluster_name={self.name}",
            ],
            log_path=self.log_path,
            ready=lambda: is_accepting(self.port),
            user=self.os_user,
            cwd=self.data_dir.parent,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back sessions, checkpoint, exit
            ready_timeout_s=60,
        )

    def init_primary(self, archive_dir: Path) -> None:
        self.run_tool(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--data-checksums",
        )
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write("\ninclude 'lab.conf'\n")
        (self.data_dir / "lab.conf").write_text(LAB_CONF.format(host=HOST, archive=archive_dir))
        (self.data_dir / "pg_hba.conf").write_text(HBA)
        for name in ("lab.conf", "pg_hba.conf"):
            chown_to(self.data_dir / name, self.os_user)

    def base_backup_from(self, source_port: int) -> None:
        """Clone the running primary into this node's data dir as a streaming standby."""
        self.run_tool(
            "pg_basebackup",
            "-h",
            HOST,
            "-p",
            str(source_port),
            "-U",
            SUPERUSER,
            "-D",
            str(self.data_dir),
            "-X",
            "stream",
            "-R",
            "--checkpoint=fast",
            "-d",
            f"application_name={self.name}",
            timeout_s=600,
        )


def create_shop_databases(port: int) -> None:
    with connect(port) as conn:
        if (
            conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SHOP_ROLE,)).fetchone()
            is None
        ):
            conn.execute(f"CREATE ROLE {SHOP_ROLE} LOGIN")
        for db in DATABASES:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                continue
            conn.execute(f"CREATE DATABASE {db} OWNER {SHOP_ROLE}")


def replication_state(primary_port: int) -> list[dict[str, Any]]:
    with connect(primary_port) as conn:
        cur = conn.execute("SELECT application_name, state, sync_state FROM pg_stat_replication")
        return [
            {"application_name": r[0], "state": r[1], "sync_state": r[2]} for r in cur.fetchall()
        ]


def enable_synchronous_replication(primary_port: int, standby_name: str, timeout_s: float) -> None:
    """Wait until `standby_name` streams, then make every commit wait for it."""

    def streaming() -> bool:
        return any(
            r["application_name"] == standby_name and r["state"] == "streaming"
            for r in replication_state(primary_port)
        )

    wait_until(streaming, timeout_s=timeout_s, what=f"{standby_name} streaming")
    with connect(primary_port) as conn:
        # '*' (FIRST 1 of any standby): whichever node is the standby after a failover counts.
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        conn.execute("SELECT pg_reload_conf()")

    def synchronous() -> bool:
        return any(
            r["application_name"] == standby_name and r["sync_state"] == "sync"
            for r in replication_state(primary_port)
        )

    wait_until(synchronous, timeout_s=timeout_s, what=f"{standby_name} synchronous")


def shop_url(database: str, ports: list[int]) -> str:
    """A multi-host URL: new connections go to whichever node accepts writes."""
    hosts = "&".join(f"host={HOST}:{port}" for port in ports)
    return f"postgresql+psycopg://{SHOP_ROLE}@/{database}?{hosts}&target_session_attrs=read-write"
