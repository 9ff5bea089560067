// Every chart from /dashboard/api/charts.json, redrawn with Plotly.react (zoom survives).
"use strict";
(() => {
  const range = document.getElementById("charts").dataset.range;
  const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
  const draw = (figs) => {
    for (const [name, fig] of Object.entries(figs)) {
      const el = document.getElementById("chart-" + name);
      if (!el) continue;
      if (dark) { fig.layout.font = {color: "#e6e8ec"}; fig.layout.template = undefined; }
      Plotly.react(el, fig.data, fig.layout, {displaylogo: false, responsive: true});
      el.dataset.points = fig.data.filter((t) => t.name !== "actions").reduce((n, t) => n + ((t.y || []).filter((v) => v !== null).length), 0);
    }
    document.getElementById("charts-updated").textContent = "updated " + new Date().toLocaleTimeString();
  };
  SG.poll("/dashboard/api/charts.json?range=" + encodeURIComponent(range), draw, 10000);
})();
