"""A game day's objectives (the `[gameday]` tables of bench/goals.toml, beside every
benchmark's goals: defaults, then per-fault overrides), who healed a trial (the control plane
only when a run of its own on the fault's target healed it), and the PASS/FAIL verdict of one
fault's trials against them."""

from __future__ import annotations

import math
import tomllib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from lab.bench_goals import GOALS_FILE, GoalsFile
from lab.load import percentile

# Every goal lives in one file: the game days' objectives are its `[gameday]` tables. A file of
# objectives alone (`gameday --objectives`, an experiment) may hold them at its top level.
DEFAULT_OBJECTIVES = GOALS_FILE


# A run's verify polls the target as the game day polls the stack: the two see one recovery a
# poll apart, so a run that started before "whole again" and succeeded this soon after it
# healed it (the game day reads the runs only after this much more load).
ATTRIBUTION_SLACK_S = 2.0


class Verdict(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"


class Healer(StrEnum):
    """Who made the stack whole again after a fault."""

    CONTROL_PLANE = "control plane"  # a run of its own on each of the fault's targets
    ITSELF = "itself"  # whole again with no such run
    CLEAN_UP = "clean-up"  # the game day started what was dead: nobody healed it
    NOBODY = "nobody"  # not whole by the trial's deadline


@dataclass(frozen=True, slots=True)
class Objectives:
    outage_p99_s: float = 3.0
    redundancy_s: float = 30.0
    lost: int = 0
    duplicates: int = 0
    split_brain: int = 0
    false_actions: int = 0
    duplicate_actions: int = 0
    # Who is to heal it: the control plane, or the fault heals by itself (`why` says how).
    heals: Healer = Healer.CONTROL_PLANE
    why: str = ""
    # An incident on the fault's target within `detect_within_s` of it, in every trial.
    detect: bool = False
    detect_within_s: float = 60.0


# The objectives that bound a figure of `judge`; the others say what is expected.
LIMITS = (
    "outage_p99_s",
    "redundancy_s",
    "lost",
    "duplicates",
    "split_brain",
    "false_actions",
    "duplicate_actions",
)


def limits(goal: Objectives) -> dict[str, float]:
    return {name: getattr(goal, name) for name in LIMITS}


def load_objectives(
    path: Path = DEFAULT_OBJECTIVES, *, stress: bool = False
) -> dict[str, Objectives]:
    """{fault kind: its objectives}; the key "*" holds the defaults. With `stress` (a game day
    beside CPU hogs), the durations of the [stress] section (and [stress.faults.KIND]) apply
    where they are looser, never tighter; counts are never relaxed."""
    whole = tomllib.loads(path.read_text())
    data = dict(whole.get("gameday", whole))
    same_measure = data.pop("same_measure", [])
    known = {f.name for f in fields(Objectives)}

    def parse(table: Mapping[str, Any], base: Objectives, where: str) -> Objectives:
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"{path}: unknown objectives in {where}: {sorted(unknown)}")
        goal = replace(base, **table)
        expected = (Healer.CONTROL_PLANE, Healer.ITSELF)
        if goal.heals not in expected:
            raise ValueError(f"{path}: heals in {where} is one of {[str(h) for h in expected]}")
        goal = replace(goal, heals=Healer(goal.heals))
        if goal.heals is Healer.ITSELF and not goal.why:
            raise ValueError(f"{path}: {where} says the fault heals by itself: say why (`why`)")
        return goal

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
    goals = GoalsFile.model_validate(whole).goal if "gameday" in whole else []
    _check_same_measures(path, found, same_measure, goals)
    if not stress:
        return found
    for kind in set(found) | set(per_fault):
        normal = found.get(kind, defaults)
        looser = {**under, **per_fault.get(kind, {})}
        found[kind] = replace(
            normal, **{k: max(getattr(normal, k), float(v)) for k, v in looser.items()}
        )
    return found


def _check_same_measures(
    path: Path,
    objectives: Mapping[str, Objectives],
    same_measure: Sequence[Mapping[str, Any]],
    goals: Sequence[Any],
) -> None:
    """A game-day objective and a benchmark goal that bound the same measure (each
    `[[gameday.same_measure]]`: fault, objective, figure) agree, or the entry says `why` not."""
    bounds: dict[str, list[float]] = {}
    for goal in goals:
        bounds.setdefault(goal.figure, []).append(goal.bound)
    for entry in same_measure:
        where = f"[[gameday.same_measure]] {entry.get('fault')}.{entry.get('objective')}"
        unknown = set(entry) - {"fault", "objective", "figure", "why"}
        if unknown:
            raise ValueError(f"{path}: {where}: unknown keys {sorted(unknown)}")
        fault, objective, figure = entry["fault"], entry["objective"], entry["figure"]
        if objective not in LIMITS:
            raise ValueError(f"{path}: {where}: no objective {objective!r}")
        if figure not in bounds:
            raise ValueError(f"{path}: {where}: no benchmark goal judges {figure!r}")
        bound = getattr(objectives_for(fault, objectives), objective)
        if bound not in bounds[figure] and not str(entry.get("why", "")).strip():
            raise ValueError(
                f"{path}: {where} is {bound:g} but the benchmark's goals for {figure} are "
                f"{', '.join(f'{b:g}' for b in bounds[figure])}: say why they differ (`why`)"
            )


