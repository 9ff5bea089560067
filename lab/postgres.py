"""PostgreSQL nodes for the lab: initdb, configuration, base backups, synchronous replication."""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from lab.binaries import Binaries
from lab.errors import LabError
from lab.layout import HOST
from lab.process import ServerProcess, wait_until

SUPERUSER = "postgres"
SHOP_ROLE = "shop"
REPLICATION_ROLE = "replicator"
DATABASES = ("orders", "inventory")

ARCHIVE_COMMAND = (
    "if test -f {archive}/%f; then cmp -s %p {archive}/%f;"
    " else cp %p {archive}/%f.tmp && mv {archive}/%f.tmp {archive}/%f; fi"
)
LAB_CONF = """\
# Written by the lab. Node-specific settings (port, cluster_name) come on the command line.
listen_addresses = '{host}'
unix_socket_directories = ''
password_encryption = 'scram-sha-256'
max_connections = 200
shared_buffers = '128MB'
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
# What a standby that was away may still stream. Not more: PostgreSQL 15's pg_rewind copies
# every WAL file the new leader has (skipping those before the fork comes in 16), so each
# megabyte kept here is copied, and flushed, on the way to redundancy after every failover.
# At ~3.5 MB/s of WAL (4 clients ordering, full-page writes after a checkpoint) this is
# ~20 s away (a hung or dead standby is fenced and started again within seconds); one away
# longer cannot stream again and is rebuilt from a base backup (the rebuild-standby policy).
wal_keep_size = '64MB'
min_wal_size = '32MB'
hot_standby = on
hot_standby_feedback = on
max_prepared_transactions = 100
archive_mode = on
# Atomic (a full disk leaves a .tmp, never a partial segment under its name, which would fail
# every later attempt) and idempotent (a segment already there whole is done: after a crash
# between the copy and PostgreSQL's note of it, or on the promoted standby).
archive_command = '{archive_command}'
archive_timeout = 60
synchronous_commit = on
wal_receiver_status_interval = 1s
# A standby whose primary just died retries the connection every interval, and only looks at
# a promote request between retries: the default 5s would be added to every failover, and
# 200ms was still 0.2 s of it in half the failovers measured (bench/failover.py).
wal_retrieve_retry_interval = '50ms'
# A start after a crash or a pg_rewind flushes the data directory first: one syncfs() rather
# than an fsync() a file (thousands, each a journal commit on a busy disk).
recovery_init_sync_method = syncfs
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
log_checkpoints = off
"""

HBA = """\
# Written by the lab: loopback only, and nobody is trusted: a password (SCRAM) for every
# connection, replication included. The passwords are in the stack's pgpass file.
local all all scram-sha-256
local replication all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
"""


def hba(networks: tuple[str, ...]) -> str:
    """HBA, and the same rules for each of `networks` (the multi-host lab's subnet)."""
    return HBA + "".join(
        f"host all all {net} scram-sha-256\nhost replication all {net} scram-sha-256\n"
        for net in networks
        if net != "127.0.0.1/32"
    )


def new_password() -> str:
    return secrets.token_hex(24)  # hex: nothing to escape in a URL, a conninfo or pgpass


@dataclass(frozen=True, slots=True)
class PgAuth:
    """A stack's PostgreSQL passwords, and the pgpass file every client of it reads them from
    (`passfile=` in each DSN, or PGPASSFILE): the superuser, the shop's role, replication."""

    passfile: Path
    superuser_password: str
    shop_password: str
    replication_password: str

    @classmethod
    def generate(cls, passfile: Path) -> PgAuth:
        return cls(passfile, new_password(), new_password(), new_password())

    def pgpass(self) -> str:
        # Any port: a scratch instance restored from a backup keeps the same roles; any host:
        # the multi-host lab's nodes each have an address of their own.
        return "".join(
            f"*:*:*:{user}:{password}\n"
            for user, password in (
                (SUPERUSER, self.superuser_password),
                (SHOP_ROLE, self.shop_password),
                (REPLICATION_ROLE, self.replication_password),
            )
        )

    def write_passfile(self, owner: str | None) -> None:
        """0600 (libpq ignores a pgpass that others may read), owned by the OS user that runs
        PostgreSQL's tools: its pg_basebackup, pg_rewind and walreceiver read it; root reads
        it anyway."""
        write_private(self.passfile, self.pgpass(), owner)

    def dsn(self, port: int, dbname: str = "postgres", **extra: Any) -> str:
        return dsn(port, dbname, passfile=self.passfile, **extra)


