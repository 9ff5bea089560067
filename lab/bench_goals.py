"""Every benchmark's figures judged against bench/goals.toml, in one table, for one run.

A benchmark run with `--figures PATH` writes its headline figures there: ids, values and units
(`save`), with the commit it ran on; it never says whether a goal is met. `make bench` marks
the start of a run, runs every benchmark into one directory, then makes the table:

    .venv/bin/python -m lab.bench_goals --start bench/out     # the commit, date, load, nproc
    .venv/bin/python -m lab.bench_goals bench/out             # the table, and TABLE.md

Every verdict is computed here, from the figure and the goal file. A goal with no figure (its
benchmark left no file, or the file lacks that figure), a figure that is not a number or not
in the goal's unit, and figures from another commit than the run's are failures named in the
table. The exit status is 0 only when every goal is met.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

REPO = Path(__file__).resolve().parent.parent
GOALS_FILE = REPO / "bench" / "goals.toml"
RUN_FILE = "RUN.json"
TABLE_FILE = "TABLE.md"

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
    "ssh",
    "hosts",
)


class Op(StrEnum):
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="


COMPARE: dict[Op, Callable[[float, float], bool]] = {
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
    Op.EQ: operator.eq,
}


class Goal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    figure: str  # `<bench>.<name>`, as the bench's headline writes it
    name: str
    op: Op
    bound: float
    unit: str = ""
    note: str = ""

    @field_validator("figure")
    @classmethod
    def _of_a_bench(cls, figure: str) -> str:
        if bench_of(figure) not in BENCHES:
            raise ValueError(f"{figure!r} names no benchmark (one of {', '.join(BENCHES)})")
        return figure

    def holds(self, value: float) -> bool:
        return COMPARE[self.op](value, self.bound)

    def shown(self) -> str:
        return f"{self.op} {shown(self.bound, self.unit)}"


class GoalsFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    goal: list[Goal] = []
    # The game days' objectives (lab/verdict.py reads and checks them).
    gameday: dict[str, Any] = {}


def bench_of(figure_id: str) -> str:
    return figure_id.split(".", 1)[0]


def load_goals(path: Path = GOALS_FILE) -> list[Goal]:
    goals = GoalsFile.model_validate(tomllib.loads(path.read_text())).goal
    seen: set[str] = set()
    for goal in goals:
        if goal.id in seen:
            raise ValueError(f"{path}: goal {goal.id!r} appears twice")
        seen.add(goal.id)
    return goals


def goal(goal_id: str, path: Path = GOALS_FILE) -> Goal:
    """One goal, for a benchmark that draws or prints it (never to judge a figure)."""
    found = [g for g in load_goals(path) if g.id == goal_id]
    if not found:
        raise KeyError(f"no goal {goal_id!r} in {path}")
    return found[0]


# -- what a benchmark writes ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Figure:
    id: str  # `<bench>.<name>`; bench/goals.toml refers to it
    value: float
    unit: str  # "s", "ms", "x", "/s", "" …
    what: str = ""  # as a reader would name it (for figures shown without a goal)


def git(*argv: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.rstrip()  # porcelain lines begin with a space: keep it


def checkout() -> dict[str, Any]:
    """The commit the code runs from, and the files changed beside it (ignored ones aside)."""
    changed = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": [line[3:] for line in changed.splitlines()],
    }


def save(path: Path | None, figures: Sequence[Figure]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        **checkout(),
        "at": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "figures": [asdict(f) for f in figures],
    }
    path.write_text(json.dumps(body, indent=2))


# -- one run ----------------------------------------------------------------------------------
def machine(at: datetime | None = None) -> dict[str, Any]:
    return {
        "at": f"{at or datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "load": [round(v, 2) for v in os.getloadavg()],
        "nproc": os.cpu_count(),
    }


def start(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_FILE).write_text(json.dumps({**checkout(), **machine()}, indent=2))


@dataclass(frozen=True, slots=True)
class Written:
    """One benchmark's file: its figures and the commit they were measured on."""

    bench: str
    commit: str
    dirty: list[str]
    figures: dict[str, Figure] = field(default_factory=dict)


FIGURE_KEYS = ("id", "value", "unit", "what")


def load(directory: Path) -> dict[str, Written]:
    """Each benchmark's file that exists; a file that does not parse counts as absent. Only
    a figure's id, value, unit and name are read: a stored verdict (`met`) is never trusted."""
    found: dict[str, Written] = {}
    for bench in BENCHES:
        path = directory / f"{bench}.json"
        try:
            body = json.loads(path.read_text())
            figures = {
                row["id"]: Figure(**{k: row[k] for k in FIGURE_KEYS if k in row})
                for row in body["figures"]
            }
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found[bench] = Written(bench, str(body.get("commit")), list(body.get("dirty", [])), figures)
    return found


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    name: str
    value: str
    goal: str
    verdict: str  # "PASS", "FAIL (why)", or "" for a figure shown without a goal

    @property
    def failed(self) -> bool:
        return self.verdict.startswith("FAIL")


