"""The dashboard in a real browser (Debian's Chromium through Playwright) against a running lab
stack whose shop restarts wait for approval: a killed shop turns red, its restart is approved
and it turns green again without a reload; another's is rejected; every chart has data, in the
browser's time zone; deleted orders come back by an approved restore."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import playwright.sync_api as playwright
import pytest
import requests

from lab import chaos
from lab.observe import StackView
from lab.stack import Stack
from lab.verdict import Objectives
from tests.conftest import stack_of_its_own
from tests.test_gameday_page import a_report, a_trial

# Never skipped: scripts/setup installs Debian's Chromium and the dev extras install
# Playwright (which never downloads a browser here: it is given Debian's). Either missing is
# a broken setup, and these tests fail loudly rather than pass as skipped.
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", "/tmp/shopguard-test-artifacts"))


@pytest.fixture(scope="module")
def lab() -> Iterator[Stack]:
    with stack_of_its_own(
        "dashboard-browser",
        products=50,
        # A restart waits for approval, and an incident not mended within 5 s is escalated:
        # the banner every page shows while healing does not work.
        policy_overrides={"restart-dead-shop": {"mode": "approval", "escalate_after_s": 5}},
    ) as stack:
        yield stack


def test_debians_chromium_is_installed_for_the_browser_tests() -> None:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run scripts/setup (it installs chromium)"


@pytest.fixture(scope="module")
def page(lab: Stack) -> Iterator[Any]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run scripts/setup (it installs chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        # A context of its own: a second tab of the same session approves while this one watches.
        tab = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
        tab.set_default_timeout(60_000)
        tab.goto(f"{cp_url(lab)}/dashboard/")
        tab.fill("input[name=username]", "admin")
        tab.fill("input[name=password]", lab.admin_password)
        tab.click("button.primary")
        tab.wait_for_url("**/dashboard/")
        yield tab
        browser.close()


def cp_url(lab: Stack) -> str:
    return f"http://127.0.0.1:{lab.layout.controlplane_port}"


def kill(lab: Stack, name: str) -> None:
    pid = lab.describe()["components"][name]["pid"]
    os.killpg(pid, signal.SIGKILL)


def service_row(page: Any, name: str, health: str) -> None:
    page.wait_for_selector(f'tr[data-service="{name}"].svc.{health}', timeout=90_000)


def test_a_killed_shop_turns_red_its_approved_restart_turns_it_green(lab: Stack, page: Any) -> None:
    service_row(page, "shop-1", "up")
    page.screenshot(path=str(ARTIFACTS / "overview-before.png"), full_page=True)
    reloads: list[str] = []

    def navigated(frame: Any) -> None:
        reloads.append(frame.url)

    page.on("framenavigated", navigated)
    kill(lab, "shop-1")
    service_row(page, "shop-1", "down")
    # From the state change (the failed probe's time, in the page) to the page: at most 2 s.
    shown_after_s = page.eval_on_selector(
        'tr[data-service="shop-1"] td:nth-child(3) time',
        "t => (Date.now() - new Date(t.getAttribute('datetime')).getTime()) / 1000",
    )
    assert shown_after_s <= 2.0
    page.screenshot(path=str(ARTIFACTS / "overview-shop-down.png"), full_page=True)
    page.wait_for_selector("#awaiting li[data-run]")
    assert page.inner_text("#badge") != "0"
    # Not mended within the policy's 5 s: a red banner says so, in one line, on every page.
    page.wait_for_selector("#escalations li", timeout=60_000)
    assert "shop-1" in page.inner_text("#escalations") and "restart" in page.inner_text(
        "#escalations"
    )
    page.screenshot(path=str(ARTIFACTS / "overview-escalated.png"), full_page=True)
    review = page.context.new_page()
    review.goto(f"{cp_url(lab)}/dashboard/charts")
    review.wait_for_selector("#escalations li")
    assert "Needs a human" in review.inner_text("#escalations")
    # Approved in a second tab; the first one, never reloaded, turns green by itself.
    review.goto(cp_url(lab) + page.get_attribute("#awaiting li[data-run] a", "href"))
    review.click("#approve")
    review.wait_for_selector("#run-state")
    review.close()
    service_row(page, "shop-1", "up")
    page.wait_for_selector("#awaiting li.empty")
    page.wait_for_selector("#escalations", state="hidden", timeout=60_000)  # mended: it goes
    page.remove_listener("framenavigated", navigated)
    assert reloads == []  # red, then green, live: by polling
    page.screenshot(path=str(ARTIFACTS / "overview-healed.png"), full_page=True)


def test_an_operator_rejects_a_waiting_restart(lab: Stack, page: Any) -> None:
    page.goto(f"{cp_url(lab)}/dashboard/")
    kill(lab, "shop-0")
    page.wait_for_selector("#awaiting li[data-run]", timeout=90_000)
    page.click("#awaiting li[data-run] a")
    page.fill("input[name=comment]", "investigating by hand")
    page.click("#reject")
    assert page.inner_text("#run-state") == "rejected"
    page.screenshot(path=str(ARTIFACTS / "run-rejected.png"), full_page=True)
    lab.restart("shop-0")  # put it back for the charts


def test_every_chart_renders_with_data(lab: Stack, page: Any) -> None:
    shop = lab.describe()["shop"]["instances"][1]
    for i in range(60):
        requests.post(
            f"{shop}/orders",
            json={"product_id": 1 + i % 5, "quantity": 1, "customer": "b", "address": "x"},
            headers={"Idempotency-Key": f"browser-{i}-{time.time()}"},
            timeout=10,
        )
        requests.get(f"{shop}/products/{1 + i % 5}", timeout=10)
        time.sleep(0.1)  # spread over a few scrapes: a rate needs two samples
    page.goto(f"{cp_url(lab)}/dashboard/charts?range=15m")
    deadline = time.monotonic() + 90
    empty: list[str] = []
    while time.monotonic() < deadline:
        empty = page.eval_on_selector_all(
            ".chart",
            "els => els.filter(e => !(+e.dataset.points > 0)).map(e => e.id)",
        )
        if not empty:
            break
        page.reload()
        page.wait_for_timeout(3000)
    page.screenshot(path=str(ARTIFACTS / "charts.png"), full_page=True)
    assert not empty, f"charts without data: {empty}"
    assert page.locator(".chart:has(.main-svg)").count() == 8  # the replication lag's too
    assert page.locator('.modebar-btn[data-title="Share chart..."]').count() == 0


def test_the_charts_read_in_the_browsers_time_zone(lab: Stack, page: Any) -> None:
    context = page.context.browser.new_context(timezone_id="Asia/Kolkata")  # UTC+05:30
    context.add_cookies(page.context.cookies())
    tab = context.new_page()
    tab.goto(f"{cp_url(lab)}/dashboard/charts?range=15m")
    tab.wait_for_selector("#chart-orders .main-svg")
    # Plotly draws the wall clock written in the date: the end of the range must be the
    # browser's own wall clock, not UTC's (5 h 30 min behind it).
    behind_s = tab.evaluate(
        """() => {
          const end = document.getElementById("chart-orders").layout.xaxis.range[1];
          return (Date.now() - new Date(String(end).slice(0, 19)).getTime()) / 1000;
        }"""
    )
    context.close()
    assert 0 <= behind_s < 60, behind_s


def test_the_overview_shows_each_standbys_lag(lab: Stack, page: Any) -> None:
    real = requests.Session()
    real.cookies.update({c["name"]: c["value"] for c in page.context.cookies()})
    data = real.get(f"{cp_url(lab)}/dashboard/api/overview.json", timeout=10).json()
    standby = next(n for n in data["database"] if n["role"] == "Sync Standby")
    assert isinstance(standby["lag_bytes"], int), standby  # the leader's figure for it
    # A lag the page must print in its unit, whatever the real one is now (often 0 B).
    standby["lag_bytes"] = 24576
    page.route("**/dashboard/api/overview.json", lambda route: route.fulfill(json=data))
    page.goto(f"{cp_url(lab)}/dashboard/")
    page.wait_for_selector("#database tr")
    rows = page.inner_text("#database")
    page.unroute("**/dashboard/api/overview.json")
    assert "streaming · lag 24.0 KiB" in rows


def test_an_operator_approves_a_waiting_restore_and_the_orders_come_back(
    lab: Stack, page: Any
) -> None:
    deleted = chaos.inject("delete-orders", lab.layout.data_dir).details["deleted_ids"]
    assert deleted
    page.goto(f"{cp_url(lab)}/dashboard/")
    waiting = '#awaiting li[data-run]:has-text("restore")'
    page.wait_for_selector(waiting, timeout=90_000)
    page.click(f"{waiting} a")
    page.screenshot(path=str(ARTIFACTS / "restore-awaiting.png"), full_page=True)
    page.click("#approve")
    deadline = time.monotonic() + 180
    while page.inner_text("#run-state") not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, page.inner_text("#run-state")
        page.wait_for_timeout(1000)
        page.reload()
    page.screenshot(path=str(ARTIFACTS / "restore-done.png"), full_page=True)
    assert page.inner_text("#run-state") == "succeeded"
    assert StackView.of(lab.layout.data_dir).orders_present(deleted) == dict.fromkeys(deleted, 1)


def test_a_game_days_report_is_listed_and_drawn_one_chart_per_trial(lab: Stack, page: Any) -> None:
    trials = {
        "kill-primary": [a_trial("kill-primary", runs=2)],
        "kill-shop": [a_trial("kill-shop")],
    }
    lab.layout.gamedays.mkdir(parents=True, exist_ok=True)
    (lab.layout.gamedays / "20261126T172900Z.json").write_text(
        json.dumps(a_report(trials, Objectives()))
    )
    page.goto(f"{cp_url(lab)}/dashboard/gamedays")
    page.click('tr[data-run="20261126T172900Z"] a')
    page.wait_for_selector("#trial-2 .main-svg")
    page.screenshot(path=str(ARTIFACTS / "gameday.png"), full_page=True)
    drawn = page.eval_on_selector_all(".chart", "els => els.map(e => +e.dataset.points)")
    assert len(drawn) == 2 and all(n > 0 for n in drawn)
    assert page.locator("#trial-1 .scatterlayer .textpoint").count() == 2  # the runs' labels
