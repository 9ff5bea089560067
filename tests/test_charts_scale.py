"""The charts under an alert storm: what is drawn stays bounded (merged spans, capped markers,
one shapes list), and N viewers of one range cost one computation in a bounded thread."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from web.charts import MAX_MARKERS, MAX_SPANS, all_charts, bound_notes, line_chart, merge_spans
from web.shared_reads import Busy, SharedComputation

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DAY = ((NOW - timedelta(hours=24)).isoformat(), NOW.isoformat())


def iso(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).isoformat()


def span(start_ago: float, end_ago: float, n: int = 1) -> dict[str, Any]:
    return {"start": iso(start_ago), "end": iso(end_ago), "label": f"#{n} alert on svc-{n}"}


def marker(ago: float, n: int) -> dict[str, Any]:
    return {"at": iso(ago), "action": "restart", "target": f"t{n}", "state": "succeeded",
            "who": "loop", "id": n}  # fmt: skip


def test_overlapping_and_adjacent_spans_become_one_with_a_count() -> None:
    merged = merge_spans([span(100, 50, 1), span(80, 10, 2), span(9, 0, 3), span(500, 400, 4)], 2)
    assert [(m["start"], m["end"], m["count"]) for m in merged] == [
        (iso(500), iso(400), 1),
        (iso(100), iso(0), 3),
    ]
    assert merged[0]["label"] == "#4 alert on svc-4"
    assert merged[1]["label"].startswith("3 incidents: #1 alert on svc-1, #2")


def test_a_merged_spans_hover_names_the_first_few_and_counts_the_rest() -> None:
    [merged] = merge_spans([span(100, 0, n) for n in range(40)])
    assert merged["count"] == 40 and merged["label"].endswith(" and 35 more")


def test_a_thousand_incidents_in_a_day_draw_a_bounded_figure_quickly() -> None:
    # Disjoint incidents ten minutes apart: too far to merge, more than are drawn.
    spans = [span(600 * n + 60, 600 * n, n) for n in range(140)]
    spans += [span(3600, 0, n) for n in range(1000, 2000)]  # and a storm, all at once
    markers = [marker(n * 10, n) for n in range(1000)]
    series = {
        f"p{k}": {"title": f"P{k}", "unit": "s", "lines": [{"name": "a", "x": [iso(0)], "y": [1]}]}
        for k in range(8)
    }
    notes = {"spans": spans, "markers": markers, "spans_total": 3000, "markers_total": 1500}
    started = time.perf_counter()
    figs = all_charts(series, notes, DAY)
    assert time.perf_counter() - started < 5  # add_vrect in a loop: minutes
    fig = figs["p0"]
    assert len(fig.layout.shapes) == MAX_SPANS
    [bars] = [t for t in fig.data if t.name == "incidents"]
    [runs] = [t for t in fig.data if t.name == "actions"]
    assert len(runs.x) == MAX_MARKERS and runs.x[-1] == iso(0)  # the most recent are drawn
    assert len(bars.x) == 3 * MAX_SPANS
    [note] = fig.layout.annotations
    assert "more incidents not drawn" in note.text and "1200 more runs not drawn" in note.text


def test_every_incident_is_accounted_for_drawn_or_not() -> None:
    spans = [span(600 * n + 60, 600 * n, n) for n in range(100)]
    drawn = bound_notes({"spans": spans, "spans_total": 250}, DAY)
    assert sum(s["count"] for s in drawn.spans) + drawn.incidents_not_drawn == 250
    assert drawn.runs_not_drawn == 0


def test_nothing_is_left_out_when_everything_fits() -> None:
    fig = line_chart("t", [], spans=[span(100, 50)], markers=[marker(10, 1)], x_range=DAY)
    assert len(fig.layout.shapes) == 1 and not fig.layout.annotations


def test_a_span_label_from_outside_is_shown_as_text_not_markup() -> None:
    evil = {"start": iso(10), "end": iso(0), "label": '#1 x on <a href="//e">t</a>'}
    fig = line_chart("t", [], spans=[evil])
    assert "<a" not in fig.data[0].text[0] and "&lt;a" in fig.data[0].text[0]


def test_many_viewers_of_one_key_cost_one_computation() -> None:
    shared = SharedComputation[int](fresh_s=60, at_once=8)
    calls: list[int] = []
    gate = threading.Event()

    def compute() -> int:
        gate.wait(5)
        calls.append(1)
        return 42

    answers: list[int] = []
    threads = [
        threading.Thread(target=lambda: answers.append(shared.get("24h", compute)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert answers == [42] * 6 and len(calls) == 1
    assert shared.get("24h", compute) == 42 and len(calls) == 1  # fresh: not recomputed


def test_a_stale_answer_is_recomputed_by_one_while_others_get_the_last() -> None:
    now = [0.0]
    shared = SharedComputation[int](fresh_s=5, at_once=4, clock=lambda: now[0])
    assert shared.get("k", lambda: 1) == 1
    now[0] = 10.0
    inside = threading.Event()
    release = threading.Event()

    def slow() -> int:
        inside.set()
        release.wait(5)
        return 2

    worker = threading.Thread(target=lambda: shared.get("k", slow))
    worker.start()
    assert inside.wait(5)
    assert shared.get("k", lambda: pytest.fail("computed twice")) == 1  # the last answer
    release.set()
    worker.join(5)
    assert shared.get("k", lambda: 3) == 2


def test_beyond_its_threads_a_viewer_with_nothing_to_show_is_told_to_retry() -> None:
    shared = SharedComputation[int](fresh_s=5, at_once=1)
    inside, release = threading.Event(), threading.Event()

    def slow() -> int:
        inside.set()
        release.wait(5)
        return 1

    worker = threading.Thread(target=lambda: shared.get("a", slow))
    worker.start()
    assert inside.wait(5)
    started = time.perf_counter()
    with pytest.raises(Busy):
        shared.get("b", lambda: 2)  # another range: no thread left for it
    with pytest.raises(Busy):
        shared.get("a", lambda: 2)  # the same one: no thread left to wait in either
    assert time.perf_counter() - started < 0.5
    release.set()
    worker.join(5)
    assert shared.get("b", lambda: 2) == 2


def test_a_failed_computation_is_not_kept() -> None:
    shared = SharedComputation[int](fresh_s=5, at_once=2)

    def broken() -> int:
        raise RuntimeError("prometheus")

    with pytest.raises(RuntimeError):
        shared.get("k", broken)
    assert shared.get("k", lambda: 7) == 7