def judge(goal: Goal, written: dict[str, Written]) -> Row:
    """The verdict, from the figure and the goal alone."""
    bench = bench_of(goal.figure)
    figure = written[bench].figures.get(goal.figure) if bench in written else None
    if figure is None:
        why = (
            f"no figure: {bench} left none"
            if bench not in written
            else f"no figure: {goal.figure} missing from {bench}'s output"
        )
        return Row(goal.id, goal.name, "none", goal.shown(), f"FAIL ({why})")
    value = shown(figure.value, figure.unit)
    if figure.unit != goal.unit:
        why = f"in {figure.unit or 'no unit'!r}, the goal in {goal.unit or 'no unit'!r}"
        return Row(goal.id, goal.name, value, goal.shown(), f"FAIL ({why})")
    if not isinstance(figure.value, int | float) or math.isnan(figure.value):
        return Row(goal.id, goal.name, value, goal.shown(), "FAIL (not a number)")
    verdict = "PASS" if goal.holds(figure.value) else "FAIL"
    return Row(goal.id, goal.name, value, goal.shown(), verdict)


def rows(goals: Sequence[Goal], written: dict[str, Written]) -> list[Row]:
    """Per benchmark in `make bench`'s order: its goals, then its figures that have none."""
    judged = [judge(g, written) for g in goals]
    out: list[Row] = []
    for bench in BENCHES:
        out += [r for g, r in zip(goals, judged, strict=True) if bench_of(g.figure) == bench]
        if bench not in written:
            if not any(bench_of(g.figure) == bench for g in goals):
                out.append(Row(bench, f"{bench}: no figures", "none", "", "FAIL (no figures)"))
            continue
        with_goal = {g.figure for g in goals}
        out += [
            Row(f.id, f.what or f.id, shown(f.value, f.unit), "", "")
            for f in written[bench].figures.values()
            if f.id not in with_goal
        ]
    return out


def commit_rows(run: dict[str, Any], end: dict[str, Any], written: dict[str, Written]) -> list[Row]:
    """One run on one commit: figures from another commit, or a run whose commit changed
    under it, or whose start was never recorded, are failures too."""
    out = []
    if not run:
        out.append(Row("run", "the run's start", "not recorded", "", "FAIL (no RUN.json)"))
    elif run["commit"] != end["commit"]:
        why = f"{run['commit'][:12]} at the start, {end['commit'][:12]} at the end"
        out.append(Row("run", "the run's commit", "changed", "", f"FAIL ({why})"))
    for w in written.values():
        if w.commit != end["commit"]:
            why = f"measured on {w.commit[:12]}, the run is on {end['commit'][:12]}"
            out.append(Row(w.bench, f"{w.bench}'s figures", "", "", f"FAIL ({why})"))
    return out


def header(run: dict[str, Any], end: dict[str, Any]) -> str:
    dirty = end["dirty"]
    more = f" and {len(dirty) - 8} more" if len(dirty) > 8 else ""
    tree = "clean tree" if not dirty else f"dirty tree: {', '.join(dirty[:8])}{more}"
    began = run.get("at", "?")
    load_start = run.get("load", ["?"])[0]
    return (
        f"`make bench` on {end['commit'][:12]} ({tree}), {began} -> {end['at']}; "
        f"load average (1 min) {load_start} at the start, {end['load'][0]} at the end; "
        f"nproc {end['nproc']}."
    )


def table(goals: Sequence[Goal], written: dict[str, Written], run: dict[str, Any],
          end: dict[str, Any]) -> tuple[str, bool]:  # fmt: skip
    """The markdown the run prints and RESULTS pastes, and whether every goal was met."""
    body = commit_rows(run, end, written) + rows(goals, written)
    lines = [
        header(run, end),
        "",
        "| id | figure | value | goal | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.id} | {r.name} | {r.value} | {r.goal} | {r.verdict} |" for r in body]
    judged = [r for r in body if r.verdict]
    failed = [r for r in judged if r.failed]
    lines += ["", f"{len(judged) - len(failed)} of {len(judged)} checks PASS; {len(failed)} FAIL."]
    return "\n".join(lines), not failed


def shown(value: float, unit: str) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "none"
    if math.isinf(value):
        return "never"
    if abs(value) >= 100 or float(value).is_integer():
        number = f"{value:,.0f}"
    elif abs(value) >= 10:
        number = f"{value:.1f}"
    else:
        number = f"{value:.2f}"
    return f"x{number}" if unit == "x" else f"{number} {unit}".rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("directory", type=Path, nargs="?", default=REPO / "bench" / "out")
    parser.add_argument("--start", action="store_true", help="record the run's start, and exit")
    parser.add_argument("--goals", type=Path, default=GOALS_FILE)
    args = parser.parse_args(argv)
    if args.start:
        start(args.directory)
        return 0
    goals = load_goals(args.goals)
    run_path = args.directory / RUN_FILE
    run = json.loads(run_path.read_text()) if run_path.exists() else {}
    text, passed = table(goals, load(args.directory), run, {**checkout(), **machine()})
    print(text)
    args.directory.mkdir(parents=True, exist_ok=True)
    (args.directory / TABLE_FILE).write_text(text + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
