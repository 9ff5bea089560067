// A game day's charts: each trial's figure is in the page as JSON, drawn once (a report is fixed).
"use strict";
(() => {
  const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
  const charts = JSON.parse(document.getElementById("gameday-figures").textContent);
  for (const {id, figure} of charts) {
    const el = document.getElementById(id);
    if (!el) continue;
    if (dark) { figure.layout.font = {color: "#e6e8ec"}; figure.layout.template = undefined; }
    Plotly.newPlot(el, figure.data, figure.layout, SG.plotlyConfig);
    el.dataset.points = figure.data.filter((t) => t.name !== "actions").reduce((n, t) => n + (t.y || []).length, 0);
  }
})();
