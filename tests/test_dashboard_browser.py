"""The dashboard in a real browser (Debian's Chromium through Playwright) against a running lab
stack whose shop restarts wait for approval: a killed shop turns red, its restart is approved
and it turns green again without a reload; another's is rejected; every chart has data."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from lab.stack import Stack
from lab.verdict import Objectives
from tests.conftest import stack_of_its_own
from tests.test_gameday_page import a_report, a_trial

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", "/tmp/shopguard-test-artifacts"))
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def lab() -> Iterator[Stack]:
    with stack_of_its_own(
        "dashboard-browser",
        products=50,
        policy_overrides={"restart-dead-shop": {"mode": "approval"}},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def page(lab: Stack) -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1440, "height": 1000})
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
    page.on("framenavigated", lambda frame: reloads.append(frame.url))
    kill(lab, "shop-1")
    service_row(page, "shop-1", "down")
    page.screenshot(path=str(ARTIFACTS / "overview-shop-down.png"), full_page=True)
    page.wait_for_selector("#awaiting li[data-run]")
    assert page.inner_text("#badge") != "0"
    assert reloads == []  # it went red live, by polling
    page.click("#awaiting li[data-run] a")
    page.click("#approve")
    page.wait_for_selector("#run-state")
    page.goto(f"{cp_url(lab)}/dashboard/")
    service_row(page, "shop-1", "up")
    page.wait_for_selector("#awaiting li.empty")
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
    assert page.locator(".chart .main-svg").count() >= 7


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
