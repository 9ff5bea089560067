"""The dashboard's charts as pure functions: data in, a Plotly figure out (no I/O)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

SPAN_COLOUR = "#dc3545"  # incidents: the colour of "down" everywhere
MARKER_COLOUR = {"succeeded": "#2fae63", "failed": "#dc3545", "rejected": "#dc3545"}
DEFAULT_MARKER = "#f8a306"
TICK_FORMAT = {"s": ".3s", "ratio": ".0%", "bytes": ".3s"}


def plain(text: str) -> str:
    """Text as Plotly shows it, not as markup: Plotly reads `<a href>`, `<span style>`, `<br>`
    in titles, labels and hover text, and a target's or an action's name comes from outside.
    Plotly decodes `&amp;`, `&lt;`, `&gt;` back to the characters."""
    return html.escape(text, quote=False)


def plain_value(value: Any) -> Any:
    """`plain` for a string; numbers and None (hover data) pass unchanged."""
    return plain(value) if isinstance(value, str) else value


MAX_SPANS = 60  # incident spans drawn per chart, after merging: the most recent
MAX_MARKERS = 300  # action run markers drawn per chart: the most recent
MERGE_BINS = 300  # spans closer than the window / this are one span (a pixel or two apart)
LABELS_PER_SPAN = 5  # incidents named in a merged span's hover text; the rest are counted


@dataclass(frozen=True, slots=True)
class Notes:
    """What is drawn over every panel, bounded whatever the window holds: merged incident
    spans `{"start", "end", "count", "label"}`, run markers, and how many were left out."""

    spans: tuple[Mapping[str, Any], ...] = ()
    markers: tuple[Mapping[str, Any], ...] = ()
    incidents_not_drawn: int = 0
    runs_not_drawn: int = 0


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def merge_spans(spans: Sequence[Mapping[str, Any]], gap_s: float = 0.0) -> list[dict[str, Any]]:
    """Overlapping spans, and spans less than `gap_s` apart, as one span each: its extent, the
    number of incidents in it and a hover text naming the first few. Sorted by start."""
    merged: list[dict[str, Any]] = []
    last_end: datetime | None = None
    for span in sorted(spans, key=lambda sp: _at(sp["start"])):
        start, end = _at(span["start"]), _at(span["end"])
        if last_end is not None and (start - last_end).total_seconds() <= gap_s:
            current = merged[-1]
            current["count"] += int(span.get("count", 1))
            current["labels"].append(str(span.get("label", "")))
            if end > last_end:
                current["end"], last_end = span["end"], end
            continue
        merged.append(
            {
                "start": span["start"],
                "end": span["end"],
                "count": int(span.get("count", 1)),
                "labels": [str(span.get("label", ""))],
            }
        )
        last_end = end
    return [
        {
            "start": m["start"],
            "end": m["end"],
            "count": m["count"],
            "label": span_label(m["count"], m["labels"]),
        }
        for m in merged
    ]


def span_label(count: int, labels: Sequence[str]) -> str:
    """`#4 probe on shop-1`, or `37 incidents: #1 …, #2 …, … and 32 more`."""
    shown = [label for label in labels if label][:LABELS_PER_SPAN]
    if count == 1 and shown:
        return shown[0]
    text = f"{count} incidents: " + ", ".join(shown)
    return text + (f" and {count - len(shown)} more" if count > len(shown) else "")


def bound_notes(
    notes: Mapping[str, Any],
    x_range: tuple[str, str] | None = None,
    *,
    max_spans: int = MAX_SPANS,
    max_markers: int = MAX_MARKERS,
) -> Notes:
    """The spans and markers of `chart_notes` as drawn: spans merged (those closer than the
    window over MERGE_BINS become one), then the most recent `max_spans` spans and
    `max_markers` markers; `spans_total`/`markers_total` (what the window holds, of which
    `chart_notes` may have read only the latest) count towards what is not drawn."""
    spans, markers = notes.get("spans") or (), notes.get("markers") or ()
    gap_s = (_at(x_range[1]) - _at(x_range[0])).total_seconds() / MERGE_BINS if x_range else 0.0
    merged = merge_spans(spans, gap_s)
    drawn_spans = sorted(merged, key=lambda sp: _at(sp["end"]))[-max_spans:] if max_spans else []
    drawn_markers = (
        sorted(markers, key=lambda m: _at(m["at"]))[-max_markers:] if max_markers else []
    )
    incidents = max(int(notes.get("spans_total") or 0), sum(int(s.get("count", 1)) for s in spans))
    runs = max(int(notes.get("markers_total") or 0), len(markers))
    return Notes(
        spans=tuple(sorted(drawn_spans, key=lambda sp: _at(sp["start"]))),
        markers=tuple(drawn_markers),
        incidents_not_drawn=incidents - sum(sp["count"] for sp in drawn_spans),
        runs_not_drawn=runs - len(drawn_markers),
    )


def span_shapes(spans: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One shaded rectangle per span, over both rows (paper height), as one list: Plotly's
    `add_vrect` re-validates every shape already there on each call (quadratic)."""
    return [
        {
            "type": "rect",
            "xref": "x",
            "yref": "paper",
            "x0": span["start"],
            "x1": span["end"],
            "y0": 0,
            "y1": 1,
            "fillcolor": SPAN_COLOUR,
            "opacity": 0.12,
            "layer": "below",
            "line": {"width": 0},
        }
        for span in spans
    ]


