"""The control plane's cost as its work grows: one ControlPlane (in this process) watching 10,
100 and 1,000 targets, HTTP and TCP probes each every 5 s against real servers on loopback
ports (one server process: asyncio HTTP servers answering 200, TCP listeners that accept, and
bound-but-not-listening ports that refuse: the failing share, whose incidents stay open).

For each size, after a warm-up, over a bounded window:
  - scheduling lag of every probe run (how late it started behind its tick): p50, p99;
  - CPU of this process (the control plane: probe runner, writer, loop, scheduler; the
    servers are another process) per probe run, and as a share of one core;
  - memory (RSS);
  - state-store growth: rows written per hour and their bytes (extrapolated from the window,
    bytes per row measured on the store), and the bound the prune job holds it to
    (probe_history_keep rows per probe; the store is filled to that bound before the start,
    so the loop and the prune job work on a store of its steady-state size);
  - loop cycle time, with the failing share's incidents open (100 at 1,000 targets).

`--runner apscheduler` runs the probes as before (one APScheduler job per probe on a pool of
16 threads, one write transaction per run), for comparison. Goal: 1,000 targets at 5 s (200
probe runs/s) on one core with lag p99 < 250 ms, and history that stays bounded.

Usage: python bench/scale.py [--sizes 10,100,1000] [--runner asyncio,apscheduler]
                             [--window-s 70] [--warmup-s 15] [--html bench/scale.html]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

# The repository before bench/ (whose controlplane.py would hide the package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane import store
from controlplane.config import Settings
from controlplane.runtime import ControlPlane
from lab.bench_goals import Figure, goal, save

HERE = Path(__file__).resolve().parent
INTERVAL_S = 5.0
SAMPLE_EVERY_S = 1.0
COUNT_EVERY_S = 5.0  # rows in the state store (a count is a scan: not every second)


# -- the servers (another process) ----------------------------------------------------------------
def serve(http: int, tcp: int, dead: int) -> None:
    """Listen on `http` + `tcp` loopback ports, hold `dead` more bound but not listening
    (a connection is refused), print the ports as one JSON line, serve until stdin closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\nok"
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        http_servers = [await asyncio.start_server(answer, "127.0.0.1", 0) for _ in range(http)]
        tcp_servers = [await asyncio.start_server(accept, "127.0.0.1", 0) for _ in range(tcp)]
        refusing = []
        for _ in range(dead):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            refusing.append(sock)
        ports = {
            "http": [s.sockets[0].getsockname()[1] for s in http_servers],
            "tcp": [s.sockets[0].getsockname()[1] for s in tcp_servers],
            "dead": [s.getsockname()[1] for s in refusing],
        }
        print(json.dumps(ports), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin

    asyncio.run(main())


class Servers:
    def __init__(self, http: int, tcp: int, dead: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", f"{http},{tcp},{dead}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError("the server process did not start")
        self.ports: dict[str, list[int]] = json.loads(line)

    def stop(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


# -- one size, in a process of its own -------------------------------------------------------------
@dataclass
class Result:
    runner: str
    targets: int
    failing: int
    window_s: float
    runs: int
    runs_per_s: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    cpu_share: float  # of one core
    loop_cpu_share: float  # of which the decision loop's cycles
    probing_cpu_ms_per_run: float  # the rest (probing, writing, metrics, scheduling) per run
    cpu_ms_per_run: float
    rss_mb: float
    bytes_per_row: float
    rows_per_hour: float
    mb_per_hour_unpruned: float
    bound_rows: int
    bound_mb: float
    rows_max: int
    prunes: list[tuple[float, float]]  # (at, seconds) in the window
    cycles: int
    cycle_p50_ms: float
    cycle_p99_ms: float
    open_incidents: int
    skipped: int
    rows_over_time: list[tuple[float, int]] = field(default_factory=list)
    rss_over_time: list[tuple[float, float]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def targets(ports: dict[str, list[int]], size: int, failing_share: float) -> dict[str, Any]:
    failing = round(size * failing_share)
    healthy = size - failing
    http, tcp, dead = ports["http"], ports["tcp"], ports["dead"]
    probes: list[dict[str, Any]] = []
    for i in range(healthy):
        port = http[i // 2] if i % 2 == 0 else tcp[i // 2]
        probes.append(probe(f"up-{i}", i % 2 == 0, port))
    for i in range(failing):
        probes.append(probe(f"down-{i}", i % 2 == 0, dead[i]))
    return {
        "services": [{"name": f"svc-{n}"} for n in range(10)],
        "probes": [{**p, "service": f"svc-{n % 10}"} for n, p in enumerate(probes)],
    }


def probe(name: str, is_http: bool, port: int) -> dict[str, Any]:
    params = {"url": f"http://127.0.0.1:{port}/healthz"} if is_http else {"port": port}
    kind = "http" if is_http else "tcp"
    return {"name": name, "kind": kind, "interval_s": INTERVAL_S, "params": params}


def settings_for(
    ports: dict[str, list[int]], size: int, failing_share: float, keep: int, db_path: Path
) -> Settings:
    return Settings.model_validate(
        {
            **targets(ports, size, failing_share),
            "database_url": f"sqlite:///{db_path}",
            "probe_history_keep": keep,
            "instance_id": "bench-scale",
        }
    )


def prefill(database_url: str, settings: Settings, keep: int) -> None:
    """Each probe's history at its bound, as after a long run: `keep` runs a probe. Done by
    the parent, so that the control plane's process does not carry the filling's memory."""
    engine = store.make_engine(database_url)
    store.migrate(engine)
    factory = store.session_factory(engine)
    now = datetime.now(UTC)
    for spec in settings.probes:
        up = spec.name.startswith("up-")
        rows = [
            {
                "probe": spec.name,
                "kind": spec.kind,
                "target": spec.service,
                "health": "up" if up else "down",
                "latency_ms": 1.0,
                "summary": "HTTP 200" if up else "ConnectionRefusedError: refused",
                "details": {},
                "at": now - timedelta(seconds=(keep - k) * spec.interval_s),
            }
            for k in range(keep)
        ]
        with store.transaction(factory) as s:
            store.record_probe_runs(s, rows)
    engine.dispose()


class OldRunner:
    """The probes as before this benchmark: one APScheduler job per probe (all due at the
    start, then every interval) on a pool of 16 threads, `run_probe` writing each run in a
    transaction of its own; lag measured when a job is submitted, as the old code did."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.lags_s: list[float] = []
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": {"type": "threadpool", "max_workers": 16}},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        self.scheduler.add_listener(self._on_submit, EVENT_JOB_SUBMITTED)
        self.runs = 0

    def _on_submit(self, event: JobSubmissionEvent) -> None:
        if event.scheduled_run_times:
            lag = datetime.now(UTC) - event.scheduled_run_times[-1]
            self.lags_s.append(max(0.0, lag.total_seconds()))
            self.runs += 1

    def start(self) -> None:
        now = datetime.now(UTC)
        for spec in self.cp.settings.probes:
            self.scheduler.add_job(
                self.cp.run_probe,
                IntervalTrigger(seconds=spec.interval_s),
                args=[spec],
                id=f"probe:{spec.name}",
                next_run_time=now,
            )
        self.scheduler.add_job(self.cp.prune, IntervalTrigger(seconds=60), id="prune")
        self.scheduler.start()
        self.cp.loop_thread.start()

    def take_lags(self) -> list[float]:
        taken, self.lags_s = self.lags_s, []
        return taken

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
        self.cp.loop_thread.stop()


def measure(
    settings: Settings, runner: str, *, window_s: float, warmup_s: float, failing: int
) -> Result:
    """In the child process: this process is the control plane."""
    size = len(settings.probes)
    keep = settings.probe_history_keep
    db_path = Path(settings.database_url.removeprefix("sqlite:///"))
    cp = ControlPlane(settings)
    cycles: list[tuple[float, float, float]] = []  # (monotonic at end, seconds, CPU seconds)
    prunes: list[tuple[float, float]] = []
    run_cycle, prune = cp.loop.run_cycle, cp.prune

    def timed_cycle(now: datetime | None = None) -> str:
        started, cpu = time.monotonic(), time.thread_time()
        try:
            return run_cycle(now)
        finally:
            ended = time.monotonic()
            cycles.append((ended, ended - started, time.thread_time() - cpu))

    def timed_prune() -> None:
        started = time.monotonic()
        try:
            prune()
        finally:
            prunes.append((time.monotonic(), time.monotonic() - started))

    cp.loop.run_cycle = timed_cycle  # type: ignore[method-assign]
    cp.prune = timed_prune  # type: ignore[method-assign]
    old = OldRunner(cp) if runner == "apscheduler" else None
    counter = sqlite3.connect(db_path, timeout=30)
    bench_cpu_s = 0.0  # this thread's own sampling, taken off the process's CPU

    def count_rows() -> int:
        nonlocal bench_cpu_s
        before = time.thread_time()
        (rows,) = counter.execute("SELECT count(*) FROM probe_runs").fetchone()
        bench_cpu_s += time.thread_time() - before
        return int(rows)

    t0 = time.monotonic()
    if old is not None:
        old.start()
    else:
        cp.start()
    try:
        time.sleep(warmup_s)  # bounded: the first runs spread, the failing incidents open
        take_lags = old.take_lags if old is not None else cp.probe_runner.take_lags
        take_lags()
        runs_before = old.runs if old is not None else cp.probe_runner.runs
        bench_cpu_s = 0.0
        cpu_before, started = time.process_time(), time.monotonic()
        rows_over_time, rss_over_time = [(started - t0, count_rows())], []
        next_count = started + COUNT_EVERY_S
        while (now := time.monotonic()) < started + window_s:
            time.sleep(min(SAMPLE_EVERY_S, started + window_s - now))
            rss_over_time.append((time.monotonic() - t0, rss_mb()))
            if time.monotonic() >= next_count:
                rows_over_time.append((time.monotonic() - t0, count_rows()))
                next_count += COUNT_EVERY_S
        elapsed_s = time.monotonic() - started
        cpu_s = time.process_time() - cpu_before - bench_cpu_s
        runs = (old.runs if old is not None else cp.probe_runner.runs) - runs_before
        lags = take_lags()
        skipped = 0 if old is not None else cp.probe_runner.skipped
        with store.read(cp.factory) as s:
            open_incidents = store.count_open_incidents(s)
    finally:
        if old is not None:
            old.stop()
        cp.stop()
    page_size, pages, free = (
        counter.execute(f"PRAGMA {p}").fetchone()[0]
        for p in ("page_size", "page_count", "freelist_count")
    )
    rows_now = count_rows()
    counter.close()
    bytes_per_row = (pages - free) * page_size / max(rows_now, 1)
    in_window = [s for at, s, _ in cycles if started <= at <= started + elapsed_s]
    loop_cpu_s = sum(c for at, _, c in cycles if started <= at <= started + elapsed_s)
    rows_per_hour = runs / elapsed_s * 3600
    bound_rows = keep * size
    return Result(
        runner=runner,
        targets=size,
        failing=failing,
        window_s=round(elapsed_s, 1),
        runs=runs,
        runs_per_s=runs / elapsed_s,
        lag_p50_ms=percentile(lags, 0.5) * 1000,
        lag_p99_ms=percentile(lags, 0.99) * 1000,
        lag_max_ms=max(lags, default=float("nan")) * 1000,
        cpu_share=cpu_s / elapsed_s,
        loop_cpu_share=loop_cpu_s / elapsed_s,
        probing_cpu_ms_per_run=(cpu_s - loop_cpu_s) / max(runs, 1) * 1000,
        cpu_ms_per_run=cpu_s / max(runs, 1) * 1000,
        rss_mb=statistics.median(r for _, r in rss_over_time),
        bytes_per_row=bytes_per_row,
        rows_per_hour=rows_per_hour,
        mb_per_hour_unpruned=rows_per_hour * bytes_per_row / 1e6,
        bound_rows=bound_rows,
        bound_mb=bound_rows * bytes_per_row / 1e6,
        rows_max=max(r for _, r in rows_over_time),
        prunes=[(round(at - t0, 1), round(s, 3)) for at, s in prunes],
        cycles=len(in_window),
        cycle_p50_ms=percentile(in_window, 0.5) * 1000,
        cycle_p99_ms=percentile(in_window, 0.99) * 1000,
        open_incidents=open_incidents,
        skipped=skipped,
        rows_over_time=[(round(at, 1), r) for at, r in rows_over_time],
        rss_over_time=[(round(at, 1), r) for at, r in rss_over_time],
    )


# -- the report -----------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    lines = [
        "| runner | targets | runs/s | lag p50 | lag p99 | CPU (1 core) | of which loop "
        "| CPU/run | CPU/run but the loop | RSS "
        "| rows/h unpruned | bound (prune) | max rows seen | prune | loop cycle p50 / p99 "
        "(open incidents) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        prune = ", ".join(f"{s:.2f} s" for _, s in r.prunes) or "none in window"
        lines.append(
            f"| {r.runner} | {r.targets:,} | {r.runs_per_s:.1f} | {r.lag_p50_ms:.1f} ms "
            f"| {r.lag_p99_ms:.1f} ms | {r.cpu_share:.0%} | {r.loop_cpu_share:.0%} "
            f"| {r.cpu_ms_per_run:.2f} ms | {r.probing_cpu_ms_per_run:.2f} ms "
            f"| {r.rss_mb:.0f} MB | {r.rows_per_hour:,.0f} ({r.mb_per_hour_unpruned:,.0f} MB) "
            f"| {r.bound_rows:,} rows ({r.bound_mb:,.0f} MB) | {r.rows_max:,} | {prune} "
            f"| {r.cycle_p50_ms:.0f} / {r.cycle_p99_ms:.0f} ms ({r.open_incidents}) |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> None:
    import plotly.graph_objects as go  # here: not in the measured (child) process
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=3,
        cols=2,
        subplot_titles=(
            "scheduling lag (ms; log)",
            "CPU of the control plane process",
            "memory (RSS, MB)",
            "loop cycle time (ms)",
            "state-store rows over time, largest size (prune job every 60 s)",
            "state-store growth per hour, unpruned (MB; log) vs its bound",
        ),
        vertical_spacing=0.1,
    )
    colors = {"asyncio": "#1f77b4", "apscheduler": "#d62728"}
    for runner in sorted({r.runner for r in results}):
        rs = sorted((r for r in results if r.runner == runner), key=lambda r: r.targets)
        x = [r.targets for r in rs]
        c = colors.get(runner, "#333")

        def line(
            y: list[float],
            name: str,
            row: int,
            col: int,
            dash: str = "solid",
            x: list[int] = x,
            runner: str = runner,
            c: str = c,
        ) -> None:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    name=f"{runner}: {name}",
                    mode="lines+markers",
                    line={"color": c, "dash": dash},
                ),
                row=row,
                col=col,
            )

        line([r.lag_p50_ms for r in rs], "lag p50", 1, 1, "dot")
        line([r.lag_p99_ms for r in rs], "lag p99", 1, 1)
        line([r.cpu_share * 100 for r in rs], "CPU % of one core", 1, 2)
        line([r.loop_cpu_share * 100 for r in rs], "of which the loop, %", 1, 2, "dash")
        line([r.cpu_ms_per_run for r in rs], "CPU ms per probe run", 1, 2, "dot")
        line([r.probing_cpu_ms_per_run for r in rs], "CPU ms per run, loop aside", 1, 2, "dashdot")
        line([r.rss_mb for r in rs], "RSS", 2, 1)
        line([r.cycle_p50_ms for r in rs], "cycle p50", 2, 2, "dot")
        line([r.cycle_p99_ms for r in rs], "cycle p99", 2, 2)
        line([r.mb_per_hour_unpruned for r in rs], "MB written/hour", 3, 2)
        line([r.bound_mb for r in rs], "bound kept by prune (MB)", 3, 2, "dot")
        biggest = rs[-1]
        fig.add_trace(
            go.Scatter(
                x=[at for at, _ in biggest.rows_over_time],
                y=[n for _, n in biggest.rows_over_time],
                name=f"{runner}: rows, {biggest.targets:,} targets",
                mode="lines+markers",
                line={"color": c},
            ),
            row=3,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[biggest.rows_over_time[0][0], biggest.rows_over_time[-1][0]],
                y=[biggest.bound_rows] * 2,
                name=f"{runner}: bound (keep x targets)",
                mode="lines",
                line={"color": c, "dash": "dash"},
            ),
            row=3,
            col=1,
        )
    fig.add_hline(
        y=goal("scale.lag_p99").bound, line_dash="dash", annotation_text="goal p99", row=1, col=1
    )
    fig.add_hline(y=100, line_dash="dash", annotation_text="one core", row=1, col=2)
    for row, col in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 2)):
        fig.update_xaxes(type="log", title_text="targets (each probed every 5 s)", row=row, col=col)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=3, col=2)
    fig.update_xaxes(title_text="seconds since start", row=3, col=1)
    fig.update_layout(title=title, height=1200, template="plotly_white")
    fig.write_html(path, include_plotlyjs=True, full_html=True)


def run_child(
    ports_file: Path, runner: str, size: int, args: argparse.Namespace, work_dir: Path
) -> Result:
    """Fill the store to its bound here, then measure in a fresh process of its own."""
    ports = json.loads(ports_file.read_text())
    db_path = work_dir / f"state-{runner}-{size}.db"
    prefill(
        f"sqlite:///{db_path}",
        settings_for(ports, size, args.failing_share, args.keep, db_path),
        args.keep,
    )
    command = [
        sys.executable,
        __file__,
        "--child",
        f"{runner},{size}",
        "--ports-file",
        str(ports_file),
        "--work-dir",
        str(work_dir),
        "--window-s",
        str(args.window_s),
        "--warmup-s",
        str(args.warmup_s),
        "--failing-share",
        str(args.failing_share),
        "--keep",
        str(args.keep),
        *(["--pin-cpu", str(args.pin_cpu)] if args.pin_cpu is not None else []),
    ]
    budget_s = args.warmup_s + args.window_s + 120
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=budget_s, check=True)
    for db in work_dir.glob(f"state-{runner}-{size}.db*"):
        db.unlink()
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def child(args: argparse.Namespace) -> None:
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # every thread of this process: one core
    runner, size_text = args.child.split(",")
    size = int(size_text)
    ports = json.loads(args.ports_file.read_text())
    db_path = args.work_dir / f"state-{runner}-{size}.db"
    settings = settings_for(ports, size, args.failing_share, args.keep, db_path)
    result = measure(
        settings,
        runner,
        window_s=args.window_s,
        warmup_s=args.warmup_s,
        failing=round(size * args.failing_share),
    )
    print(json.dumps(asdict(result)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # http,tcp,dead: the server process
    parser.add_argument("--child", help=argparse.SUPPRESS)  # runner,size: one measurement
    parser.add_argument("--ports-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--runner", default="asyncio,apscheduler")
    parser.add_argument("--window-s", type=float, default=70.0)
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--failing-share", type=float, default=0.1)
    parser.add_argument("--keep", type=int, default=500, help="probe_history_keep")
    parser.add_argument(
        "--pin-cpu", type=int, help="run the control plane on this one CPU only (affinity)"
    )
    parser.add_argument("--html", type=Path, default=HERE / "scale.html")
    parser.add_argument("--json", type=Path, help="every figure and curve, as JSON")
    parser.add_argument(
        "--figures", type=Path, help="write the headline figures (lab/bench_goals.py)"
    )
    args = parser.parse_args()
    if args.serve:
        http, tcp, dead = (int(n) for n in args.serve.split(","))
        serve(http, tcp, dead)
        return
    if args.child:
        child(args)
        return
    sizes = [int(n) for n in args.sizes.split(",")]
    runners = args.runner.split(",")
    biggest = max(sizes)
    failing = round(biggest * args.failing_share)
    healthy = biggest - failing
    load = os.getloadavg()
    started_at = datetime.now(UTC)
    print(
        f"{started_at:%Y-%m-%d %H:%M} UTC, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    work_dir = Path(tempfile.mkdtemp(prefix="bench-scale-", dir="/tmp"))
    servers = Servers((healthy + 1) // 2, healthy // 2, failing)
    ports_file = work_dir / "ports.json"
    ports_file.write_text(json.dumps(servers.ports))
    results = []
    try:
        for runner in runners:
            for size in sizes:
                result = run_child(ports_file, runner, size, args, work_dir)
                results.append(result)
                print(
                    f"{runner:11} {size:5} targets: {result.runs_per_s:6.1f} runs/s, lag p50 "
                    f"{result.lag_p50_ms:.1f} ms p99 {result.lag_p99_ms:.1f} ms, CPU "
                    f"{result.cpu_share:.0%} ({result.cpu_ms_per_run:.2f} ms/run), RSS "
                    f"{result.rss_mb:.0f} MB, cycle p50 {result.cycle_p50_ms:.0f} ms "
                    f"({result.open_incidents} open), load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    finally:
        servers.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    end_load = os.getloadavg()
    print()
    print(table(results))
    print(f"load average at the end: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    title = (
        f"Control plane cost vs targets (probes every {INTERVAL_S:g} s, "
        f"{args.failing_share:.0%} failing; {started_at:%Y-%m-%d %H:%M} UTC, "
        f"load {load[0]:.2f} at start)"
    )
    plot(results, args.html, title)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(f"curves: {args.html}")
    top = [r for r in results if r.runner == "asyncio" and r.targets == biggest]
    if top:
        save(args.figures, headline(top[0]))


def headline(r: Result) -> list[Figure]:
    """The asyncio runner at the largest size. The rows' bound: `probe_history_keep` runs per
    probe, plus one prune period of writes (and a little)."""
    size = f"{r.targets:,} targets"
    bound = r.bound_rows + r.runs_per_s * 75
    return [
        Figure("scale.lag_p99_ms", r.lag_p99_ms, "ms", f"lag p99, {size}"),
        Figure("scale.cpu_cores", r.cpu_share, "cores", f"CPU, {size}"),
        Figure("scale.rows_vs_bound", r.rows_max / bound, "x",
               "state-store rows, most seen / (bound + one prune period)"),
        Figure("scale.rows_max", r.rows_max, "rows", f"state-store rows, most seen, {size}"),
        Figure("scale.cpu_ms_per_run", r.cpu_ms_per_run, "ms", "CPU per probe run"),
        Figure("scale.probing_cpu_ms_per_run", r.probing_cpu_ms_per_run, "ms",
               "CPU per probe run, the loop aside"),
        Figure("scale.loop_cpu_cores", r.loop_cpu_share, "cores", f"loop's CPU, {size}"),
        Figure("scale.rss_mb", r.rss_mb, "MB", f"RSS, {size}"),
        Figure("scale.cycle_p50_ms", r.cycle_p50_ms, "ms",
               f"loop cycle p50, {r.open_incidents} open incidents"),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
