// Shared by every page: times in the browser's zone with relative ages, the approval badge.
"use strict";
const SG = {};
SG.csrf = document.querySelector('meta[name="csrf-token"]').content;
// Text from outside, as text: markup escaped, and bidi controls shown as their code points
// (a U+202E in a label would show another target's name). Same as web/__init__.py's `visible`.
SG.esc = (s) => String(s ?? "")
  .replace(/[\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, (c) => `<U+${c.charCodeAt(0).toString(16).toUpperCase()}>`)
  .replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
SG.ago = (iso) => {
  if (!iso) return "—";
  const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 0) return "in " + SG.span(-s);
  if (s < 5) return "just now";
  return SG.span(s) + " ago";
};
SG.span = (s) => s < 60 ? s + " s" : s < 3600 ? Math.floor(s / 60) + " min" : s < 86400 ? Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min" : Math.floor(s / 86400) + " d";
SG.bytes = (n) => n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
SG.local = (iso) => iso ? new Date(iso).toLocaleString() : "";
// Plotly's options on every page. Plotly.js 4 adds a "Share chart..." button that uploads the
// figure to cloud.plotly.com: an operator's data stays here, and the page works offline.
SG.plotlyConfig = {displaylogo: false, responsive: true, showSendToCloud: false, plotlyServerURL: ""};
SG.time = (iso) => `<time datetime="${SG.esc(iso || "")}" title="${SG.esc(SG.local(iso))}">${SG.esc(SG.ago(iso))}</time>`;
SG.tick = () => {
  document.querySelectorAll("time[datetime]").forEach((t) => {
    const iso = t.getAttribute("datetime");
    if (!iso) return;
    t.textContent = t.dataset.abs ? SG.local(iso) : SG.ago(iso);
    t.title = t.dataset.abs ? SG.ago(iso) : SG.local(iso);
  });
};
SG.badge = (n) => {
  const b = document.getElementById("badge");
  if (!b) return;
  b.textContent = n; b.hidden = !n;
  document.title = document.title.replace(/^\(\d+\) /, "");
  if (n) document.title = `(${n}) ` + document.title;
};
SG.poll = async (url, onData, everyMs) => {
  const run = async () => {
    if (document.visibilityState === "visible") {
      try {
        const r = await fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin"});
        if (r.status === 401 || r.redirected) { location.reload(); return; }
        if (r.ok) onData(await r.json());
      } catch (e) { /* the next poll tries again */ }
    }
    setTimeout(run, everyMs);
  };
  run();
};
document.getElementById("tz") && (document.getElementById("tz").textContent = Intl.DateTimeFormat().resolvedOptions().timeZone);
setInterval(SG.tick, 1000);
SG.tick();
// Healing that did not work (held, unsafe, or not done in time), on every page until it is.
SG.escalations = (items) => {
  const b = document.getElementById("escalations");
  if (!b) return;
  b.hidden = !items.length;
  b.innerHTML = items.length ? `<span>Needs a human</span><ul>${items.map((e) =>
    `<li><a href="/dashboard/incidents/${Number(e.incident)}">${SG.esc(e.target)}</a>: ${SG.esc(e.line)}</li>`).join("")}</ul>` : "";
};
if (document.getElementById("escalations")) {
  const overview = document.body.dataset.page === "overview";
  SG.poll("/dashboard/api/badge.json", (d) => {
    if (!overview) SG.badge(d.awaiting);
    SG.escalations(d.escalations || []);
  }, overview ? 2000 : 5000);
}
