"""Game days: the chaos API refuses what the lab did not make, objectives and verdicts are
judged as written, and a short game day on a stack of its own heals every fault it injects
with nothing lost (its timing verdicts are the bench's)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.chaos import inject
from lab.chaos_cli import GAMEDAY_LIMITS
from lab.gameday import DEFAULT_FAULTS, gameday
from lab.observe import NotALabStackError
from lab.stack import Stack
from lab.verdict import Objectives, Verdict, judge, load_objectives, verdict_table
from tests.conftest import stack_of_its_own
from web.gamedays import read_report

# One trial of each fault the control plane heals by itself: every fault but the data damage,
# whose restore awaits an operator's approval (tests/test_restore.py approves them).
CI_FAULTS = DEFAULT_FAULTS
# Timing objectives are the bench's to judge (`controlplane gameday`, bench/RESULTS.md): on a
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
    # ... and healed by the control plane itself, not by the game day's clean-up.
    healed = {kind: [t["healed_by"] for t in ts] for kind, ts in report["trials"].items()}
    assert healed == {kind: ["control plane"] for kind in CI_FAULTS}, table
    assert report["load"]["acknowledged"] > 100
    # What the dashboard's Game days page draws: each trial's orders per second around its
    # fault (flowing before it) and the control plane's runs, read back as the page reads it.
    stored = read_report(Path(report["written_to"]))
    for kind, trials in stored.trials.items():
        [one] = trials
        assert one.series is not None and sum(one.series.orders[:10]) > 0, kind
        assert one.series.start_at < one.fault.started_at  # type: ignore[operator]
        assert len(one.runs) == len(report["trials"][kind][0]["actions"]), kind
