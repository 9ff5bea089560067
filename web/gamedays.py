"""The Game days pages: the reports `shoplab gameday` writes (one JSON file a run, named by
its start, in `gamedays_dir`), listed with their verdicts, and one chart per fault trial.

A report is a file on disk, not a request: it is read bounded (size, shape) and a bad one is
named as such (422), never a 500. A run id in a URL names a file only if it has the shape the
game day gives its files: no path reaches outside the directory."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import threading
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from flask import Response, render_template
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from controlplane.errors import ControlPlaneError, NotFound
from web.auth import control_plane
from web.charts import gameday_chart

RUN_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z")  # lab/gameday.py: f"{started_at:%Y%m%dT%H%M%SZ}.json"
MAX_REPORT_BYTES = 16 * 1024 * 1024
MAX_LISTED = 200  # the newest runs on the list
MAX_CHARTS = 60  # a long soak's trials beyond these are in the JSON, not drawn
MAX_POINTS = 3600
MAX_TEXT = 2000
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
MAX_TRIALS = 5000  # a day's soak is a few hundred; more is not a report, and costs seconds
# A 16 MB report of small objects costs some 500 MB and a second of a core to read: a worker
# reads at most this many at once (many viewers of a run wait, then share the lru'd summary).
MAX_READING = 2
READ_WAIT_S = 20.0
_reading = threading.BoundedSemaphore(MAX_READING)


class UnreadableReport(ControlPlaneError):
    """A stored report that is not one: too large, not JSON, or of another shape."""

    status = 422


class Busy(ControlPlaneError):
    """Every reading slot of this worker is taken by other reports for longer than a page waits."""

    status = 503


class Loose(BaseModel):
    """What the pages read of a report: other keys are ignored, the ones read are checked."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def _utc(value: datetime) -> datetime:
    # The control plane's and the lab's clocks are UTC; Plotly draws the time as written.
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the calendar's start in UTC
        raise ValueError("a time out of range in UTC") from None


def _few_trials(value: Any) -> Any:
    # Counted before each trial is validated: 700,000 small trials would take 18 s and 1 GB.
    if isinstance(value, dict):
        count = sum(len(v) for v in value.values() if isinstance(v, list))
        if count > MAX_TRIALS:
            raise ValueError(f"{count} trials: more than a report may have ({MAX_TRIALS})")
    return value


def _clip(value: Any) -> Any:
    return value[:MAX_TEXT] if isinstance(value, str) else value


UtcTime = Annotated[datetime, AfterValidator(_utc)]
Seconds = Annotated[float, Field(ge=0, le=10**6)]
Text = Annotated[str, BeforeValidator(_clip)]  # an exception's message: shown, not refused


class FaultIn(Loose):
    kind: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    target: str = Field(default="", max_length=200)
    started_at: UtcTime | None = None
    ended_at: UtcTime | None = None


class SeriesIn(Loose):
    start_at: UtcTime
    step_s: float = Field(gt=0, le=3600)
    orders: list[int] = Field(max_length=MAX_POINTS)
    errors: list[int] = Field(max_length=MAX_POINTS)


class RunIn(Loose):
    id: int | None = None
    action: str = Field(max_length=100)
    target: str = Field(default="", max_length=200)
    state: str = Field(max_length=40)
    requested_by: str | None = Field(default=None, max_length=200)
    created_at: UtcTime
    started_at: UtcTime | None = None
    finished_at: UtcTime | None = None


class TrialIn(Loose):
    fault: FaultIn
    error: Text | None = None
    detect_s: Seconds | None = None
    act_s: Seconds | None = None
    outage_s: Seconds | None = None
    redundancy_s: Seconds | None = None
    healed_by: str = Field(default="", max_length=100)
    acknowledged: int | None = None
    lost: int = 0
    duplicates: int = 0
    runs: list[RunIn] = Field(default_factory=list, max_length=500)
    series: SeriesIn | None = None
    # Not whole by its deadline: the stack and the open incidents then (see the report JSON).
    at_deadline: dict[str, Any] | None = None