def objectives_for(kind: str, objectives: Mapping[str, Objectives]) -> Objectives:
    return objectives.get(kind) or objectives.get("*") or Objectives()


def healing_runs(
    runs: Sequence[Mapping[str, Any]],
    targets: Collection[str],
    fault_at: datetime,
    whole_at: datetime | None,
) -> dict[str, list[Any]]:
    """Per target of the fault, the ids of the control plane's runs that healed it: on that
    target, started after the fault and before the stack was whole again, succeeded by then
    (ATTRIBUTION_SLACK_S)."""
    found: dict[str, list[Any]] = {target: [] for target in sorted(targets)}
    if whole_at is None:
        return found
    for run in runs:
        started = run.get("started_at") or run.get("created_at")
        finished = run.get("finished_at")
        if (
            run.get("target") in found
            and run.get("state") == "succeeded"
            and started
            and finished
            and fault_at <= datetime.fromisoformat(started) <= whole_at
            and datetime.fromisoformat(finished)
            <= whole_at + timedelta(seconds=ATTRIBUTION_SLACK_S)
        ):
            found[run["target"]].append(run.get("id"))
    return found


def healer(*, cleaned: bool, whole: bool, healing: Mapping[str, Sequence[Any]]) -> Healer:
    """The control plane healed the fault only if a run of its own healed each of its targets
    (`healing_runs`); whole again without that, the fault healed by itself."""
    if cleaned:
        return Healer.CLEAN_UP
    if not whole:
        return Healer.NOBODY
    if healing and all(healing.values()):
        return Healer.CONTROL_PLANE
    return Healer.ITSELF


def judge(kind: str, trials: Sequence[Mapping[str, Any]], goal: Objectives) -> dict[str, Any]:
    """One fault's figures over its trials, each against its objective; and each trial healed
    as the objectives expect (by the control plane unless the fault heals by itself), and
    detected on its target if they say so."""
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
        for name, limit in limits(goal).items()
        if not (figures[name] < limit if name.endswith("_s") else figures[name] <= limit)
    ]
    failed += [f"trial {i + 1}: {t['error']}" for i, t in enumerate(trials) if t.get("error")]
    failed += [f for i, t in enumerate(trials) if (f := _attribution(i + 1, t, goal))]
    return {
        "fault": kind,
        "trials": len(trials),
        "figures": {k: _round(v) for k, v in figures.items()},
        "objectives": limits(goal),
        "expects": {
            "heals": str(goal.heals),
            "why": goal.why,
            "detect": goal.detect,
            "detect_within_s": goal.detect_within_s,
        },
        "healed_by": dict(Counter(str(t.get("healed_by") or "-") for t in trials)),
        "failed": failed,
        "verdict": Verdict.FAIL if failed or not trials else Verdict.PASS,
    }


def _attribution(n: int, t: Mapping[str, Any], goal: Objectives) -> str | None:
    """Why trial `n` was not healed or detected as expected; None when it was (or failed
    otherwise: an error, or not whole, which its figures already fail)."""
    on = ", ".join(t.get("targets") or []) or "no target"
    if t.get("error"):
        return None
    # Whole again only because the game day started what was dead: not healed.
    if t.get("healed_by") == Healer.CLEAN_UP:
        return f"trial {n}: healed by the clean-up ({', '.join(t.get('cleaned_up') or [])})"
    if goal.heals is Healer.CONTROL_PLANE and t.get("healed_by") == Healer.ITSELF:
        return (
            f"trial {n}: whole again with no run of the control plane's on {on} succeeded: "
            "not healed by the control plane"
        )
    if goal.detect:
        seen_s = t.get("target_detect_s")
        if seen_s is None or seen_s >= goal.detect_within_s:
            return f"trial {n}: no incident on {on} within {goal.detect_within_s:g} s"
    return None


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
        "| lost | dup | split | false/dup actions | healed by | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    itself = []
    for v in verdicts:
        f = v["figures"]
        expects = v.get("expects", {})
        healed = ", ".join(f"{by} {n}/{v['trials']}" for by, n in v.get("healed_by", {}).items())
        if expects.get("heals") == Healer.ITSELF:
            healed += " (expected: itself)"
            itself.append(f"- {v['fault']} heals by itself: {expects.get('why')}")
        lines.append(
            f"| {v['fault']} | {v['trials']} | {cell(f['detect_p50_s'])} s | "
            f"{cell(f['act_p50_s'])} s | {cell(f['outage_p50_s'])} s | "
            f"{cell(f['outage_p99_s'])} s (< {v['objectives']['outage_p99_s']:g}) | "
            f"{cell(f['redundancy_s'])} s (< {v['objectives']['redundancy_s']:g}) | "
            f"{f['lost']} | {f['duplicates']} | {f['split_brain']} | "
            f"{f['false_actions']}/{f['duplicate_actions']} | {healed or '-'} | {v['verdict']} |"
        )
    return "\n".join(lines + (["", *itself] if itself else []))