def write_private(path: Path, text: str, owner: str | None = None) -> None:
    """A file only its owner may read, never readable by anyone else, even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    chown_to(tmp, owner)
    os.replace(tmp, path)


def dsn(
    port: int | str,
    dbname: str = "postgres",
    *,
    passfile: Path,
    user: str = SUPERUSER,
    **extra: Any,
) -> str:
    params = {"host": HOST, "port": port, "user": user, "dbname": dbname}
    return make_conninfo(**{**params, **extra, "passfile": str(passfile)})


def writable_dsn(
    database: str, nodes: list[tuple[str, int]], *, passfile: Path, user: str = SUPERUSER
) -> str:
    """Whichever of `nodes` (address, port) accepts writes: a reader that follows a
    failover (the in-doubt resolver, the invariants probe)."""
    return dsn(
        ",".join(str(port) for _, port in nodes),
        database,
        passfile=passfile,
        user=user,
        host=",".join(address for address, _ in nodes),
        target_session_attrs="read-write",
    )


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


def connect(
    port: int, dbname: str = "postgres", *, passfile: Path, host: str = HOST, **kwargs: Any
) -> psycopg.Connection[Any]:
    return psycopg.connect(
        dsn(port, dbname, passfile=passfile, host=host),
        connect_timeout=2,
        autocommit=True,
        **kwargs,
    )


def is_accepting(port: int, passfile: Path, host: str = HOST) -> bool:
    try:
        with connect(port, passfile=passfile, host=host) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def is_in_recovery(port: int, passfile: Path) -> bool:
    with connect(port, passfile=passfile) as conn:
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
    passfile: Path
    host: str = HOST  # the address it listens on (a host's, in the multi-host lab)
    hba_networks: tuple[str, ...] = ("127.0.0.1/32",)  # whom it lets in (with a password)

    def run_tool(self, tool: str, *args: str, timeout_s: float = 120) -> str:
        argv = [self.binaries.pg(tool), *args]
        done = subprocess.run(
            argv,
            user=self.os_user,
            env={**os.environ, "PGPASSFILE": str(self.passfile)},
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
            ready=lambda: is_accepting(self.port, self.passfile),
            user=self.os_user,
            cwd=self.data_dir.parent,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back sessions, checkpoint, exit
            ready_timeout_s=60,
        )

    def init_primary(self, archive_dir: Path, superuser_password: str) -> None:
        # The password goes in a file (never on a command line, which `ps` shows to anyone),
        # next to the data directory, and is gone once initdb has read it.
        pwfile = self.data_dir.parent / f".{self.name}.pwfile"
        write_private(pwfile, superuser_password + "\n", self.os_user)
        try:
            self.run_tool(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--data-checksums",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write("\ninclude 'lab.conf'\n")
        (self.data_dir / "lab.conf").write_text(
            LAB_CONF.format(
                host=self.host, archive_command=ARCHIVE_COMMAND.format(archive=archive_dir)
            )
        )
        (self.data_dir / "pg_hba.conf").write_text(hba(self.hba_networks))
        for name in ("lab.conf", "pg_hba.conf"):
            chown_to(self.data_dir / name, self.os_user)

    def base_backup_from(self, source_port: int, source_host: str = HOST) -> None:
        """Clone the running primary into this node's data dir as a streaming standby, as the
        replication role (`-R` writes its conninfo, passfile included, for the walreceiver)."""
        source = dsn(
            source_port,
            passfile=self.passfile,
            user=REPLICATION_ROLE,
            application_name=self.name,
            host=source_host,
        )
        self.run_tool(
            "pg_basebackup",
            "-d",
            source,
            "-D",
            str(self.data_dir),
            "-X",
            "stream",
            "-R",
            "--checkpoint=fast",
            timeout_s=600,
        )


def create_shop_databases(port: int, auth: PgAuth, host: str = HOST) -> None:
    """The shop's role and databases, and the replication role, each with its password (the
    server keeps only its SCRAM verifier: `password_encryption`)."""
    with connect(port, passfile=auth.passfile, host=host) as conn:
        for role, password, options in (
            (SHOP_ROLE, auth.shop_password, "LOGIN"),
            (REPLICATION_ROLE, auth.replication_password, "LOGIN REPLICATION"),
        ):
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL("{} ROLE {} {} PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(role), sql.SQL(options), sql.Literal(password)
                )
            )
        for db in DATABASES:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                continue
            conn.execute(f"CREATE DATABASE {db} OWNER {SHOP_ROLE}")


def replication_state(primary_port: int, passfile: Path, host: str = HOST) -> list[dict[str, Any]]:
    with connect(primary_port, passfile=passfile, host=host) as conn:
        cur = conn.execute("SELECT application_name, state, sync_state FROM pg_stat_replication")
        return [
            {"application_name": r[0], "state": r[1], "sync_state": r[2]} for r in cur.fetchall()
        ]


def enable_synchronous_replication(
    primary_port: int, standby_name: str, timeout_s: float, *, passfile: Path, host: str = HOST
) -> None:
    """Wait until `standby_name` streams, then make every commit wait for it."""

    def streaming() -> bool:
        return any(
            r["application_name"] == standby_name and r["state"] == "streaming"
            for r in replication_state(primary_port, passfile, host)
        )

    wait_until(streaming, timeout_s=timeout_s, what=f"{standby_name} streaming")
    with connect(primary_port, passfile=passfile, host=host) as conn:
        # '*' (FIRST 1 of any standby): whichever node is the standby after a failover counts.
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        conn.execute("SELECT pg_reload_conf()")

    def synchronous() -> bool:
        return any(
            r["application_name"] == standby_name and r["sync_state"] == "sync"
            for r in replication_state(primary_port, passfile, host)
        )

    wait_until(synchronous, timeout_s=timeout_s, what=f"{standby_name} synchronous")


def shop_url(database: str, ports: list[int], password: str, hosts: list[str] | None = None) -> str:
    """A multi-host URL: new connections go to whichever node accepts writes. The shop is a
    service of its own: its password is in its URL, not in the lab's pgpass file."""
    addresses = hosts or [HOST] * len(ports)
    hosts_q = "&".join(f"host={a}:{port}" for a, port in zip(addresses, ports, strict=True))
    return (
        f"postgresql+psycopg://{SHOP_ROLE}:{password}@/{database}?{hosts_q}"
        "&target_session_attrs=read-write"
    )
