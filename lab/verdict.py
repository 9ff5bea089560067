"""A game day's objectives (lab/objectives.toml: defaults, then per-fault overrides) and the
PASS/FAIL verdict of one fault's trials against them."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from lab.load import percentile

DEFAULT_OBJECTIVES = Path(__file__).with_name("objectives.toml")


class Verdict(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Objectives:
    outage_p99_s: float = 3.0
    redundancy_s: float = 30.0
    lost: int = 0
    duplicates: int = 0
    split_brain: int = 0
    false_actions: int = 0
    duplicate_actions: int = 0


def load_objectives(
    path: Path = DEFAULT_OBJECTIVES, *, stress: bool = False
) -> dict[str, Objectives]:
    """{fault kind: its objectives}; the key "*" holds the defaults. With `stress` (a game day
    beside CPU hogs), the durations of the [stress] section (and [stress.faults.KIND]) apply
    where they are looser, never tighter; counts are never relaxed."""
    data = tomllib.loads(path.read_text())
    known = {f.name for f in fields(Objectives)}

    def parse(table: Mapping[str, Any], base: Objectives, where: str) -> Objectives:
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"{path}: unknown objectives in {where}: {sorted(unknown)}")
        return replace(base, **table)

    defaults = parse(data.get("defaults", {}), Objectives(), "[defaults]")
    found = {"*": defaults}
    for kind, table in data.get("faults", {}).items():
        found[kind] = parse(table, defaults, f"[faults.{kind}]")
    under = dict(data.get("stress", {}))
    per_fault: dict[str, dict[str, Any]] = under.pop("faults", {})
    for where, table in [("[stress]", under)] + [
        (f"[stress.faults.{k}]", t) for k, t in per_fault.items()
    ]:
        counts = sorted(k for k in table if not k.endswith("_s"))
        if counts:
            raise ValueError(f"{path}: {where} may relax durations only, not {counts}")
        parse(table, defaults, where)  # names checked
    if not stress:
        return found
    for kind in set(found) | set(per_fault):
        normal = found.get(kind, defaults)
        looser = {**under, **per_fault.get(kind, {})}
        found[kind] = replace(
            normal, **{k: max(getattr(normal, k), float(v)) for k, v in looser.items()}
        )
    return found


def objectives_for(kind: str, objectives: Mapping[str, Objectives]) -> Objectives:
    return objectives.get(kind) or objectives.get("*") or Objectives()


def judge(kind: str, trials: Sequence[Mapping[str, Any]], goal: Objectives) -> dict[str, Any]:
    """One fault's figures over its trials, each against its objective."""
    outages = sorted(_num(t["outage_s"]) for t in trials)
    redundancy = sorted(_num(t["redundancy_s"]) for t in trials)
    figures = {
        "outage_p50_s": percentile(outages, 0.5),
        "outage_p99_s": percentile(outages, 0.99),
        "redundancy_s": max(redundancy, default=math.inf),
        "lost": sum(int(t["lost"]) for t in trials),
        "duplicates": sum(int(t["duplicates"]) for t in trials),
        "split_brain": sum(int(t["split_brain"]) for t in trials),
        "false_actions": sum(int(t["false_actions"]) for t in trials),
        "duplicate_actions": sum(int(t["duplicate_actions"]) for t in trials),
        "detect_p50_s": percentile(sorted(_num(t["detect_s"]) for t in trials), 0.5),
        "act_p50_s": percentile(sorted(_num(t["act_s"]) for t in trials), 0.5),
    }
    failed = [
        name
        for name, limit in asdict(goal).items()
        if not (figures[name] < limit if name.endswith("_s") else figures[name] <= limit)
    ]
    failed += [f"trial {i + 1}: {t['error']}" for i, t in enumerate(trials) if t.get("error")]
    # Whole again only because the game day started what was dead: not healed.
    failed += [
        f"trial {i + 1}: healed by the clean-up ({', '.join(t.get('cleaned_up') or [])})"
        for i, t in enumerate(trials)
        if t.get("healed_by") == "clean-up"
    ]
    return {
        "fault": kind,
        "trials": len(trials),
        "figures": {k: _round(v) for k, v in figures.items()},
        "objectives": asdict(goal),
        "failed": failed,
        "verdict": Verdict.FAIL if failed or not trials else Verdict.PASS,
    }


def _num(value: Any) -> float:
    return math.inf if value is None else float(value)


def _round(value: float | int) -> float | int | None:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 3)
    return value


def verdict_table(verdicts: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per fault."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    lines = [
        "| fault | trials | detect p50 | act p50 | outage p50 | outage p99 | redundancy max "
        "| lost | dup | split | false/dup actions | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        f = v["figures"]
        lines.append(
            f"| {v['fault']} | {v['trials']} | {cell(f['detect_p50_s'])} s | "
            f"{cell(f['act_p50_s'])} s | {cell(f['outage_p50_s'])} s | "
            f"{cell(f['outage_p99_s'])} s (< {v['objectives']['outage_p99_s']:g}) | "
            f"{cell(f['redundancy_s'])} s (< {v['objectives']['redundancy_s']:g}) | "
            f"{f['lost']} | {f['duplicates']} | {f['split_brain']} | "
            f"{f['false_actions']}/{f['duplicate_actions']} | {v['verdict']} |"
        )
    return "\n".join(lines)