def not_drawn_text(notes: Notes) -> str:
    parts = [
        f"{n} more {what} not drawn"
        for n, what in ((notes.incidents_not_drawn, "incidents"), (notes.runs_not_drawn, "runs"))
        if n > 0
    ]
    return " · ".join(parts)


def line_chart(
    title: str,
    lines: Sequence[Mapping[str, Any]],
    *,
    unit: str = "",
    spans: Sequence[Mapping[str, Any]] = (),
    markers: Sequence[Mapping[str, Any]] = (),
    x_range: tuple[str, str] | None = None,
    notes: Notes | None = None,
) -> go.Figure:
    """Lines over time; incidents as shaded spans (merged, bounded: `bound_notes`, or `notes`
    already bounded) with their hover text on a red bar in the thin strip below; action runs as
    markers on that strip (shapes have no hover: markers in a scatter trace do)."""
    if notes is None:
        notes = bound_notes({"spans": spans, "markers": markers}, x_range)
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.85, 0.15], vertical_spacing=0.04
    )
    for line in lines:
        fig.add_trace(
            go.Scatter(
                x=list(line["x"]),
                y=list(line["y"]),
                name=plain(str(line["name"])),
                mode="lines",
                line={"width": 1.6},
            ),
            row=1,
            col=1,
        )
    if notes.spans:
        fig.add_trace(incident_trace(notes.spans), row=2, col=1)
    if notes.markers:
        fig.add_trace(marker_trace(notes.markers), row=2, col=1)
    fig.update_yaxes(visible=False, row=2, col=1, range=[-1, 1])
    fig.update_yaxes(tickformat=TICK_FORMAT.get(unit, ""), rangemode="tozero", row=1, col=1)
    if x_range is not None:
        fig.update_xaxes(range=list(x_range))
    left_out = not_drawn_text(notes)
    fig.update_layout(
        title={"text": plain(title), "font": {"size": 14}},
        margin={"l": 50, "r": 10, "t": 40, "b": 30},
        # Below the axis's second line of tick labels (the date): -0.12 wrote over it.
        legend={"orientation": "h", "y": -0.2, "yanchor": "top"},
        hovermode="x unified",
        uirevision=title,  # zoom survives each refresh (Plotly.react)
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        template="plotly_white",
        shapes=span_shapes(notes.spans),
        annotations=[
            {"text": left_out, "xref": "paper", "yref": "paper", "x": 1, "y": 1,
             "xanchor": "right", "yanchor": "bottom", "showarrow": False,
             "font": {"size": 11, "color": SPAN_COLOUR}}
        ] if left_out else [],
    )  # fmt: skip
    return fig


