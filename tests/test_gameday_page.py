"""Game-day results on the dashboard: what a trial keeps for its chart (orders and errors per
second around the fault), the chart as a pure function, and the Game days pages in process
(listed with PASS/FAIL, one chart per trial, ids that name no file answered 404, a bad file
named as such, never a 500)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from controlplane import accounts
from controlplane.config import Settings
from controlplane.engine import utcnow
from controlplane.runtime import ControlPlane
from lab.chaos.base import Stamp
from lab.gameday import MAX_SERIES_S, ChartWindow
from lab.load import Ack, CarefulLoad, per_second
from lab.verdict import Objectives, judge
from remediation.executors.none import NoExecutor
from tests.test_dashboard import PASSWORD, logged_in
from web.charts import MIN_FAULT_SPAN_S, gameday_chart, series_lines

T0 = datetime(2026, 11, 26, 17, 30, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def a_trial(kind: str, *, runs: int = 1, redundancy_s: float | None = 6.5) -> dict[str, Any]:
    """A trial as lab/gameday.py's run_trial writes it: the fault at T0, orders dropping for
    two seconds, a failover run by the control plane."""
    orders = [12] * 10 + [0, 0, 3] + [11] * 7
    errors = [0] * 10 + [9, 7, 1] + [0] * 7
    return {
        "fault": {"kind": kind, "target": "pg0", "started_at": at(0), "ended_at": at(0.04),
                  "duration_s": 0.04, "details": {"pid": 4242}},
        "outage_s": 2.4, "longest_gap_s": 2.4, "redundancy_s": redundancy_s,
        "healed_by": "control plane", "cleaned_up": [], "acknowledged": 180, "lost": 0,
        "duplicates": 0, "split_brain": 0, "detect_s": 0.6, "act_s": 0.9,
        "incidents": ["shop-db-primary (resolved)"],
        "actions": ["failover shop-db-cluster succeeded"] * runs,
        "runs": [
            {"id": 10 + i, "action": "failover", "target": "shop-db-cluster",
             "state": "succeeded" if i == 0 else "failed", "requested_by": "control plane",
             "created_at": at(0.8 + i), "started_at": at(0.9 + i), "finished_at": at(4.0 + i)}
            for i in range(runs)
        ],
        "false_actions": 0, "duplicate_actions": 0, "restore_awaiting_approval": [],
        "approved": [],
        "series": {"start_at": at(-10), "step_s": 1, "orders": orders, "errors": errors},
    }  # fmt: skip


def a_report(trials: dict[str, list[dict[str, Any]]], goals: Objectives) -> dict[str, Any]:
    verdicts = [judge(kind, ts, goals) for kind, ts in trials.items()]
    return {
        "started_at": at(-60),
        "ended_at": at(120),
        "data_dir": "/tmp/shop-gameday-x",
        "soak_s": None,
        "load": {"acknowledged": 2300, "orders_per_s": 11.9, "latency_p99_ms": 80.1},
        "split_brain_samples": 1800,
        "verification": {"ok": True, "lost": 0, "duplicates": 0},
        "verdicts": verdicts,
        "trials": trials,
        "verdict": "PASS" if all(v["verdict"] == "PASS" for v in verdicts) else "FAIL",
    }


# -- what a trial keeps ---------------------------------------------------------------------------
def test_per_second_counts_whole_seconds_and_leaves_out_the_partial_last_one() -> None:
    times = [100.0, 100.5, 101.2, 102.9, 103.4, 99.9]
    assert per_second(times, 100.0, 103.5) == [2, 1, 1]
    assert per_second(times, 100.0, 100.5) == []


def test_a_trials_series_is_dated_from_the_faults_stamp_and_bounded() -> None:
    load = CarefulLoad(["http://127.0.0.1:1"], [1])
    load.acks.extend(Ack(f"k{i}", f"o{i}", t, t, t, 1) for i, t in enumerate([991.0, 1000.5]))
    load.failures.extend([1000.2, 1000.7, 1001.1])
    load.stopped = 5000.0
    anchor = Stamp(T0, 1000.0)
    series = ChartWindow(990.0, 1003.0, anchor).series(load)
    assert series["start_at"] == at(-10) and series["step_s"] == 1
    assert series["orders"] == [0, 1] + [0] * 8 + [1, 0, 0]
    assert series["errors"] == [0] * 10 + [2, 1, 0]
    long = ChartWindow(0.0, 4000.0, anchor).series(load)
    assert len(long["orders"]) == len(long["errors"]) == MAX_SERIES_S


# -- the chart ------------------------------------------------------------------------------------
def test_a_trials_chart_draws_orders_errors_the_fault_span_and_each_run() -> None:
    trial = a_trial("kill-primary", runs=2)
    fig = gameday_chart("kill-primary · trial 1", trial)
    names = [t.name for t in fig.data]
    assert names == ["orders/s", "errors/s", "actions"]
    assert fig.data[0].x[0] == at(-10) and list(fig.data[1].y[10:13]) == [9, 7, 1]
    [span] = [s for s in fig.layout.shapes if s.type == "rect"]
    assert span.x0 == at(0)
    # A kill lasts milliseconds: still drawn as wide as a bucket.
    assert span.x1 == at(MIN_FAULT_SPAN_S)
    lines = {s.x0 for s in fig.layout.shapes if s.type == "line"}
    assert lines == {at(0.9), at(1.9), at(6.5)}  # each run's start, and whole again
    actions = fig.data[2]
    assert list(actions.text) == ["failover ✓", "failover ✗"]
    assert list(actions.marker.color) == ["#2fae63", "#dc3545"]
    assert {a.text for a in fig.layout.annotations} == {"kill-primary", "whole again"}


def test_a_trial_without_a_series_or_runs_still_draws_its_fault() -> None:
    trial = {"fault": {"kind": "kill-shop", "started_at": at(0), "ended_at": at(20)},
             "redundancy_s": None}  # fmt: skip
    fig = gameday_chart("kill-shop · trial 1", trial)
    assert list(fig.data) == [] and "no per-second series" in fig.layout.title.text
    [span] = fig.layout.shapes
    assert (span.x0, span.x1) == (at(0), at(20))
    failed = gameday_chart("x", {"fault": {"kind": "kill-shop"}, "error": "boom"})
    assert list(failed.layout.shapes) == []


def test_series_lines_are_rates_per_second_whatever_the_step() -> None:
    [orders, errors] = series_lines(
        {"start_at": at(0), "step_s": 2, "orders": [4, 6], "errors": [0, 1]}
    )
    assert orders == {"name": "orders/s", "x": [at(0), at(2)], "y": [2.0, 3.0]}
    assert errors["y"] == [0.0, 0.5]
    assert series_lines(None) == []


# -- the pages ------------------------------------------------------------------------------------
PASSED = "20261126T172900Z"
FAILED = "20261126T180000Z"


@pytest.fixture
def gamedays(tmp_path: Path) -> Path:
    where = tmp_path / "gamedays"
    where.mkdir()
    passed = {"kill-primary": [a_trial("kill-primary")], "kill-shop": [a_trial("kill-shop")]}
    (where / f"{PASSED}.json").write_text(json.dumps(a_report(passed, Objectives())))
    slow = {"hang-primary": [a_trial("hang-primary", runs=2), a_trial("hang-primary")]}
    (where / f"{FAILED}.json").write_text(json.dumps(a_report(slow, Objectives(outage_p99_s=1))))
    return where


@pytest.fixture
def app(tmp_path: Path, gamedays: Path) -> Iterator[Flask]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        instance_id="cp-test",
        api_token="generated-token",
        admin_password="admin-password",
        gamedays_dir=gamedays,
    )
    plane = ControlPlane(settings, executor=NoExecutor())
    accounts.add_user(plane.factory, "vera", "viewer", PASSWORD, utcnow())
    yield create_app_for(plane)
    plane.stop()


def create_app_for(plane: ControlPlane) -> Flask:
    from web import create_app

    return create_app(control_plane=plane)


def figures_of(page: str) -> list[dict[str, Any]]:
    found = re.search(r'<script type="application/json" id="gameday-figures">(.*?)</script>', page)
    assert found, "no figures in the page"
    figures: list[dict[str, Any]] = json.loads(found.group(1))
    return figures


def test_the_game_days_page_lists_each_run_with_its_verdict_per_fault(app: Flask) -> None:
    vera = logged_in(app, "vera")
    page = vera.get("/dashboard/gamedays").text
    assert re.search(r'<a href="/dashboard/gamedays" class="on">Game days', page)  # in the nav
    rows = re.findall(r'<tr data-run="(\w+)">(.*?)</tr>', page, re.S)
    assert [run for run, _ in rows] == [FAILED, PASSED]  # newest first
    failed, passed = (row for _, row in rows)
    assert re.search(r'data-fault="hang-primary".*?pill down">FAIL', failed, re.S)
    assert 'pill down">FAIL</span></td>' in failed
    assert re.search(r'data-fault="kill-primary".*?pill up">PASS', passed, re.S)
    assert re.search(r'data-fault="kill-shop".*?pill up">PASS', passed, re.S)
    assert "FAIL" not in passed


def test_a_run_page_draws_one_chart_per_trial_with_its_fault_and_runs(app: Flask) -> None:
    vera = logged_in(app, "vera")
    response = vera.get(f"/dashboard/gamedays/{FAILED}")
    assert response.status_code == 200
    page = response.text
    assert "outage_p99_s" in page and "(&lt; 1 s)" in page  # the objective it missed
    charts = re.findall(r'<div class="chart" id="(trial-\d+)"', page)
    figures = figures_of(page)
    assert charts == ["trial-1", "trial-2"] == [f["id"] for f in figures]
    assert '<script src="/dashboard/static/plotly.min.js">' in page  # never a CDN
    for figure, runs in zip(figures, (2, 1), strict=True):
        layout, data = figure["figure"]["layout"], figure["figure"]["data"]
        rects = [s["x0"] for s in layout["shapes"] if s["type"] == "rect"]
        assert [datetime.fromisoformat(x) for x in rects] == [T0]
        [actions] = [t for t in data if t["name"] == "actions"]
        assert len(actions["x"]) == runs and actions["text"][0] == "failover ✓"
        assert {t["name"] for t in data} == {"orders/s", "errors/s", "actions"}


def test_a_day_under_stress_that_stopped_early_says_so_and_names_the_trial_past_its_deadline(
    app: Flask, gamedays: Path
) -> None:
    stuck = a_trial("kill-standby", redundancy_s=None)
    stuck["at_deadline"] = {"after_s": 75.0, "stack": {}, "open_incidents": [{"id": 3}]}
    report = a_report({"kill-standby": [stuck]}, Objectives())
    report["stopped"] = "stopped after kill-standby: pg1 down, not redundant"
    report["not_run"] = ["kill-redis"]
    report["stress"] = {"cpu_workers": 2, "load_avg_1m": {"min": 5.9, "mean": 7.1, "max": 8.0}}
    run_id = "20261207T080000Z"
    (gamedays / f"{run_id}.json").write_text(json.dumps(report))
    page = logged_in(app, "vera").get(f"/dashboard/gamedays/{run_id}").text
    assert "Stopped early: stopped after kill-standby: pg1 down" in page
    assert "never ran: kill-redis" in page
    assert "under stress: 2 CPU hogs, load average 5.9\u20138.0" in page
    assert "not whole at its deadline</span>: 1 incident(s) open then" in page


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/gamedays/20200101T000000Z",  # the shape of an id, but no such run
        "/dashboard/gamedays/notes",  # a file in the directory that is not a run
        "/dashboard/gamedays/..%2F..%2Fstate",
        "/dashboard/gamedays/%2E%2E",
        "/dashboard/gamedays/..",
        f"/dashboard/gamedays/{PASSED}%2F..%2F..%2Fstate",
        f"/dashboard/gamedays/{PASSED}.json",
        "/dashboard/gamedays/x/report.json",
    ],
)
def test_an_id_that_names_no_run_is_a_404_page(app: Flask, gamedays: Path, path: str) -> None:
    (gamedays / "notes.json").write_text(json.dumps({"secret": "not a run"}))
    response = logged_in(app, "vera").get(path)
    assert response.status_code == 404
    assert "secret" not in response.text


def test_the_stored_report_is_served_as_written(app: Flask, gamedays: Path) -> None:
    response = logged_in(app, "vera").get(f"/dashboard/gamedays/{PASSED}/report.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.data == (gamedays / f"{PASSED}.json").read_bytes()


BROKEN = "20261126T190000Z"


def sparse(path: Path, size: int) -> None:
    with path.open("w") as f:
        f.truncate(size)


@pytest.mark.parametrize(
    ("write", "said"),
    [
        (lambda p: p.write_text('{"started_at": "2026-11-26T1'), "is not valid JSON"),
        (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (lambda p: p.write_text(json.dumps({"verdict": "PASS"})), "is not a game-day report"),
        (lambda p: sparse(p, 17 * 1024 * 1024), "more than a report"),
        (lambda p: p.symlink_to("/etc/hostname"), "is not a regular file"),
    ],
)
def test_a_bad_report_file_is_named_not_a_500(
    app: Flask, gamedays: Path, write: Any, said: str
) -> None:
    write(gamedays / f"{BROKEN}.json")
    vera = logged_in(app, "vera")
    page = vera.get(f"/dashboard/gamedays/{BROKEN}")
    assert page.status_code == 422 and said in page.text and "<html" in page.text
    assert vera.get(f"/dashboard/gamedays/{BROKEN}/report.json").status_code == 422
    listed = vera.get("/dashboard/gamedays")
    assert listed.status_code == 200
    row = re.search(rf'<tr data-run="{BROKEN}">(.*?)</tr>', listed.text, re.S)
    assert row and said in row.group(1) and "unreadable" in row.group(1)
    assert f'data-run="{PASSED}"' in listed.text  # the others are still listed


def test_a_stranger_is_sent_to_log_in_before_any_run(app: Flask) -> None:
    response = app.test_client().get(f"/dashboard/gamedays/{PASSED}")
    assert response.status_code == 302 and "/login" in response.location


def test_without_a_game_day_directory_the_page_says_how_to_set_one(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", instance_id="cp-t")
    plane = ControlPlane(settings, executor=NoExecutor())
    try:
        accounts.add_user(plane.factory, "vera", "viewer", PASSWORD, utcnow())
        vera = logged_in(create_app_for(plane), "vera")
        page = vera.get("/dashboard/gamedays")
        assert page.status_code == 200 and "gamedays_dir" in page.text
        assert vera.get(f"/dashboard/gamedays/{PASSED}").status_code == 404
    finally:
        plane.stop()


def test_a_report_whose_times_cannot_be_drawn_is_named_not_a_500(
    app: Flask, gamedays: Path
) -> None:
    trial = a_trial("kill-shop")
    trial["series"]["start_at"] = "9999-12-31T23:59:59+00:00"
    report = a_report({"kill-shop": [trial]}, Objectives())
    (gamedays / f"{BROKEN}.json").write_text(json.dumps(report))
    page = logged_in(app, "vera").get(f"/dashboard/gamedays/{BROKEN}")
    assert page.status_code == 422 and "kill-shop · trial 1" in page.text
    trial = a_trial("kill-shop", redundancy_s=1e300)
    (gamedays / f"{BROKEN}.json").write_text(json.dumps(a_report({"x": [trial]}, Objectives())))
    page = logged_in(app, "vera").get(f"/dashboard/gamedays/{BROKEN}")
    assert page.status_code == 422 and "redundancy_s" in page.text


# -- attacks: what a report file, a name in it or an id can do ------------------------------------
PAGES_OF_BROKEN = [
    f"/dashboard/gamedays/{BROKEN}",
    "/dashboard/gamedays",
    f"/dashboard/gamedays/{BROKEN}/report.json",
]


@pytest.mark.parametrize("path", PAGES_OF_BROKEN)
@pytest.mark.parametrize(
    "where", [("started_at",), ("trials", "kill-shop", 0, "runs", 0, "created_at")]
)
def test_a_time_that_is_out_of_range_in_utc_is_named_not_a_500(
    app: Flask, gamedays: Path, path: str, where: tuple[Any, ...]
) -> None:
    report = a_report({"kill-shop": [a_trial("kill-shop")]}, Objectives())
    holder: Any = report
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = "0001-01-01T00:00:00+01:00"  # before year 1 once in UTC
    (gamedays / f"{BROKEN}.json").write_text(json.dumps(report))
    response = logged_in(app, "vera").get(path)
    assert response.status_code == (200 if path == "/dashboard/gamedays" else 422)
    assert "out of range" in response.text and "<html" in response.text


@pytest.mark.parametrize("path", PAGES_OF_BROKEN)
def test_text_that_is_not_unicode_in_a_report_is_named_not_a_500(
    app: Flask, gamedays: Path, path: str
) -> None:
    trial = a_trial("kill-shop")
    trial["error"] = "lost \ud800 half a character"
    report = a_report({"kill-shop": [trial]}, Objectives())
    report["load"]["acknowledged"] = "\udfff"  # shown on the list
    (gamedays / f"{BROKEN}.json").write_text(json.dumps(report))  # JSON's "\ud800": valid UTF-8
    response = logged_in(app, "vera").get(path)
    assert response.status_code == (200 if path == "/dashboard/gamedays" else 422)
    assert "not valid Unicode" in response.text


def test_a_report_of_more_trials_than_a_soak_makes_is_refused_before_each_is_read(
    app: Flask, gamedays: Path
) -> None:
    from web.gamedays import MAX_TRIALS

    trials = ",".join(['{"fault":{"kind":"k"}}'] * (MAX_TRIALS + 1))
    (gamedays / f"{BROKEN}.json").write_text(
        '{"started_at":"2026-11-26T17:29:00Z","verdict":"PASS","verdicts":[],'
        f'"trials":{{"k":[{trials}]}}}}'
    )
    vera = logged_in(app, "vera")
    page = vera.get(f"/dashboard/gamedays/{BROKEN}")
    assert page.status_code == 422 and "more than a report may have" in page.text


def test_names_in_a_report_are_text_in_the_page_and_in_its_charts(
    app: Flask, gamedays: Path
) -> None:
    trial = a_trial("kill-shop", runs=2)
    trial["fault"]["target"] = '<a href="https://evil.example/">pg0</a>'
    trial["runs"][0]["action"] = '<span style="font-size:300px">failover</span>'
    trial["runs"][1]["target"] = "<b>shop</b>&amp;"
    trial["runs"][1]["finished_at"] = None
    failed = a_trial("kill-shop")
    failed["error"] = "<script>alert(1)</script>"
    report = a_report({"<img src=x onerror=alert(1)>": [trial, failed]}, Objectives())
    (gamedays / f"{BROKEN}.json").write_text(json.dumps(report))
    page = logged_in(app, "vera").get(f"/dashboard/gamedays/{BROKEN}").text
    assert "<script>alert" not in page and "<img src=x" not in page and '<a href="https' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    figure = figures_of(page)[0]["figure"]
    [actions] = [t for t in figure["data"] if t["name"] == "actions"]
    shown = [figure["layout"]["title"]["text"], *actions["text"]]
    shown += [str(v) for row in actions["customdata"] for v in row]
    assert not [text for text in shown if "<" in text or ">" in text]
    assert figure["layout"]["title"]["text"].startswith("&lt;img src=x onerror=alert(1)&gt;")
    assert actions["text"][0] == '&lt;span style="font-size:300px"&gt;failover&lt;/span&gt; ✓'
    assert actions["customdata"][1][2] == "&lt;b&gt;shop&lt;/b&gt;&amp;amp;"
    assert actions["customdata"][1][5] == "not finished"


def test_an_id_in_digits_other_than_ascii_names_no_run(app: Flask, gamedays: Path) -> None:
    wide = "".join(chr(0xFF10 + int(d)) for d in "20261126") + "T172900Z"  # `\d` takes them
    (gamedays / f"{wide}.json").write_bytes((gamedays / f"{PASSED}.json").read_bytes())
    vera = logged_in(app, "vera")
    assert vera.get(f"/dashboard/gamedays/{wide}").status_code == 404
    assert wide not in vera.get("/dashboard/gamedays").text


def test_a_report_swapped_for_a_fifo_while_read_never_hangs_a_worker(gamedays: Path) -> None:
    """The name is checked, then opened: a FIFO put there in between must not block the open."""
    from controlplane.errors import NotFound
    from web.gamedays import UnreadableReport, read_bytes

    path, report = gamedays / f"{BROKEN}.json", gamedays / "report.tmp"
    stop, reads = threading.Event(), [0]

    def swap() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            report.write_bytes(b"{}")
            os.replace(report, path)
            fifo = gamedays / f"{n}.fifo"  # kept by this name, to be opened (and so freed) below
            os.mkfifo(fifo)
            os.link(fifo, gamedays / "fifo.tmp")
            os.replace(gamedays / "fifo.tmp", path)

    def read() -> None:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with contextlib.suppress(UnreadableReport, NotFound):
                read_bytes(path)
            reads[0] += 1

    swapper = threading.Thread(target=swap, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    swapper.start()
    reader.start()
    reader.join(timeout=5)
    stop.set()
    swapper.join()
    hung = reader.is_alive()
    for fifo in gamedays.glob("*.fifo"):  # a writer's open lets a blocked reader's open return
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(timeout=5)
    assert not hung, f"a worker waits on a FIFO for a writer that never comes ({reads[0]} reads)"


def test_a_worker_reading_its_most_reports_at_once_answers_503_rather_than_use_more_memory(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    from web import gamedays as pages

    monkeypatch.setattr(pages, "READ_WAIT_S", 0.05)
    vera = logged_in(app, "vera")
    held = [pages._reading.acquire(timeout=1) for _ in range(pages.MAX_READING)]
    try:
        assert all(held)
        busy = vera.get(f"/dashboard/gamedays/{PASSED}")
        assert busy.status_code == 503 and "try again" in busy.text and "<html" in busy.text
    finally:
        for _ in held:
            pages._reading.release()
    assert vera.get(f"/dashboard/gamedays/{PASSED}").status_code == 200


def test_many_viewers_at_once_each_get_the_run_page(app: Flask) -> None:
    vera = logged_in(app, "vera")

    def view(_: int) -> tuple[int, int]:
        page = vera.get(f"/dashboard/gamedays/{FAILED}")
        return page.status_code, len(figures_of(page.text))

    with ThreadPoolExecutor(8) as pool:  # a worker's threads
        assert set(pool.map(view, range(16))) == {(200, 2)}
