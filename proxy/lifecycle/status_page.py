"""The status page served at ``GET /`` on the admin port: one self-contained HTML document.

No external assets and no build step: the CSS and the script are inline.  The
script polls ``/status`` every ``REFRESH_MS`` and renders listeners, routes
(request rate and error rate from the difference between two polls, p99 from
the route's latency window), upstreams (breaker state, time in state, bulkhead
active/pending), retry budgets, rate-limit tokens and the recent breaker
transitions.  Values are inserted as text, never as HTML.
"""

from __future__ import annotations

__all__ = ["PAGE", "REFRESH_MS"]

REFRESH_MS = 1000

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Outrigger status</title>
<style>
  :root { --fg: #1d2330; --muted: #687083; --line: #e3e6ec; --bg: #f7f8fa; --ok: #1f8a4c; --warn: #b7791f;
          --bad: #c53030; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         background: var(--bg); }
  header { display: flex; gap: 1.5em; align-items: baseline; padding: 14px 24px; background: #fff;
           border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0; }
  header span { color: var(--muted); }
  main { padding: 8px 24px 24px; max-width: 1280px; }
  h2 { font-size: 15px; margin: 22px 0 8px; }
  table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
  th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  .state { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600; font-size: 12px; }
  .state-closed { background: #e6f4ea; color: var(--ok); }
  .state-half_open { background: #fdf3e1; color: var(--warn); }
  .state-open { background: #fde8e8; color: var(--bad); }
  .bad { color: var(--bad); font-weight: 600; }
  .muted { color: var(--muted); }
  #error { color: var(--bad); }
</style>
</head>
<body>
<header>
  <h1>Outrigger</h1>
  <span>config <b id="version">-</b></span>
  <span id="readiness">-</span>
  <span>updated <b id="updated">never</b></span>
  <span id="error"></span>
</header>
<main>
  <h2>Listeners</h2>
  <table id="listeners"><thead><tr><th>listener</th><th>address</th><th class="num">in flight</th></tr></thead>
    <tbody></tbody></table>
  <h2>Routes</h2>
  <table id="routes"><thead><tr><th>route</th><th>listener</th><th>http.route</th><th>upstream</th>
    <th class="num">req/s</th><th class="num">error rate</th><th class="num">p99</th><th class="num">requests</th>
    <th class="num">in flight</th><th class="num">retry budget left</th><th class="num">rate-limit tokens</th>
    </tr></thead><tbody></tbody></table>
  <h2>Upstreams</h2>
  <table id="upstreams"><thead><tr><th>upstream</th><th>url</th><th>breaker</th><th class="num">time in state</th>
    <th class="num">bulkhead active</th><th class="num">bulkhead pending</th></tr></thead><tbody></tbody></table>
  <h2>Recent breaker transitions</h2>
  <table id="transitions"><thead><tr><th>time</th><th>breaker</th><th>from</th><th>to</th><th>reason</th></tr>
    </thead><tbody></tbody></table>
</main>
<script>
"use strict";
const REFRESH_MS = __REFRESH_MS__;
const DASH = "\u2013";  // shown where there is no value yet
let previous = null;  // {at: ms, routes: {name: {requests, errors}}}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function state(row, value) {
  const td = cell(row, "", "breaker-state");
  const badge = document.createElement("span");
  badge.className = "state state-" + value;
  badge.textContent = value.replace("_", "-");
  td.appendChild(badge);
}
function fill(id, items, render) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const item of items) {
    const row = document.createElement("tr");
    render(row, item);
    body.appendChild(row);
  }
  if (!items.length) {
    const row = document.createElement("tr");
    const td = cell(row, "none", "muted");
    td.colSpan = 12;
    body.appendChild(row);
  }
}
function seconds(s) {
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return (s / 3600).toFixed(1) + " h";
}
function percent(errors, requests) {
  return requests > 0 ? (100 * errors / requests).toFixed(1) + " %" : DASH;
}

function render(status, now) {
  document.getElementById("version").textContent = status.version;
  document.getElementById("readiness").textContent =
    status.draining ? "draining" : (status.ready ? "ready" : "not ready");
  document.getElementById("updated").textContent = new Date(now).toLocaleTimeString();
  fill("listeners", Object.entries(status.listeners || {}), (row, [name, l]) => {
    row.dataset.listener = name;
    cell(row, name);
    cell(row, l.address.slice(0, l.address.lastIndexOf(":")) + ":" + l.port);  // the bound port
    cell(row, String(l.inflight), "num");
  });
  const elapsed = previous ? (now - previous.at) / 1000 : 0;
  fill("routes", Object.entries(status.routes), (row, [name, r]) => {
    row.dataset.route = name;
    const before = previous && previous.routes[name];
    let rate = DASH, errors = percent(r.errors, r.requests);  // since start until two polls are in
    if (before && elapsed > 0 && r.requests >= before.requests) {
      const dr = r.requests - before.requests, de = r.errors - before.errors;
      rate = (dr / elapsed).toFixed(1);
      if (dr > 0) errors = percent(de, dr);
    }
    cell(row, name, "route-name"); cell(row, r.listener); cell(row, r.http_route); cell(row, r.upstream);
    cell(row, rate, "num req-rate");
    const err = cell(row, errors, "num error-rate");
    if (r.errors > 0 && errors !== "0.0 %") err.classList.add("bad");
    cell(row, r.p99_s === null ? DASH : (r.p99_s * 1000).toFixed(1) + " ms", "num p99");
    cell(row, String(r.requests), "num requests");
    cell(row, String(r.inflight), "num");
    cell(row, r.retry_budget_remaining === undefined ? DASH : String(r.retry_budget_remaining), "num retry-budget");
    const rl = r.rate_limit;
    cell(row, rl ? (rl.tokens !== undefined ? rl.tokens.toFixed(1) : rl.keys + " keys") : DASH, "num rate-limit");
  });
  fill("upstreams", Object.entries(status.upstreams), (row, [name, u]) => {
    row.dataset.upstream = name;
    cell(row, name, "upstream-name"); cell(row, u.url);
    const b = u.circuit_breaker;
    if (b) { state(row, b.state); cell(row, seconds(b.seconds_in_state), "num time-in-state"); }
    else { cell(row, "off", "muted breaker-state"); cell(row, DASH, "num"); }
    cell(row, String(u.active), "num bulkhead-active"); cell(row, String(u.pending), "num bulkhead-pending");
  });
  const transitions = (status.breaker_transitions || []).slice().reverse();
  fill("transitions", transitions, (row, t) => {
    cell(row, t.time); cell(row, t.breaker); state(row, t.from); state(row, t.to); cell(row, t.reason || "");
  });
  const routes = {};
  for (const [name, r] of Object.entries(status.routes)) routes[name] = {requests: r.requests, errors: r.errors};
  previous = {at: now, routes};
}

async function refresh() {
  try {
    const response = await fetch("status", {cache: "no-store"});
    if (!response.ok) throw new Error("/status answered " + response.status);
    render(await response.json(), Date.now());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "cannot reach /status: " + e.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script>
</body>
</html>
""".replace("__REFRESH_MS__", str(REFRESH_MS))
