"""`make bench`'s table: every verdict recomputed from the figure and bench/goals.toml; a goal
out of reach, a figure missing, a benchmark without figures, a figure in another unit or from
another commit is a FAIL and a non-zero exit; every goal judges a figure that a benchmark's
`headline` writes. Pure: no servers (the benchmarks are imported, never run)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import (
    catalog,
    controlplane,
    dashboard,
    failover,
    flood,
    hang,
    hosts,
    orders,
    persist,
    restore,
    scale,
    ssh,
)
from lab.bench_goals import (
    BENCHES,
    GOALS_FILE,
    RUN_FILE,
    TABLE_FILE,
    Figure,
    load_goals,
    main,
    save,
    start,
)

GOALS = """
[[goal]]
id = "failover.outage_p50.next"
figure = "failover.outage_p50_s"
name = "kill -> first acknowledged order, p50"
op = "<"
bound = 0.25
unit = "s"

[[goal]]
id = "failover.lost"
figure = "failover.lost"
name = "acknowledged orders lost"
op = "=="
bound = 0
"""


def a_run(tmp_path: Path, failover: list[Figure], goals: str = GOALS) -> Path:
    """A run's directory as `make bench` leaves it: its start, then every benchmark's file
    (only failover with figures), written by the same `save` the benchmarks call."""
    (tmp_path / "goals.toml").write_text(goals)
    out = tmp_path / "out"
    start(out)
    for bench in BENCHES:
        save(out / f"{bench}.json", failover if bench == "failover" else [])
    return out


def table_of(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main([str(out), "--goals", str(out.parent / "goals.toml")])
    printed = capsys.readouterr().out
    assert (out / TABLE_FILE).read_text() == printed, "TABLE.md is what was printed"
    return status, printed


def test_figures_within_every_goal_pass_and_exit_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(
        tmp_path, [Figure("failover.outage_p50_s", 0.2, "s"), Figure("failover.lost", 0, "")]
    )
    status, printed = table_of(out, capsys)
    assert status == 0, printed
    assert (
        "| failover.outage_p50.next | kill -> first acknowledged order, p50 | 0.20 s | < 0.25 s "
        "| PASS |" in printed
    )
    assert "| failover.lost | acknowledged orders lost | 0 | == 0 | PASS |" in printed
    assert "2 of 2 checks PASS; 0 FAIL." in printed


def test_a_goal_set_out_of_reach_prints_fail_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_of_reach = GOALS.replace("bound = 0.25", "bound = 0.001")
    out = a_run(
        tmp_path,
        [Figure("failover.outage_p50_s", 0.2, "s"), Figure("failover.lost", 0, "")],
        out_of_reach,
    )
    status, printed = table_of(out, capsys)
    assert status == 1
    assert "| 0.20 s | < 0.00 s | FAIL |" in printed
    assert "1 of 2 checks PASS; 1 FAIL." in printed


def test_a_figure_missing_from_its_benchmarks_output_is_a_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(tmp_path, [Figure("failover.outage_p50_s", 0.2, "s")])
    status, printed = table_of(out, capsys)
    assert status == 1
    assert (
        "| failover.lost | acknowledged orders lost | none | == 0 | "
        "FAIL (no figure: failover.lost missing from failover's output) |"
    ) in printed


def test_a_benchmark_that_left_no_figures_fails_each_of_its_goals_and_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(tmp_path, [])
    (out / "failover.json").unlink()
    (out / "scale.json").unlink()
    status, printed = table_of(out, capsys)
    assert status == 1
    assert printed.count("FAIL (no figure: failover left none)") == 2
    assert "| scale | scale: no figures | none |  | FAIL (no figures) |" in printed


def test_a_stored_verdict_is_never_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(tmp_path, [])
    body = json.loads((out / "failover.json").read_text())
    body["figures"] = [
        {"id": "failover.outage_p50_s", "value": 9.0, "unit": "s", "goal": "< 10 s", "met": True},
        {"id": "failover.lost", "value": 3, "unit": "", "met": True},
    ]
    (out / "failover.json").write_text(json.dumps(body))
    status, printed = table_of(out, capsys)
    assert status == 1
    assert "| 9 s | < 0.25 s | FAIL |" in printed
    assert "| 3 | == 0 | FAIL |" in printed


def test_a_figure_in_another_unit_or_not_a_number_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(
        tmp_path,
        [Figure("failover.outage_p50_s", 200, "ms"), Figure("failover.lost", float("nan"), "")],
    )
    status, printed = table_of(out, capsys)
    assert status == 1
    assert "| 200 ms | < 0.25 s | FAIL (in 'ms', the goal in 's') |" in printed
    assert "| none | == 0 | FAIL (not a number) |" in printed


def test_a_figure_that_never_came_reads_never_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(
        tmp_path,
        [Figure("failover.outage_p50_s", float("inf"), "s"), Figure("failover.lost", 0, "")],
    )
    status, printed = table_of(out, capsys)
    assert status == 1
    assert "| never | < 0.25 s | FAIL |" in printed


def test_figures_from_another_commit_or_a_run_never_started_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(
        tmp_path, [Figure("failover.outage_p50_s", 0.2, "s"), Figure("failover.lost", 0, "")]
    )
    body = json.loads((out / "orders.json").read_text())
    body["commit"] = "0" * 40
    (out / "orders.json").write_text(json.dumps(body))
    (out / RUN_FILE).unlink()
    status, printed = table_of(out, capsys)
    assert status == 1
    assert "FAIL (no RUN.json)" in printed
    assert "| orders | orders's figures |  |  | FAIL (measured on 000000000000" in printed


def test_the_table_records_the_commit_the_load_and_the_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_run(
        tmp_path, [Figure("failover.outage_p50_s", 0.2, "s"), Figure("failover.lost", 0, "")]
    )
    run = json.loads((out / RUN_FILE).read_text())
    _, printed = table_of(out, capsys)
    first = printed.splitlines()[0]
    assert first.startswith(f"`make bench` on {run['commit'][:12]} (")
    assert "load average (1 min)" in first and f"nproc {run['nproc']}" in first


A_SCALE_RESULT = scale.Result(
    "asyncio", 1000, 100, 70.0, 14000, 200.0, 0.8, 6.9, 9.0, 0.38, 0.24, 0.71, 1.9, 103.0,
    123.0, 720000.0, 88.0, 500000, 61.0, 511995, [], 100, 440.0, 678.0, 100, 0,
)  # fmt: skip

# Each benchmark's `headline`, called on made-up measurements of the shape its run produces.
HEADLINES: dict[str, Callable[[], list[Figure]]] = {
    "orders": lambda: orders.headline(
        {
            "clients": 16,
            "runs": [
                {
                    "shop": {
                        "tps": 400.0,
                        "p99_ms": 50.0,
                        "cpu": {"shop_ms": 1.0, "postgres_ms": 1.0},
                    },
                    "pgbench_2pc": {"tps": 600.0},
                    "pgbench_2pc_batched": {"tps": 500.0},
                }
            ],
        }
    ),
    "catalog": lambda: catalog.headline(
        {"runs": [{c.name: {"rps": 100.0} for c in catalog.CASES}]}
    ),
    "controlplane": lambda: controlplane.headline(
        {"opened_s": [1.0], "recovered_s": [2.0]},
        [0.1],
        {"alerts_per_s": 300.0, "incidents": 50, "distinct": 50},
        [3.0],
    ),
    "failover": lambda: failover.headline([failover.Trial(0.3, 1.2, [], "")], [(0.1, 1.0)], 0, 0),
    "hang": lambda: hang.headline(
        [
            hang.Trial("primary pg0", 15, 6.0, 6.0, 12.0, [], 0, 1, 0),
            hang.Trial("standby pg1", 15, 5.0, 5.0, 10.0, [], 0, 0, 0),
        ],
        0,
        0,
    ),
    "persist": lambda: persist.headline(
        [
            persist.Trial("standby-stopped", 8.0, 2.0, 2, 10.0),
            persist.Trial("five-kills", 1.0, None, 1, 3.0),
        ],
        0,
        0,
        0,
        {
            how: {
                "trials": {"kill-primary": [{"outage_s": 0.5, "healed_by": "control plane"}]},
                "verification": {"ok": True, "lost": 0, "duplicates": 0},
            }
            for how in ("quiet", "stress")
        },
    ),
    "restore": lambda: restore.headline(
        [
            restore.Trial("control plane", 3.0, 5.0, 1.0, {"total_s": 4.0}),
            restore.Trial("raw tools", 2.0, 4.0),
        ]
    ),
    "flood": lambda: flood.headline(
        {"quiet": {"recovered_s": 2.0}, "flood": {"recovered_s": 2.5, "cycle_p99_s": 0.5}},
        {
            "loaded_probe_runs_per_s": 10.0,
            "quiet_probe_runs_per_s": 10.0,
            "p99_s": 0.05,
            "errors": 0,
        },
        "closed loop",
    ),
    "scale": lambda: scale.headline(A_SCALE_RESULT),
    "hosts": lambda: hosts.headline([(0.4, 3.0), (0.5, 4.0)], [(7.0, 6.0)], 0),
    "ssh": lambda: ssh.headline(120.0, [3.0, 3.5, 4.0], [70.0, 75.0], [230.0], 3.0),
    "dashboard": lambda: dashboard.headline(
        {name: [0.01, 0.02] for name in dashboard.ENDPOINTS},
        dict.fromkeys(dashboard.ENDPOINTS, 0),
        10.0,
        10.0,
        50,
    ),
}


def test_every_benchmark_has_a_headline_and_writes_only_its_own_figure_ids() -> None:
    assert set(HEADLINES) == set(BENCHES)
    for bench, headline in HEADLINES.items():
        figures = headline()
        ids = [f.id for f in figures]
        assert len(ids) == len(set(ids)), f"{bench} writes an id twice: {ids}"
        assert all(i.startswith(f"{bench}.") for i in ids), ids


def test_every_goal_in_the_goals_file_parses_and_judges_a_figure_a_benchmark_writes() -> None:
    goals = load_goals(GOALS_FILE)
    written = {f.id: f for headline in HEADLINES.values() for f in headline()}
    for goal in goals:
        assert goal.figure in written, f"{goal.id}: no benchmark's headline writes {goal.figure}"
        assert written[goal.figure].unit == goal.unit, (goal.id, written[goal.figure].unit)
    assert {b for b in BENCHES} == {g.figure.split(".")[0] for g in goals}, "a bench without goals"


def test_the_next_goals_of_issue_19_are_in_the_goals_file() -> None:
    goals = {g.id: g for g in load_goals(GOALS_FILE)}
    expected = {
        "failover.outage_p50.next": ("<", 0.25, "s"),
        "failover.outage_p99.next": ("<", 0.5, "s"),
        "failover.redundant_p50.next": ("<", 1.5, "s"),
        "hang.primary_outage.next": ("<", 4.0, "s"),
        "orders.vs_pgbench.next": (">=", 0.8, "x"),
    }
    for goal_id, (op, bound, unit) in expected.items():
        assert (goals[goal_id].op, goals[goal_id].bound, goals[goal_id].unit) == (op, bound, unit)


def test_a_goals_file_naming_no_benchmark_or_an_id_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "goals.toml"
    path.write_text(GOALS.replace('figure = "failover.lost"', 'figure = "nowhere.lost"'))
    with pytest.raises(ValueError, match="names no benchmark"):
        load_goals(path)
    path.write_text(GOALS + GOALS.split("\n\n")[0].replace("[[goal]]", "\n[[goal]]"))
    with pytest.raises(ValueError, match="appears twice"):
        load_goals(path)