class VerdictIn(Loose):
    fault: str = Field(max_length=100)
    trials: int
    figures: dict[str, float | None] = Field(default_factory=dict)
    objectives: dict[str, float] = Field(default_factory=dict)
    failed: list[Text] = Field(default_factory=list, max_length=1000)
    verdict: Literal["PASS", "FAIL"]


class StressIn(Loose):
    cpu_workers: int | None = None
    load_avg_1m: dict[str, float | None] = Field(default_factory=dict)


class ReportIn(Loose):
    started_at: UtcTime
    ended_at: UtcTime | None = None
    soak_s: float | None = None
    verdict: Literal["PASS", "FAIL"]
    verdicts: list[VerdictIn] = Field(max_length=1000)
    trials: Annotated[dict[str, list[TrialIn]], BeforeValidator(_few_trials)]
    load: dict[str, Any] = Field(default_factory=dict)
    verification: dict[str, Any] = Field(default_factory=dict)
    # A day that stopped early (its stack could not be made whole), and what it never ran.
    stopped: Text | None = None
    not_run: list[Text] = Field(default_factory=list, max_length=1000)
    # Run beside CPU hogs on every core: their count and the load average meanwhile.
    stress: StressIn | None = None


# -- reading --------------------------------------------------------------------------------------
def directory() -> Path | None:
    found: Path | None = control_plane().settings.gamedays_dir
    return found


def report_path(run_id: str) -> Path:
    """The file of `run_id`, or 404: an id not of the game day's shape names no file."""
    where = directory()
    if where is None or not RUN_ID.fullmatch(run_id):
        raise NotFound(f"no game day {run_id[:40]!r}")
    path = where / f"{run_id}.json"
    if not path.exists():
        raise NotFound(f"no game day {run_id!r}")
    return path


def read_bytes(path: Path) -> bytes:
    """A regular file (no FIFO to block on, no device, no symlink), at most MAX_REPORT_BYTES.
    What is checked is the file opened, not the name looked up before: a name swapped for a
    FIFO or a symlink between a check and the open cannot make a worker wait or read elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise NotFound(f"no game day {path.stem!r}") from None
    except OSError as exc:  # ELOOP: a symlink; EACCES: not the control plane's to read...
        if exc.errno == errno.ELOOP:
            raise UnreadableReport(f"{path.name} is not a regular file (a symlink)") from None
        raise UnreadableReport(f"{path.name} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableReport(f"{path.name} is not a regular file")
        if st.st_size > MAX_REPORT_BYTES:
            raise UnreadableReport(
                f"{path.name} is {st.st_size} bytes: more than a report may be ({MAX_REPORT_BYTES})"
            )
        try:
            raw = f.read(MAX_REPORT_BYTES + 1)
        except OSError as exc:
            raise UnreadableReport(f"{path.name} cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise UnreadableReport(f"{path.name} grew beyond {MAX_REPORT_BYTES} bytes while read")
    return raw


def read_report(path: Path) -> ReportIn:
    return read_report_and_bytes(path)[0]


def read_report_and_bytes(path: Path) -> tuple[ReportIn, bytes]:
    """The report and the bytes it was read from (one read: what is served is what was checked)."""
    if not _reading.acquire(timeout=READ_WAIT_S):
        raise Busy("this web worker is reading other game-day reports: try again shortly")
    try:
        raw = read_bytes(path)
        return _parse(path, raw), raw
    finally:
        _reading.release()


def _parse(path: Path, raw: bytes) -> ReportIn:
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except RecursionError:
        raise UnreadableReport(f"{path.name} is nested too deeply to be a report") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnreadableReport(f"{path.name} is not valid JSON ({type(exc).__name__})") from None
    # A lone surrogate (JSON's "\ud800") cannot go out as UTF-8. Only an escape makes one (UTF-8
    # cannot hold it): without any in the text, the walk over every string is spared.
    if SURROGATE_ESCAPE.search(text) and not is_text(data):
        raise UnreadableReport(f"{path.name} holds text that is not valid Unicode")
    try:
        return ReportIn.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the top level"
        raise UnreadableReport(
            f"{path.name} is not a game-day report: {where}: {err['msg']}"
        ) from None


def is_text(value: Any) -> bool:
    """Every string and key of a parsed JSON value encodes as UTF-8 (without recursion)."""
    stack = [value]
    try:
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                item.encode("utf-8")
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    except UnicodeEncodeError:
        return False
    return True


@lru_cache(maxsize=256)
def _summary(path: Path, mtime_ns: int, size: int) -> dict[str, Any]:
    """A run's line on the list; cached while its file is unchanged (mtime and size)."""
    try:
        report = read_report(path)
    except (UnreadableReport, NotFound) as exc:
        return {"id": path.stem, "error": str(exc)}
    ended = report.ended_at
    return {
        "id": path.stem,
        "error": None,
        "started_at": report.started_at.isoformat(),
        "duration_s": (ended - report.started_at).total_seconds() if ended else None,
        "soak_s": report.soak_s,
        "verdict": report.verdict,
        "verdicts": [
            {"fault": v.fault, "verdict": v.verdict, "failed": v.failed, "trials": v.trials}
            for v in report.verdicts
        ],
        "acknowledged": report.load.get("acknowledged"),
        "verified": report.verification.get("ok"),
    }