def incident_trace(spans: Sequence[Mapping[str, Any]]) -> go.Scatter:
    """The spans as red bars on the strip, one trace: hovering a bar's end names its incidents."""
    x: list[Any] = []
    text: list[str | None] = []
    for span in spans:
        label = plain(str(span.get("label", "")))
        x += [span["start"], span["end"], None]
        text += [label, label, None]
    return go.Scatter(
        x=x,
        y=[0.6, 0.6, None] * len(spans),
        mode="lines",
        name="incidents",
        showlegend=False,
        line={"width": 5, "color": SPAN_COLOUR},
        opacity=0.5,
        text=text,
        hovertemplate="%{text}<extra></extra>",
    )


def marker_trace(markers: Sequence[Mapping[str, Any]]) -> go.Scatter:
    return go.Scatter(
        x=[m["at"] for m in markers],
        y=[0] * len(markers),
        mode="markers",
        name="actions",
        showlegend=False,
        marker={
            "symbol": "triangle-up",
            "size": 11,
            "color": [MARKER_COLOUR.get(str(m["state"]), DEFAULT_MARKER) for m in markers],
        },
        customdata=[
            [plain_value(m[k]) for k in ("action", "target", "state", "who", "id")] for m in markers
        ],
        hovertemplate="run %{customdata[4]}: %{customdata[0]} on %{customdata[1]}<br>"
        "%{customdata[2]} · by %{customdata[3]}<extra></extra>",
    )


