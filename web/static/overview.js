// The overview, redrawn from /dashboard/api/overview.json every second.
"use strict";
(() => {
  const canOperate = document.getElementById("can-operate").dataset.ok === "yes";
  const pill = (h) => `<span class="pill ${SG.esc(h)}">${SG.esc(h)}</span>`;
  const set = (id, html) => { document.getElementById(id).innerHTML = html; };
  const empty = (text) => `<li class="empty">${text}</li>`;
  let last = 0;
  const draw = (d) => {
    last = Date.now();
    const banner = document.getElementById("banner");
    banner.className = "banner " + d.status;
    set("status-word", SG.esc(d.status.toUpperCase()) + (d.incidents.length ? ` · ${d.incidents.length} open incident(s)` : ""));
    set("loop", d.loop.ok ? `loop ok, last cycle ${SG.time(d.loop.last_cycle_at)}` : `<b>the control plane's loop is silent</b> (last cycle ${SG.time(d.loop.last_cycle_at)})`);
    SG.badge(d.awaiting.length);
    set("awaiting-count", `(${d.awaiting.length})`);
    set("awaiting", d.awaiting.map((r) => `<li data-run="${r.id}"><a href="/dashboard/actions/${r.id}"><b>${SG.esc(r.action)}</b> on ${SG.esc(r.target)}</a> · run ${r.id} · ${SG.time(r.created_at)}<br><span class="muted">${SG.esc(r.reason)}</span>
      ${canOperate ? ` <a href="/dashboard/actions/${r.id}"><button class="primary">Review</button></a>` : ""}</li>`).join("") || empty("nothing needs you"));
    set("incident-count", `(${d.incidents.length})`);
    set("incidents", d.incidents.map((i) => `<li><a href="/dashboard/incidents/${i.id}">#${i.id} ${SG.esc(i.kind)}</a> on <b>${SG.esc(i.target)}</b> · detected ${SG.time(i.detected_at)}${i.flapping ? " · flapping" : ""}<br><span class="muted">${SG.esc(i.summary)}</span></li>`).join("") || empty("none"));
    set("run-count", `(${d.runs.length})`);
    set("runs", d.runs.map((r) => `<li><a href="/dashboard/actions/${r.id}">${SG.esc(r.action)} on ${SG.esc(r.target)}</a> ${pill(r.state)} · ${SG.time(r.started_at || r.created_at)} · by ${SG.esc(r.requested_by)}</li>`).join("") || empty("none"));
    set("database", d.database.map((n) => `<tr><td>${SG.esc(n.node)}</td><td><span class="role-badge ${SG.esc(n.role.split(" ")[0])}">${SG.esc(n.role)}</span></td><td>${SG.esc(n.state)}</td><td>${SG.esc(n.receiving || "")}${n.lag_bytes != null ? ` · lag ${SG.esc(SG.bytes(n.lag_bytes))}` : ""}</td><td>${SG.esc(n.timeline ?? "")}</td><td>${pill(n.health)}</td></tr>`).join("") || `<tr><td colspan="6" class="muted">no data</td></tr>`);
    const leaders = d.database.filter((n) => n.role === "Leader").length;
    const syncs = d.database.filter((n) => n.sync).length;
    set("db-banner", d.database.length && leaders !== 1 ? `<p class="error">${leaders} leaders: ${leaders ? "split brain?" : "no writable primary"}</p>`
      : d.database.length && !syncs ? `<p class="error">no synchronous standby: commits wait or are not replicated</p>` : "");
    set("services", d.services.map((s) => `<tr data-service="${SG.esc(s.name)}" class="svc ${SG.esc(s.health)}"><td><span class="dot ${SG.esc(s.health)}"></span>${SG.esc(s.name)}</td><td>${pill(s.health)}</td><td>${SG.time(s.since)}</td>
      <td>${s.probes.map((p) => `<div><span class="dot ${SG.esc(p.health)}"></span>${SG.esc(p.name)}: <span class="muted">${SG.esc(p.summary)}${p.latency_ms != null ? ` · ${p.latency_ms} ms` : ""} · ${SG.time(p.at)}</span></div>`).join("")}
      ${s.incidents.map((i) => `<a href="/dashboard/incidents/${i}">incident #${i}</a>`).join(" ")}</td></tr>`).join(""));
  };
  setInterval(() => {
    const age = last ? Math.round((Date.now() - last) / 1000) : null;
    document.getElementById("updated").textContent = age == null ? "" : age > 5 ? `stale: no update for ${age} s` : "live";
    if (age != null && age > 5) document.getElementById("banner").className = "banner unknown";
  }, 1000);
  SG.poll("/dashboard/api/overview.json", draw, 1000);
})();
