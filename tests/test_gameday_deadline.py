"""A game day on a stack that cannot heal says so at each trial's deadline: what was up, what
the control plane held open, and, when the clean-up cannot make the stack whole either, it
stops with the reason instead of waiting out every later trial."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.gameday import gameday
from lab.observe import notifications
from lab.stack import Stack
from lab.verdict import Objectives
from tests.conftest import stack_of_its_own

# The policies that would heal a dead shop and a dead standby only say what they would do.
NEVER_HEALED = {
    name: {"mode": "dry_run"} for name in ("restart-dead-shop", "rejoin-standby", "rebuild-standby")
}


@pytest.fixture(scope="module")
def unhealed_stack() -> Iterator[Stack]:
    with stack_of_its_own(
        "shop-gameday-deadline", products=50, stock=100000, policy_overrides=NEVER_HEALED
    ) as lab:
        yield lab


@pytest.mark.timeout(600)
def test_a_game_day_that_cannot_heal_fails_each_trial_at_its_deadline_and_stops(
    unhealed_stack: Stack,
) -> None:
    lines: list[str] = []
    report = gameday(
        unhealed_stack.layout.data_dir,
        faults=["kill-shop", "kill-standby", "kill-redis"],
        objectives={"*": Objectives(redundancy_s=5)},
        margin_s=5,
        settle_s=20,
        seed=3,
        progress=lines.append,
    )
    print("\n".join(lines))
    shop = report["trials"]["kill-shop"][0]["fault"]["target"]
    standby = report["trials"]["kill-standby"][0]["fault"]["target"]

    # A dead shop nobody restarts: failed at its deadline, the stack as it was then, the
    # incident the control plane held open (and told the lab's receiver of).
    [killed] = report["trials"]["kill-shop"]
    stuck = killed["at_deadline"]
    assert killed["redundancy_s"] is None
    assert stuck["stack"]["components"][shop]["running"] is False
    assert stuck["stack"]["pg_nodes"][standby]["answers_as"] == "standby"
    assert any(i["target"] == shop for i in stuck["open_incidents"]), stuck
    opened = [r["body"] for r in notifications(unhealed_stack.layout.data_dir)]
    assert any(b.get("event") == "open" and b.get("target") == shop for b in opened), opened
    # ... then the clean-up starts it, and the day goes on: a failure all the same.
    assert killed["healed_by"] == "clean-up" and killed["cleaned_up"] == [shop]

    # A dead standby nobody rejoins: the clean-up cannot start PostgreSQL, so the day stops.
    [dead] = report["trials"]["kill-standby"]
    assert dead["at_deadline"]["stack"]["pg_nodes"][standby]["answers_as"] == "down"
    assert dead["at_deadline"]["stack"]["redundant"] is False
    assert dead["at_deadline"]["open_incidents"], dead["at_deadline"]
    assert report["stopped"] is not None and "after kill-standby" in report["stopped"]
    assert f"{standby} down" in report["stopped"], report["stopped"]
    assert report["not_run"] == ["kill-redis"]
    assert any(line.startswith("stopped: ") for line in lines)

    verdicts = {v["fault"]: v for v in report["verdicts"]}
    assert set(verdicts) == {"kill-shop", "kill-standby"}
    assert "redundancy_s" in verdicts["kill-shop"]["failed"]
    assert any("clean-up" in f for f in verdicts["kill-shop"]["failed"])
    assert report["verdict"] == "FAIL"
