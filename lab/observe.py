"""A running lab stack seen from outside its control plane: stack.json and the servers
themselves (who leads, is the cluster redundant, are the shops ready, is anything in doubt)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import requests
from psycopg.conninfo import make_conninfo
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from controlplane import facts, store
from lab.errors import LabError
from lab.layout import notifications_file
from remediation.executors.processes import runs_program

CONNECT_TIMEOUT_S = 2
CLUSTER = "shop-db-cluster"  # the lab's cluster target (lab/targets.py)
_STATE_STORES: dict[Path, sessionmaker[Session]] = {}  # a stack's control plane's, opened once


def cluster_facts(data_dir: Path) -> dict[str, Any] | None:
    """What the stack's control plane knows of its cluster (its state store's facts), or None
    when it has none (no control plane in this stack, or it never started)."""
    path = data_dir / "controlplane" / "state.db"
    if not path.exists():
        return None
    factory = _STATE_STORES.get(path)
    if factory is None:
        factory = _STATE_STORES[path] = store.session_factory(
            store.make_engine(f"sqlite:///{path}")
        )
    try:
        found = facts.read(factory, CLUSTER)
    except SQLAlchemyError:  # not migrated yet, or being written: not known now
        return {}
    return {
        "version": found.version,
        "synchronous": found.synchronous,
        "leader": found.leader,
        "roles": dict(found.roles),
        "last_good_primary": found.last_good_primary,
    }


class NotALabStackError(LabError):
    """stack.json lacks the lab's marker: never inject faults into it."""


