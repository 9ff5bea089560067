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
      el.dataset.points = fig.data.filter((t) => t.name !== "actions" && t.name !== "incidents").reduce((n, t) => n + ((t.y || []).filter((v) => v !== null).length), 0);
    }
    document.getElementById("charts-updated").textContent = "updated " + new Date().toLocaleTimeString();
  };
  // SG.poll's loop, but a busy server's 503 is retried after its Retry-After (a few seconds,
  // spread so that a wall of displays does not come back at once), not 10 s later.
  const url = "/dashboard/api/charts.json?range=" + encodeURIComponent(range);
  const EVERY_MS = 10000;
  const run = async () => {
    let next = EVERY_MS;
    if (document.visibilityState === "visible") {
      try {
        const r = await fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin"});
        if (r.status === 401 || r.redirected) { location.reload(); return; }
        if (r.ok) draw(await r.json());
        else if (r.status === 503) next = (Number(r.headers.get("Retry-After")) || 2) * 1000 * (1 + Math.random());
      } catch (e) { /* the next poll tries again */ }
    }
    setTimeout(run, next);
  };
  run();
})();
