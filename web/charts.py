"""The dashboard's charts as pure functions: data in, a Plotly figure out (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

SPAN_COLOUR = "#dc3545"  # incidents: the colour of "down" everywhere
MARKER_COLOUR = {"succeeded": "#2fae63", "failed": "#dc3545", "rejected": "#dc3545"}
DEFAULT_MARKER = "#f8a306"
TICK_FORMAT = {"s": ".3s", "ratio": ".0%", "bytes": ".3s"}


def line_chart(
    title: str,
    lines: Sequence[Mapping[str, Any]],
    *,
    unit: str = "",
    spans: Sequence[Mapping[str, Any]] = (),
    markers: Sequence[Mapping[str, Any]] = (),
    x_range: tuple[str, str] | None = None,
) -> go.Figure:
    """Lines over time; incidents as shaded spans; action runs as markers on a thin strip
    below (shapes have no hover: markers in a scatter trace do)."""
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.85, 0.15], vertical_spacing=0.04
    )
    for line in lines:
        fig.add_trace(
            go.Scatter(
                x=list(line["x"]),
                y=list(line["y"]),
                name=str(line["name"]),
                mode="lines",
                line={"width": 1.6},
            ),
            row=1,
            col=1,
        )
    for span in spans:
        fig.add_vrect(
            x0=span["start"],
            x1=span["end"],
            fillcolor=SPAN_COLOUR,
            opacity=0.12,
            layer="below",
            line_width=0,
        )
    if markers:
        fig.add_trace(
            go.Scatter(
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
                    [m["action"], m["target"], m["state"], m["who"], m["id"]] for m in markers
                ],
                hovertemplate="run %{customdata[4]}: %{customdata[0]} on %{customdata[1]}<br>"
                "%{customdata[2]} · by %{customdata[3]}<extra></extra>",
            ),
            row=2,
            col=1,
        )
    fig.update_yaxes(visible=False, row=2, col=1, range=[-1, 1])
    fig.update_yaxes(tickformat=TICK_FORMAT.get(unit, ""), rangemode="tozero", row=1, col=1)
    if x_range is not None:
        fig.update_xaxes(range=list(x_range))
    fig.update_layout(
        title={"text": title, "font": {"size": 14}},
        margin={"l": 50, "r": 10, "t": 40, "b": 30},
        legend={"orientation": "h", "y": -0.12},
        hovermode="x unified",
        uirevision=title,  # zoom survives each refresh (Plotly.react)
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        template="plotly_white",
    )
    return fig


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
    notes: Mapping[str, Sequence[Mapping[str, Any]]],
    x_range: tuple[str, str] | None = None,
) -> dict[str, go.Figure]:
    """One figure per panel, each annotated with the same incidents and runs."""
    return {
        name: line_chart(
            str(panel["title"]) + (f" — {panel['error']}" if panel.get("error") else ""),
            panel["lines"] if "lines" in panel else lag_lines(panel.get("samples", ())),
            unit=str(panel.get("unit", "")),
            spans=notes.get("spans", ()),
            markers=notes.get("markers", ()),
            x_range=x_range,
        )
        for name, panel in series.items()
    }
