// Every chart from /dashboard/api/charts.json, redrawn with Plotly.react (zoom survives).
"use strict";
(() => {
  const range = document.getElementById("charts").dataset.range;
  const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
  // Plotly draws a date's wall clock as written and drops its offset: the server's times are
  // UTC, so each is rewritten in the browser's zone, as every other time on these pages.
  const zoned = /^\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)$/;
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const local = (v) => {
    if (typeof v !== "string" || !zoned.test(v)) return v;
    const d = new Date(v);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  };
  const inBrowserZone = (fig) => {
    for (const t of fig.data) if (Array.isArray(t.x)) t.x = t.x.map(local);
    for (const s of fig.layout.shapes || []) { s.x0 = local(s.x0); s.x1 = local(s.x1); }
    for (const [k, axis] of Object.entries(fig.layout)) {
      if (k.startsWith("xaxis") && Array.isArray(axis.range)) axis.range = axis.range.map(local);
    }
    return fig;
  };
  const draw = (figs) => {
    for (const [name, fig] of Object.entries(figs)) {
      const el = document.getElementById("chart-" + name);
      if (!el) continue;
      inBrowserZone(fig);
      if (dark) { fig.layout.font = {color: "#e6e8ec"}; fig.layout.template = undefined; }
      Plotly.react(el, fig.data, fig.layout, SG.plotlyConfig);
      el.dataset.points = fig.data.filter((t) => t.name !== "actions").reduce((n, t) => n + ((t.y || []).filter((v) => v !== null).length), 0);
    }
    document.getElementById("charts-updated").textContent = "updated " + new Date().toLocaleTimeString();
  };
  SG.poll("/dashboard/api/charts.json?range=" + encodeURIComponent(range), draw, 10000);
})();