@dataclass(frozen=True, slots=True)
class StackView:
    data_dir: Path

    @classmethod
    def of(cls, data_dir: Path | str) -> StackView:
        """The stack in `data_dir`, refused unless the lab made it (`"lab": true`)."""
        view = cls(Path(data_dir).absolute())
        if view.description().get("lab") is not True:
            raise NotALabStackError(
                f'{view.stack_file} was not written by the lab (no "lab": true): refusing it'
            )
        return view

    @property
    def stack_file(self) -> Path:
        return self.data_dir / "stack.json"

    def description(self) -> dict[str, Any]:
        """Read afresh each time: the control plane records new pids and roles in it."""
        try:
            data: dict[str, Any] = json.loads(self.stack_file.read_text())
        except FileNotFoundError:
            raise LabError(f"no stack described at {self.stack_file}") from None
        return data

    def components(self) -> dict[str, dict[str, Any]]:
        comps: dict[str, dict[str, Any]] = self.description()["components"]
        return comps

    def pg_nodes(self) -> list[str]:
        return sorted(n for n, c in self.components().items() if "data_dir" in c)

    def shops(self) -> list[str]:
        return sorted(n for n, c in self.components().items() if c["role"] == "shop")

    def shop_urls(self) -> list[str]:
        urls: list[str] = self.description()["shop"]["instances"]
        return urls

    def port(self, component: str) -> int:
        port: int = self.components()[component]["port"]
        return port

    @property
    def api_url(self) -> str:
        return f"{self.components()['controlplane']['url']}/api/v1"

    @property
    def api_headers(self) -> dict[str, str]:
        token = self.description()["secrets"]["controlplane_api_token"]
        return {"Authorization": f"Bearer {token}"}

    def api_get(self, path: str) -> Any:
        response = requests.get(f"{self.api_url}{path}", headers=self.api_headers, timeout=10)
        response.raise_for_status()
        return response.json()

    # -- PostgreSQL ------------------------------------------------------------------------
    def dsn(self, node: str, dbname: str = "postgres") -> str:
        """The node's DSN from stack.json (the superuser; the password in the stack's
        pgpass file), for `dbname`."""
        return make_conninfo(self.components()[node]["dsn"], dbname=dbname)

    def connect(self, node: str, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.dsn(node, dbname), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True
        )

    @property
    def redis_url(self) -> str:
        url: str = self.description()["shop"]["redis_url"]  # with its password
        return url

    def node_state(self, node: str) -> tuple[str, int | None]:
        """('primary', timeline) | ('standby', received timeline) | ('down', None)."""
        try:
            with self.connect(node) as conn:
                conn.execute("SET statement_timeout = 2000")
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row and row[0]:
                    tli = conn.execute("SELECT received_tli FROM pg_stat_wal_receiver").fetchone()
                    return "standby", int(tli[0]) if tli and tli[0] else None
                wal = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
                return "primary", int(str(wal[0])[:8], 16) if wal else None
        except psycopg.Error:
            return "down", None

    def is_writable(self, node: str) -> bool:
        return self.node_state(node)[0] == "primary"

    def leader(self) -> str | None:
        primaries = [n for n in self.pg_nodes() if self.node_state(n)[0] == "primary"]
        return primaries[0] if len(primaries) == 1 else None

    def standby(self) -> str | None:
        """The node that is not the leader (whatever state it is in)."""
        lead = self.leader()
        others = [n for n in self.pg_nodes() if n != lead]
        return others[0] if lead is not None and len(others) == 1 else None

    def is_redundant(self) -> bool:
        """One primary, the other node streams its timeline synchronously, and the control
        plane's facts (its state store) say commits are synchronous again."""
        lead = self.leader()
        other = self.standby()
        if lead is None or other is None:
            return False
        _, timeline = self.node_state(lead)
        role, other_timeline = self.node_state(other)
        if role != "standby" or other_timeline != timeline:
            return False
        try:
            with self.connect(lead) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                ).fetchone()
        except psycopg.Error:
            return False
        if not (row and row[0]):
            return False
        known = cluster_facts(self.data_dir)  # no control plane: PostgreSQL's word alone
        return known is None or known.get("synchronous") is True

    def prepared_count(self) -> int:
        lead = self.leader()
        if lead is None:
            raise LabError("no single primary to count prepared transactions on")
        with self.connect(lead) as conn:
            row = conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()
        return int(row[0]) if row else 0

    def leader_db(self, dbname: str) -> psycopg.Connection[Any]:
        lead = self.leader()
        if lead is None:
            raise LabError("no single primary")
        return self.connect(lead, dbname)

    def orders_present(self, ids: Sequence[str]) -> dict[str, int]:
        """How many times each of `ids` is in the orders table (absent: not a key)."""
        with self.leader_db("orders") as conn:
            rows = conn.execute(
                "SELECT id::text, count(*) FROM orders WHERE id::text = ANY(%s) GROUP BY id",
                (list(ids),),
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    # -- the shops ---------------------------------------------------------------------------
    def is_shop_ready(self, url: str) -> bool:
        try:
            return requests.get(f"{url}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def shops_ready(self) -> bool:
        return all(self.is_shop_ready(url) for url in self.shop_urls())

    def is_whole(self) -> bool:
        """Full redundancy: a synchronous standby again and every shop ready."""
        return self.is_redundant() and self.shops_ready()

    # -- for a report --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What runs and what answers now, for a report of a stack that is not whole: each
        component's recorded role and whether its recorded process runs (`controlplane
        status`), each PostgreSQL node's role as it answers ("down" when it does not), each
        shop's readiness, and the control plane's `synchronous` fact."""
        description = self.description()
        components = {
            name: {
                "role": comp["role"],
                "pid": comp.get("pid"),
                "running": isinstance(comp.get("pid"), int)
                and runs_program(comp["pid"], comp.get("argv0", "")),
            }
            for name, comp in description["components"].items()
        }
        nodes = {}
        for node in self.pg_nodes():
            role, timeline = self.node_state(node)
            nodes[node] = {"answers_as": role, "timeline": timeline}
        return {
            "components": components,
            "pg_nodes": nodes,
            "leader": self.leader(),
            "redundant": self.is_redundant(),
            "shops_ready": {url: self.is_shop_ready(url) for url in self.shop_urls()},
            "facts": cluster_facts(self.data_dir),
        }

    def open_incidents(self) -> list[dict[str, Any]] | str:
        """The control plane's open incidents, in short; or why they could not be read."""
        try:
            found = self.api_get("/incidents?state=open&limit=100")["incidents"]
        except (requests.RequestException, ValueError, KeyError) as exc:
            return f"unreadable: {type(exc).__name__}: {exc}"
        keep = ("id", "kind", "target", "summary", "detected_at", "action_started_at")
        return [{k: i.get(k) for k in keep} for i in found]


def notifications(data_dir: Path | str) -> list[dict[str, Any]]:
    """What the stack's webhook recorder received, oldest first: each `{"received_at",
    "path", "body"}` (the control plane's notifications have the path `/controlplane`)."""
    try:
        text = notifications_file(Path(data_dir)).read_text()
    except FileNotFoundError:
        return []
    # Each record is one write ending in a newline: a line without one is still being written.
    return [json.loads(line) for line in text.split("\n")[:-1] if line]
