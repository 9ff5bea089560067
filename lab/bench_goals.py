"""Each benchmark's figures against their goals, in one table.

A benchmark run with `--figures PATH` writes its headline figures there (a JSON list of
`Figure`s, each with its goal); `make bench` runs them all into one directory and then

    .venv/bin/python -m lab.bench_goals bench/out

prints one table of every figure beside its goal, and which are met. A benchmark that did not
finish leaves no file: the table names it missing rather than passing over it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# The benchmarks `make bench` runs, in its order: a missing file is a benchmark that failed.
BENCHES = (
    "orders",
    "catalog",
    "controlplane",
    "failover",
    "hang",
    "persist",
    "restore",
    "flood",
    "scale",
    "dashboard",
)


@dataclass(frozen=True, slots=True)
class Figure:
    bench: str
    what: str
    value: float
    unit: str  # "s", "ms", "x", "/s", "" …
    goal: str  # as a reader would write it: "< 3 s", ">= 0.6x", "0"
    met: bool | None  # None: a figure reported for context, with no goal of its own


def below(value: float, limit: float) -> bool:
    return value < limit


def at_most(value: float, limit: float) -> bool:
    return value <= limit


def at_least(value: float, limit: float) -> bool:
    return value >= limit


def save(path: Path | None, figures: list[Figure]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(f) for f in figures], indent=2))


def load(directory: Path) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    missing = []
    for bench in BENCHES:
        path = directory / f"{bench}.json"
        if not path.exists():
            missing.append(bench)
            continue
        figures.extend(Figure(**row) for row in json.loads(path.read_text()))
    return figures, missing


def shown(value: float, unit: str) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return "none"
    if abs(value) >= 100 or float(value).is_integer():
        number = f"{value:,.0f}"
    elif abs(value) >= 10:
        number = f"{value:.1f}"
    else:
        number = f"{value:.2f}"
    return f"x{number}" if unit == "x" else f"{number} {unit}".rstrip()


def table(figures: list[Figure], missing: list[str]) -> str:
    lines = ["| bench | figure | value | goal | met? |", "|---|---|---|---|---|"]
    for f in figures:
        met = "" if f.met is None else ("yes" if f.met else "**no**")
        lines.append(f"| {f.bench} | {f.what} | {shown(f.value, f.unit)} | {f.goal} | {met} |")
    for bench in missing:
        lines.append(f"| {bench} | (no figures: the benchmark did not finish) | | | **no** |")
    goals = [f for f in figures if f.met is not None]
    met_count = sum(1 for f in goals if f.met)
    lines.append("")
    lines.append(
        f"{met_count} of {len(goals)} goals met; {len(missing)} benchmarks without figures."
    )
    return "\n".join(lines)


def main() -> int:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/out")
    figures, missing = load(directory)
    print(table(figures, missing))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
