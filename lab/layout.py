"""Where a stack lives: its ports (derived from one base port) and its directories."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError, PortInUseError
from lab.process import is_port_free

HOST = "127.0.0.1"
PORTS_PER_STACK = 20
SHOP_PORT_OFFSET = 10


@dataclass(frozen=True, slots=True)
class StackLayout:
    data_dir: Path
    base_port: int
    shop_count: int = 2

    def __post_init__(self) -> None:
        if not 1024 <= self.base_port <= 65535 - PORTS_PER_STACK:
            raise LabError(f"--base-port must be between 1024 and {65535 - PORTS_PER_STACK}")
        if not 1 <= self.shop_count <= PORTS_PER_STACK - SHOP_PORT_OFFSET:
            raise LabError("shop_count must be between 1 and 10")

    # ports
    def pg_port(self, index: int) -> int:
        return self.base_port + index

    @property
    def redis_port(self) -> int:
        return self.base_port + 2

    @property
    def prometheus_port(self) -> int:
        return self.base_port + 3

    @property
    def alertmanager_port(self) -> int:
        return self.base_port + 4

    @property
    def controlplane_port(self) -> int:
        return self.base_port + 5

    @property
    def receiver_port(self) -> int:
        return self.base_port + 6

    def shop_port(self, index: int) -> int:
        return self.base_port + SHOP_PORT_OFFSET + index

    def all_ports(self) -> dict[str, int]:
        ports = {
            "pg0": self.pg_port(0),
            "pg1": self.pg_port(1),
            "redis": self.redis_port,
            "prometheus": self.prometheus_port,
            "alertmanager": self.alertmanager_port,
            "controlplane": self.controlplane_port,
            "receiver": self.receiver_port,
        }
        ports.update({f"shop-{i}": self.shop_port(i) for i in range(self.shop_count)})
        return ports

    # directories
    @property
    def pg_root(self) -> Path:
        return self.data_dir / "pg"

    def pg_data(self, index: int) -> Path:
        return self.pg_root / f"pg{index}"

    @property
    def wal_archive(self) -> Path:
        return self.pg_root / "wal_archive"

    @property
    def backups(self) -> Path:
        return self.pg_root / "backups"

    @property
    def scratch(self) -> Path:
        return self.pg_root / "scratch"

    @property
    def pgpass(self) -> Path:
        """The passwords of the stack's PostgreSQL roles (libpq's pgpass format, 0600)."""
        return self.pg_root / "pgpass"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def stack_file(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def notifications(self) -> Path:
        """What the lab's webhook recorder received, one JSON line each (0600)."""
        return notifications_file(self.data_dir)

    @property
    def gamedays(self) -> Path:
        """Game-day reports, one JSON file per run: the control plane's dashboard reads them."""
        return gamedays_dir(self.data_dir)

    def check_ports_free(self) -> None:
        taken = [
            f"{name} ({port})"
            for name, port in self.all_ports().items()
            if not is_port_free(HOST, port)
        ]
        if taken:
            raise PortInUseError(
                f"ports already in use on {HOST}: {', '.join(taken)}; "
                "choose another --base-port or stop what is listening there"
            )


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_ports(path: Path = EPHEMERAL_RANGE_FILE) -> range:
    """The ports the kernel hands out to outgoing connections. A server whose port lies in it
    can lose that port while it is down (restarted, failed over) to any client's connect(),
    and then fails to start: "could not bind ... Address already in use"."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def find_free_base_port(*, low: int = 20000, high: int = 40000, attempts: int = 200) -> int:
    """A base port whose whole block of PORTS_PER_STACK ports is free right now, and outside
    the kernel's ephemeral range (`ephemeral_ports`)."""
    rng = random.Random()
    ephemeral = ephemeral_ports()
    bases = [
        base
        for base in range(low, high - PORTS_PER_STACK + 1, PORTS_PER_STACK)
        if base + PORTS_PER_STACK - 1 < ephemeral.start or base > ephemeral.stop - 1
    ]
    if not bases:
        raise PortInUseError(
            f"every port between {low} and {high} is in the kernel's ephemeral range "
            f"({ephemeral.start}-{ephemeral.stop - 1})"
        )
    for _ in range(attempts):
        base = rng.choice(bases)
        if all(is_port_free(HOST, base + i) for i in range(PORTS_PER_STACK)):
            return base
    raise PortInUseError(f"no free block of {PORTS_PER_STACK} ports between {low} and {high}")


def gamedays_dir(data_dir: Path) -> Path:
    return data_dir / "gamedays"


def notifications_file(data_dir: Path) -> Path:
    return data_dir / "notifications.jsonl"
