"""Game days: the chaos API refuses what the lab did not make, objectives and verdicts are
judged as written, and a short game day on a stack of its own heals every fault it injects
with nothing lost (its timing verdicts are the bench's)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lab.bench_goals import GOALS_FILE
from lab.chaos import inject
from lab.chaos_cli import GAMEDAY_LIMITS
from lab.gameday import DEFAULT_FAULTS, gameday
from lab.observe import NotALabStackError
from lab.stack import Stack
from lab.verdict import (
    Healer,
    Objectives,
    Verdict,
    healer,
    healing_runs,
    judge,
    load_objectives,
    objectives_for,
    verdict_table,
)
from tests.conftest import stack_of_its_own
from web.gamedays import read_report

# One trial of each fault the control plane heals by itself: every fault but the data damage,
# whose restore awaits an operator's approval (tests/test_restore.py approves them).
CI_FAULTS = DEFAULT_FAULTS
# Timing objectives are the bench's to judge (`shoplab gameday`, bench/RESULTS.md): on a
# shared CI machine a test asserts what must never happen, whatever the timing.
TIMING = {"outage_p99_s", "redundancy_s"}


def trial(**figures: Any) -> dict[str, Any]:
    base = {
        "outage_s": 1.0,
        "redundancy_s": 10.0,
        "lost": 0,
        "duplicates": 0,
        "split_brain": 0,
        "false_actions": 0,
        "duplicate_actions": 0,
        "detect_s": 0.5,
        "act_s": 1.0,
        "healed_by": "control plane",
        "targets": ["shop-1"],
        "target_detect_s": 0.5,
    }
    return {**base, **figures}


def test_a_fault_refuses_a_stack_the_lab_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"components": {}}))
    with pytest.raises(NotALabStackError):
        inject("kill-primary", tmp_path)


def test_per_fault_objectives_override_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "objectives.toml"
    path.write_text("[defaults]\noutage_p99_s = 2.5\n[faults.hang-primary]\noutage_p99_s = 7\n")
    found = load_objectives(path)
    assert found["*"] == Objectives(outage_p99_s=2.5)
    assert found["hang-primary"] == Objectives(outage_p99_s=7.0)
    path.write_text("[faults.kill-shop]\noutage_s = 1\n")
    with pytest.raises(ValueError, match="unknown objectives"):
        load_objectives(path)


def test_the_shipped_objectives_give_a_hang_grace_plus_two_seconds() -> None:
    found = load_objectives()
    assert found["*"].outage_p99_s == 3.0 and found["*"].redundancy_s == 30.0
    assert found["hang-primary"].outage_p99_s == 7.0


def test_game_day_objectives_live_in_the_goals_file_and_a_difference_from_a_bench_goal_says_why(
    tmp_path: Path,
) -> None:
    shipped = GOALS_FILE.read_text()
    assert "[gameday.defaults]" in shipped and "[[goal]]" in shipped
    assert load_objectives() == load_objectives(GOALS_FILE)
    goal = (
        '[[goal]]\nid = "failover.p99"\nfigure = "failover.outage_p99_s"\nname = "x"\n'
        'op = "<"\nbound = 0.8\nunit = "s"\n'
    )
    pair = (
        '[[gameday.same_measure]]\nfault = "kill-primary"\nobjective = "outage_p99_s"\n'
        'figure = "failover.outage_p99_s"\n'
    )
    path = tmp_path / "goals.toml"
    path.write_text(goal + "[gameday.defaults]\noutage_p99_s = 0.8\n" + pair)
    assert (
        objectives_for("kill-primary", load_objectives(path)).outage_p99_s == 0.8
    )  # the same bound
    path.write_text(goal + "[gameday.defaults]\noutage_p99_s = 3\n" + pair)
    with pytest.raises(ValueError, match="say why they differ"):
        load_objectives(path)
    path.write_text(goal + "[gameday.defaults]\noutage_p99_s = 3\n" + pair + 'why = "a reason"\n')
    assert objectives_for("kill-primary", load_objectives(path)).outage_p99_s == 3
    path.write_text(goal + pair.replace("failover.outage_p99_s", "failover.nothing"))
    with pytest.raises(ValueError, match="no benchmark goal judges"):
        load_objectives(path)


@pytest.mark.parametrize(
    ("trials", "verdict", "failed"),
    [
        ([trial(), trial(outage_s=2.9)], Verdict.PASS, []),
        ([trial(), trial(outage_s=3.0)], Verdict.FAIL, ["outage_p99_s"]),
        ([trial(lost=1)], Verdict.FAIL, ["lost"]),
        ([trial(redundancy_s=None)], Verdict.FAIL, ["redundancy_s"]),
        (
            [trial(split_brain=2, duplicate_actions=1)],
            Verdict.FAIL,
            ["split_brain", "duplicate_actions"],
        ),
    ],
)
def test_a_fault_passes_only_when_every_figure_meets_its_objective(
    trials: list[dict[str, Any]], verdict: Verdict, failed: list[str]
) -> None:
    judged = judge("kill-primary", trials, Objectives())
    assert judged["verdict"] == verdict
    assert judged["failed"] == failed
    assert "kill-primary" in verdict_table([judged])


@pytest.fixture(scope="module")
def gameday_stack() -> Iterator[Stack]:
    with stack_of_its_own(
        "shop-gameday", products=50, stock=100000, policy_overrides=GAMEDAY_LIMITS
    ) as lab:
        yield lab


@pytest.mark.timeout(2400)  # 14 faults, each healed and settled before the next: ~10 min
def test_a_short_game_day_heals_every_fault_losing_nothing(
    gameday_stack: Stack, tmp_path: Path
) -> None:
    report = gameday(gameday_stack.layout.data_dir, faults=CI_FAULTS, trials=1, seed=7)
    table = verdict_table(report["verdicts"])
    print(table)
    assert Path(report["written_to"]).exists()
    assert report["verification"]["ok"], report["verification"]
    assert [v["fault"] for v in report["verdicts"]] == list(CI_FAULTS)
    for v in report["verdicts"]:
        # No order lost or twice, no split brain, no false or repeated action, healed.
        assert set(v["failed"]) <= TIMING, table
    # ... and healed as the objectives expect: by a run of the control plane's own on the
    # fault's target, or by itself where they say so (and why); never by the clean-up.
    goals = load_objectives()
    healed = {kind: [t["healed_by"] for t in ts] for kind, ts in report["trials"].items()}
    assert healed == {kind: [str(objectives_for(kind, goals).heals)] for kind in CI_FAULTS}, table
    # poison-cache's poison is what the cache_truth probe finds, and its flush drops.
    [poisoned] = report["trials"]["poison-cache"]
    flushes = {r["id"] for r in poisoned["runs"] if r["action"] == "cache_flush"}
    healing = set(poisoned["healing_runs"]["redis"])
    assert healing and healing <= flushes, poisoned
    # A failing WAL archive is an incident of its own, which names the cause.
    [archive] = report["trials"]["fill-archive"]
    assert archive["target_detect_s"] is not None and archive["target_detect_s"] < 60, archive
    assert report["load"]["acknowledged"] > 100
    # What the dashboard's Game days page draws: each trial's orders per second around its
    # fault (flowing before it) and the control plane's runs, read back as the page reads it.
    stored = read_report(Path(report["written_to"]))
    for kind, trials in stored.trials.items():
        [one] = trials
        assert one.series is not None and sum(one.series.orders[:10]) > 0, kind
        assert one.series.start_at < one.fault.started_at  # type: ignore[operator]
        assert len(one.runs) == len(report["trials"][kind][0]["actions"]), kind


FAULT_AT = datetime(2026, 11, 26, 18, 0, tzinfo=UTC)


def run(target: str, state: str, started_s: float, finished_s: float | None) -> dict[str, Any]:
    def at(s: float | None) -> str | None:
        return None if s is None else (FAULT_AT + timedelta(seconds=s)).isoformat()

    return {"id": f"{target}@{started_s}", "target": target, "state": state,
            "started_at": at(started_s), "finished_at": at(finished_s)}  # fmt: skip


@pytest.mark.parametrize(
    ("runs", "whole_s", "healed"),
    [
        ([run("shop-1", "succeeded", 1, 4)], 5, Healer.CONTROL_PLANE),
        # Its verify saw the recovery a poll after the game day did.
        ([run("shop-1", "succeeded", 1, 6)], 5, Healer.CONTROL_PLANE),
        # Whole again with no run of its own: not the control plane's doing.
        ([], 5, Healer.ITSELF),
        ([run("shop-1", "skipped", 1, 1.1)], 5, Healer.ITSELF),
        ([run("shop-1", "abandoned", 1, 2)], 5, Healer.ITSELF),
        ([run("shop-0", "succeeded", 1, 4)], 5, Healer.ITSELF),  # another target's
        ([run("shop-1", "succeeded", -3, 1)], 5, Healer.ITSELF),  # before the fault
        ([run("shop-1", "succeeded", 6, 7)], 5, Healer.ITSELF),  # after whole again
        ([run("shop-1", "succeeded", 1, 30)], 5, Healer.ITSELF),  # long after it
        ([run("shop-1", "succeeded", 1, 4)], None, Healer.NOBODY),
    ],
)
def test_the_control_plane_healed_a_trial_only_by_a_run_of_its_own_on_the_target(
    runs: list[dict[str, Any]], whole_s: float | None, healed: Healer
) -> None:
    whole = None if whole_s is None else FAULT_AT + timedelta(seconds=whole_s)
    healing = healing_runs(runs, ["shop-1"], FAULT_AT, whole)
    assert healer(cleaned=False, whole=whole is not None, healing=healing) == healed


def test_a_fault_of_two_targets_is_healed_by_the_control_plane_only_on_both() -> None:
    whole = FAULT_AT + timedelta(seconds=10)
    one = [run("prometheus", "succeeded", 1, 3)]
    both = [*one, run("shop-1", "succeeded", 3, 8)]
    targets = ["prometheus", "shop-1"]
    assert (
        healer(cleaned=False, whole=True, healing=healing_runs(one, targets, FAULT_AT, whole))
        == Healer.ITSELF
    )
    assert (
        healer(cleaned=False, whole=True, healing=healing_runs(both, targets, FAULT_AT, whole))
        == Healer.CONTROL_PLANE
    )
    # A fault with no target of the control plane's (it heals by itself) is never its doing.
    assert healer(cleaned=False, whole=True, healing={}) == Healer.ITSELF
    cleaned = healer(cleaned=True, whole=True, healing=healing_runs(both, targets, FAULT_AT, whole))
    assert cleaned == Healer.CLEAN_UP


def test_a_fault_the_control_plane_was_to_heal_fails_when_it_healed_by_itself() -> None:
    judged = judge("kill-shop", [trial(), trial(healed_by="itself")], Objectives())
    assert judged["verdict"] == Verdict.FAIL
    assert judged["failed"] == [
        "trial 2: whole again with no run of the control plane's on shop-1 succeeded: "
        "not healed by the control plane"
    ]
    assert judged["healed_by"] == {"control plane": 1, "itself": 1}


def test_a_fault_that_heals_by_itself_passes_so_but_must_still_be_detected_if_expected() -> None:
    itself = Objectives(heals=Healer.ITSELF, why="the archiver retries", detect=True)
    healed = trial(healed_by="itself", targets=["shop-db-archive"], target_detect_s=12.0)
    assert judge("fill-archive", [healed], itself)["verdict"] == Verdict.PASS
    unseen = judge("fill-archive", [{**healed, "target_detect_s": None}], itself)
    assert unseen["failed"] == ["trial 1: no incident on shop-db-archive within 60 s"]
    late = judge("fill-archive", [{**healed, "target_detect_s": 75.0}], itself)
    assert late["verdict"] == Verdict.FAIL
    table = verdict_table([judge("fill-archive", [healed], itself)])
    assert "itself 1/1 (expected: itself)" in table
    assert "- fill-archive heals by itself: the archiver retries" in table


def test_the_shipped_objectives_say_why_each_fault_heals_by_itself(tmp_path: Path) -> None:
    found = load_objectives()
    itself = {kind for kind, goal in found.items() if goal.heals is Healer.ITSELF}
    assert itself == {"starve-cpu", "fill-archive"}
    assert all(found[kind].why for kind in itself)
    assert found["fill-archive"].detect and found["fill-archive"].detect_within_s <= 60
    assert found["poison-cache"].detect and found["poison-cache"].heals is Healer.CONTROL_PLANE
    path = tmp_path / "objectives.toml"
    path.write_text('[faults.kill-shop]\nheals = "itself"\n')
    with pytest.raises(ValueError, match="say why"):
        load_objectives(path)
    path.write_text('[faults.kill-shop]\nheals = "clean-up"\n')
    with pytest.raises(ValueError, match="heals in"):
        load_objectives(path)