def lag_lines(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-standby lines from samples `{"at", "lag_bytes": {standby: bytes or None}}`: a
    standby absent from a sample (not connected) is a gap in its line, not a zero."""
    names = sorted({str(n) for sample in samples for n in sample.get("lag_bytes") or {}})
    return [
        {
            "name": name,
            "x": [sample["at"] for sample in samples],
            "y": [(sample.get("lag_bytes") or {}).get(name) for sample in samples],
        }
        for name in names
    ]


def all_charts(
    series: Mapping[str, Mapping[str, Any]],
    notes: Mapping[str, Any],
    x_range: tuple[str, str] | None = None,
) -> dict[str, go.Figure]:
    """One figure per panel, each annotated with the same incidents and runs (bounded once)."""
    drawn = bound_notes(notes, x_range)
    return {
        name: line_chart(
            str(panel["title"]) + (f" — {panel['error']}" if panel.get("error") else ""),
            panel["lines"] if "lines" in panel else lag_lines(panel.get("samples", ())),
            unit=str(panel.get("unit", "")),
            x_range=x_range,
            notes=drawn,
        )
        for name, panel in series.items()
    }


# -- game days ------------------------------------------------------------------------------------
WHOLE_COLOUR = "#2fae63"
MIN_FAULT_SPAN_S = 1.0  # a kill lasts milliseconds: as wide as one second's bucket, or unseen


def _shift(iso: str, seconds: float) -> str:
    return (datetime.fromisoformat(iso) + timedelta(seconds=seconds)).isoformat()


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def series_lines(series: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Orders and errors per second from `{"start_at", "step_s", "orders", "errors"}`."""
    if not series:
        return []
    step = float(series.get("step_s") or 1)
    names = {"orders": "orders/s", "errors": "errors/s"}
    return [
        {
            "name": label,
            "x": [_shift(series["start_at"], i * step) for i in range(len(series.get(key) or []))],
            "y": [n / step for n in series.get(key) or []],
        }
        for key, label in names.items()
    ]


STATE_MARK = {"succeeded": "✓", "failed": "✗", "rejected": "✗ rejected"}


def run_label(run: Mapping[str, Any]) -> str:
    """`failover ✓`, `failover ✗`, `restore awaiting_approval`: the name, then the state."""
    state = str(run.get("state"))
    return plain(f"{run.get('action')} {STATE_MARK.get(state, state)}")


def gameday_chart(title: str, trial: Mapping[str, Any]) -> go.Figure:
    """One fault trial of a game day: orders/s and errors/s around it, the fault a shaded span,
    the control plane's runs a vertical line each and a labelled marker below (hover: state and
    times), and the moment the stack was whole again a dashed line."""
    fault = trial.get("fault") or {}
    lines = series_lines(trial.get("series"))
    start, end = fault.get("started_at"), fault.get("ended_at")
    if not lines:
        title += " — no per-second series in this report"
    fig = line_chart(title, lines)
    fig.update_traces(line_color=SPAN_COLOUR, selector={"name": "errors/s"})
    fig.update_yaxes(title_text="per second (UTC)", row=1, col=1)
    # Drawn on the subplots even when empty: a failed trial has its fault and nothing else.
    if start:
        width = _seconds(start, end) if end else 0.0
        fig.add_vrect(
            x0=start, x1=_shift(start, max(width, MIN_FAULT_SPAN_S)), row=1, col=1,
            exclude_empty_subplots=False, fillcolor=SPAN_COLOUR, opacity=0.15, layer="below",
            line_width=0,
        )  # fmt: skip
        fig.add_annotation(
            x=start, y=1, xref="x", yref="paper", text=plain(str(fault.get("kind", "fault"))),
            showarrow=False, xanchor="left", yanchor="bottom", font={"color": SPAN_COLOUR},
        )  # fmt: skip
    runs = [r for r in trial.get("runs") or () if r.get("started_at") or r.get("created_at")]
    if runs:
        at = [r.get("started_at") or r["created_at"] for r in runs]
        # Runs a second apart: their labels lean away from each other.
        positions = [("top left", "top right")[i % 2] for i in range(len(runs))]
        if len(runs) == 1:
            positions = ["top center"]
        fig.add_trace(
            go.Scatter(
                x=at,
                y=[0] * len(runs),
                mode="markers+text",
                name="actions",
                showlegend=False,
                text=[run_label(r) for r in runs],
                textposition=positions,
                textfont={"size": 10},
                cliponaxis=False,
                marker={
                    "symbol": "triangle-up",
                    "size": 11,
                    "color": [MARKER_COLOUR.get(str(r.get("state")), DEFAULT_MARKER) for r in runs],
                },
                customdata=[
                    [
                        *(plain_value(r.get(k)) for k in ("id", "action", "target", "state")),
                        r.get("created_at"),
                        plain_value(r.get("finished_at") or "not finished"),
                    ]
                    for r in runs
                ],
                hovertemplate="run %{customdata[0]}: %{customdata[1]} on %{customdata[2]}<br>"
                "%{customdata[3]} · asked %{customdata[4]}<br>finished %{customdata[5]}"
                "<extra></extra>",
            ),
            row=2,
            col=1,
        )
        for x, r in zip(at, runs, strict=True):
            colour = MARKER_COLOUR.get(str(r.get("state")), DEFAULT_MARKER)
            fig.add_vline(
                x=x, line_width=1.2, line_dash="dot", line_color=colour,
                exclude_empty_subplots=False,
            )  # fmt: skip
    if start and trial.get("redundancy_s") is not None:
        whole = _shift(start, float(trial["redundancy_s"]))
        fig.add_vline(
            x=whole, line_width=1.5, line_dash="dash", line_color=WHOLE_COLOUR,
            exclude_empty_subplots=False,
        )  # fmt: skip
        fig.add_annotation(
            x=whole, y=1, xref="x", yref="paper", text="whole again", showarrow=False,
            xanchor="left", yanchor="bottom", font={"color": WHOLE_COLOUR},
        )  # fmt: skip
    return fig
