"""`make bench`'s table: every figure beside its goal, and a benchmark that left no figures is
named, never passed over."""

from __future__ import annotations

from pathlib import Path

from lab.bench_goals import BENCHES, Figure, load, save, table


def test_the_table_marks_each_goal_met_or_not_and_names_benchmarks_without_figures(
    tmp_path: Path,
) -> None:
    save(
        tmp_path / "orders.json",
        [
            Figure("orders", "shop / pgbench 2PC throughput", 0.69, "x", ">= 0.6x", True),
            Figure("orders", "shop p99 at 16 clients", 116.4, "ms", "< 60 ms", False),
            Figure("orders", "shop orders/s", 812.0, "/s", "", None),
        ],
    )
    figures, missing = load(tmp_path)
    assert [f.what for f in figures] == [
        "shop / pgbench 2PC throughput",
        "shop p99 at 16 clients",
        "shop orders/s",
    ]
    assert missing == [b for b in BENCHES if b != "orders"]
    text = table(figures, missing)
    assert "| orders | shop / pgbench 2PC throughput | x0.69 | >= 0.6x | yes |" in text
    assert "| orders | shop p99 at 16 clients | 116 ms | < 60 ms | **no** |" in text
    assert "| orders | shop orders/s | 812 /s |  |  |" in text
    assert "| flood | (no figures: the benchmark did not finish) | | | **no** |" in text
    assert f"1 of 2 goals met; {len(BENCHES) - 1} benchmarks without figures." in text


def test_a_figure_that_never_came_reads_none_not_infinity(tmp_path: Path) -> None:
    save(
        tmp_path / "hang.json",
        [Figure("hang", "redundant after", float("inf"), "s", "< 30 s", False)],
    )
    figures, _ = load(tmp_path)
    assert "| hang | redundant after | none | < 30 s | **no** |" in table(figures, [])
