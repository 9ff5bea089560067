"""Finding the server binaries the lab runs, with the apt command that installs a missing one."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lab.errors import MissingBinaryError

MIN_POSTGRES_MAJOR = 15


@dataclass(frozen=True, slots=True)
class Binaries:
    pg_bin: Path
    redis_server: str
    prometheus: str
    promtool: str
    alertmanager: str

    def pg(self, tool: str) -> str:
        return str(self.pg_bin / tool)


def _which(names: tuple[str, ...], package: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise MissingBinaryError(
        f"{names[0]} is not installed: run `apt-get install -y {package}` (or `make setup`)"
    )


def find_postgres_bin(root: Path = Path("/usr/lib/postgresql")) -> Path:
    majors = sorted(
        (int(p.name), p / "bin")
        for p in root.glob("*")
        if re.fullmatch(r"\d+", p.name) and (p / "bin" / "postgres").exists()
    )
    usable = [(major, path) for major, path in majors if major >= MIN_POSTGRES_MAJOR]
    if not usable:
        raise MissingBinaryError(
            f"PostgreSQL >= {MIN_POSTGRES_MAJOR} server binaries not found under {root}: "
            "run `apt-get install -y postgresql` (or `make setup`)"
        )
    return usable[-1][1]


def find_binaries() -> Binaries:
    return Binaries(
        pg_bin=find_postgres_bin(),
        redis_server=_which(("redis-server",), "redis-server"),
        prometheus=_which(("prometheus",), "prometheus"),
        promtool=_which(("promtool",), "prometheus"),
        alertmanager=_which(("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager"),
    )