def list_runs(where: Path) -> list[dict[str, Any]]:
    """The newest MAX_LISTED runs first; an unreadable one is listed with what is wrong."""
    try:
        names = [
            p.name for p in where.iterdir() if RUN_ID.fullmatch(p.stem) and p.suffix == ".json"
        ]
    except FileNotFoundError:
        return []  # no game day has run yet
    except OSError as exc:
        raise UnreadableReport(f"the game-day directory cannot be listed: {exc.strerror}") from None
    rows = []
    for name in sorted(names, reverse=True)[:MAX_LISTED]:
        path = where / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        rows.append(_summary(path, st.st_mtime_ns, st.st_size))
    return rows


def trial_charts(report: ReportIn) -> list[dict[str, Any]]:
    """One chart a fault trial, in the order they ran within each fault, at most MAX_CHARTS."""
    charts: list[dict[str, Any]] = []
    for kind, trials in report.trials.items():
        for n, trial in enumerate(trials, 1):
            if len(charts) >= MAX_CHARTS:
                return charts
            data = trial.model_dump(mode="json")
            title = f"{kind} · trial {n}" + (
                f" on {trial.fault.target}" if trial.fault.target else ""
            )
            try:
                fig = gameday_chart(title, data)
            except (OverflowError, ValueError) as exc:  # times beyond the calendar's end...
                raise UnreadableReport(f"{title} cannot be drawn: {exc}") from None
            charts.append(
                {"id": f"trial-{len(charts) + 1}", "title": title, "trial": data,
                 "figure": json.loads(fig.to_json())}
            )  # fmt: skip
    return charts


# -- pages (registered on the dashboard's blueprint, behind its login) ----------------------------
def runs_page() -> str:
    where = directory()
    runs = list_runs(where) if where is not None else []
    return render_template("gamedays.html", page="gamedays", directory=where, runs=runs)


def run_page(run_id: str) -> str:
    report = read_report(report_path(run_id))
    charts = trial_charts(report)
    total = sum(len(ts) for ts in report.trials.values())
    return render_template(
        "gameday.html",
        page="gamedays",
        run_id=run_id,
        report=report,
        charts=charts,
        figures=[{"id": c["id"], "figure": c["figure"]} for c in charts],
        hidden=total - len(charts),
    )


def report_json(run_id: str) -> Response:
    """The stored report as written (checked to be one first)."""
    _, raw = read_report_and_bytes(report_path(run_id))
    response = Response(raw, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response
