// The shardlake console page. Plain JavaScript, no framework: every value that came from the
// stream is written with textContent (never innerHTML), so a device id or a field value that
// looks like markup stays text.
"use strict";

const PAGE_SIZE = 100;
const STALE_MS = 2 * 60 * 1000;

const state = {
  me: null,
  version: 0,
  cursor: "",           // where the event stream resumes: `<epoch>.<version>`
  devices: new Map(),   // device id → row
  alerts: new Map(),    // alert id → row
  acks: new Map(),      // alert id → ack
  sort: { col: "device", dir: 1 },
  page: 0,
  source: null,
  device: null,         // the device page's current device
  range: "1h",
};

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  if (r.status === 401) {
    window.location.href = "/auth/login?next=" + encodeURIComponent("/" + (location.hash || "#/fleet"));
    throw new Error("signing in");
  }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function fmtTime(us) {
  if (us === null || us === undefined) return "";
  return new Date(us / 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function fmtAge(us) {
  const s = Math.max(0, Math.round((Date.now() - us / 1000) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

function fmtValue(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(2);
  return v === undefined || v === null ? "" : String(v);
}

// Open (unacknowledged) alerts per device, counted once per render.
function openAlertCounts() {
  const counts = new Map();
  for (const a of state.alerts.values()) {
    if (a.device !== null && !state.acks.has(a.id)) counts.set(a.device, (counts.get(a.device) || 0) + 1);
  }
  return counts;
}

// ---- live data ----

function apply(view) {
  for (const d of view.devices || []) {
    const old = state.devices.get(d.device);
    if (old) {
      // An update carries the minutes of each field's history that changed since the last one.
      for (const [f, pts] of Object.entries(d.history || {})) {
        const h = old.history[f] || (old.history[f] = []);
        for (const p of pts) {
          const i = h.findIndex((x) => x[0] === p[0]);
          if (i >= 0) h[i] = p; else { h.push(p); h.sort((a, b) => a[0] - b[0]); }
        }
        if (h.length > 30) h.splice(0, h.length - 30);
      }
      old.values = d.values; old.event_us = d.event_us; old.tenant = d.tenant; old.version = d.version;
      old.changed = Date.now();
    } else {
      d.changed = Date.now();
      state.devices.set(d.device, d);
    }
  }
  for (const a of view.alerts || []) { a.fresh = true; state.alerts.set(a.id, a); }
  for (const k of view.acks || []) state.acks.set(k.alert, k);
  if (view.version > state.version) state.version = view.version;
}

async function loadSnapshot() {
  const r = await api("/api/fleet");
  const view = await r.json();
  state.devices.clear(); state.alerts.clear(); state.acks.clear(); state.version = 0;
  apply(view);
  state.cursor = view.cursor;
  for (const a of state.alerts.values()) a.fresh = false;
  render();
}

function follow() {
  if (state.source) state.source.close();
  const es = new EventSource("/api/events?since=" + encodeURIComponent(state.cursor));
  state.source = es;
  es.addEventListener("open", () => setConn("live"));
  es.addEventListener("error", () => setConn("down"));
  es.addEventListener("changes", (e) => {
    apply(JSON.parse(e.data));
    state.cursor = e.lastEventId;
    scheduleRender();
  });
  es.addEventListener("reset", async () => {
    es.close();
    await loadSnapshot();
    follow();
  });
}

function setConn(s) {
  const c = $("connection");
  c.textContent = s === "live" ? "live" : "reconnecting…";
  c.className = "conn " + s;
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; render(); });
}

// ---- pages ----

function route() {
  const h = location.hash || "#/fleet";
  const [, page, arg] = h.match(/^#\/([a-z]+)\/?(.*)$/) || [null, "fleet", ""];
  for (const p of ["fleet", "alerts", "device", "query"]) {
    $("page-" + p).hidden = p !== page;
    const nav = $("nav-" + p);
    if (nav) nav.classList.toggle("active", p === page);
  }
  if (page === "device") {
    state.device = decodeURIComponent(arg);
    loadDevice();
  } else {
    state.device = null;
  }
  render();
}

function render() {
  const page = (location.hash || "#/fleet").split("/")[1] || "fleet";
  let open = 0;
  for (const a of state.alerts.values()) if (!state.acks.has(a.id)) open++;
  $("alert-count").textContent = open ? String(open) : "";
  if (page === "fleet") renderFleet();
  if (page === "alerts") renderAlerts();
}

function fleetColumns() {
  const fields = (state.me && state.me.fields) || [];
  return ["device", "tenant", "age", ...fields, "sparkline", "alerts"];
}

function renderFleet() {
  const cols = fleetColumns();
  const head = $("fleet-head");
  if (head.childElementCount !== cols.length) {
    head.replaceChildren(...cols.map((c) => {
      const th = el("th", c);
      th.dataset.col = c;
      th.addEventListener("click", () => {
        state.sort = { col: c, dir: state.sort.col === c ? -state.sort.dir : 1 };
        renderFleet();
      });
      return th;
    }));
  }
  const text = $("filter-device").value.trim().toLowerCase();
  const tenant = $("filter-tenant").value;
  const alertState = $("filter-alerts").value;
  const stale = $("filter-stale").value;
  const tenants = new Set();
  const open = openAlertCounts();
  const now = Date.now();
  let rows = [];
  for (const d of state.devices.values()) {
    if (d.tenant) tenants.add(d.tenant);
    const isStale = now - d.event_us / 1000 > STALE_MS;
    const n = open.get(d.device) || 0;
    if (text && !d.device.toLowerCase().includes(text)) continue;
    if (tenant && d.tenant !== tenant) continue;
    if (alertState === "open" && !n) continue;
    if (alertState === "none" && n) continue;
    if (stale === "stale" && !isStale) continue;
    if (stale === "fresh" && isStale) continue;
    rows.push({ d, isStale, n });
  }
  const sel = $("filter-tenant");
  const known = new Set([...sel.options].map((o) => o.value));
  for (const t of [...tenants].sort()) if (!known.has(t)) sel.appendChild(el("option", t)).value = t;

  const { col, dir } = state.sort;
  const key = (r) => col === "device" ? r.d.device
    : col === "tenant" ? (r.d.tenant || "")
    : col === "age" ? -r.d.event_us
    : col === "alerts" ? r.n
    : col === "sparkline" ? 0
    : r.d.values[col];
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === y) return a.d.device < b.d.device ? -1 : 1;
    if (x === undefined) return 1;
    if (y === undefined) return -1;
    return (x < y ? -1 : 1) * dir;
  });
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  const shown = rows.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE);
  $("page-info").textContent = "page " + (state.page + 1) + " of " + pages;
  $("fleet-count").textContent = rows.length + " of " + state.devices.size + " devices";
  const sparkField = $("spark-field").value;
  const body = $("fleet-body");
  body.replaceChildren(...shown.map(({ d, isStale, n }) => {
    const tr = el("tr");
    tr.dataset.device = d.device;
    if (isStale) tr.classList.add("stale");
    if (n) tr.classList.add("alerting");
    for (const c of cols) {
      let td;
      if (c === "device") {
        td = el("td", null, "device");
        const a = el("a", d.device);
        a.href = "#/device/" + encodeURIComponent(d.device);
        td.appendChild(a);
      } else if (c === "tenant") td = el("td", d.tenant || "");
      else if (c === "age") { td = el("td", fmtAge(d.event_us), "age"); td.title = fmtTime(d.event_us); }
      else if (c === "sparkline") { td = el("td"); td.appendChild(sparkline((d.history || {})[sparkField] || [])); }
      else if (c === "alerts") td = el("td", n ? String(n) : "", "num");
      else {
        const v = d.values[c];
        td = el("td", fmtValue(v), typeof v === "number" ? "num" : "");
        td.dataset.field = c;
      }
      tr.appendChild(td);
    }
    return tr;
  }));
}

const SVG = "http://www.w3.org/2000/svg";

function polyline(points, w, h, pad) {
  const p = document.createElementNS(SVG, "polyline");
  if (points.length) {
    const xs = points.map((q) => q[0]), ys = points.map((q) => q[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = (x) => pad + (x1 === x0 ? (w - 2 * pad) / 2 : (x - x0) / (x1 - x0) * (w - 2 * pad));
    const sy = (y) => h - pad - (y1 === y0 ? (h - 2 * pad) / 2 : (y - y0) / (y1 - y0) * (h - 2 * pad));
    p.setAttribute("points", points.map((q) => sx(q[0]).toFixed(1) + "," + sy(q[1]).toFixed(1)).join(" "));
  }
  return p;
}

function sparkline(points) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 24");
  svg.appendChild(polyline(points, 120, 24, 2));
  return svg;
}

function renderAlerts() {
  const rows = [...state.alerts.values()].sort((a, b) => b.event_us - a.event_us || (a.id < b.id ? -1 : 1));
  const operator = state.me && (state.me.role === "operator" || state.me.role === "admin");
  $("alerts-body").replaceChildren(...rows.slice(0, 1000).map((a) => {
    const tr = el("tr");
    tr.dataset.alert = a.id;
    if (a.fresh) { tr.classList.add("new"); a.fresh = false; }
    tr.appendChild(el("td", fmtTime(a.event_us)));
    tr.appendChild(el("td", a.rule));
    const dev = el("td");
    if (a.device) {
      const link = el("a", a.device);
      link.href = "#/device/" + encodeURIComponent(a.device);
      dev.appendChild(link);
    }
    tr.appendChild(dev);
    tr.appendChild(el("td", a.tenant || ""));
    tr.appendChild(el("td", a.detail, "detail"));
    const ackTd = el("td", null, "ack");
    const ack = state.acks.get(a.id);
    if (ack) {
      ackTd.textContent = "by " + ack.by + " at " + fmtTime(ack.at_us);
    } else if (operator) {
      const b = el("button", "acknowledge");
      b.addEventListener("click", () => acknowledge(a.id, b));
      ackTd.appendChild(b);
    }
    tr.appendChild(ackTd);
    return tr;
  }));
}

async function acknowledge(id, button) {
  button.disabled = true;
  try {
    const r = await api("/api/alerts/" + encodeURIComponent(id) + "/ack", { method: "POST", headers: csrfHeaders() });
    const ack = await r.json();
    state.acks.set(ack.alert, ack);
    render();
  } catch (e) {
    button.disabled = false;
    button.title = e.message;
  }
}

function csrfHeaders() {
  const m = document.cookie.match(/(?:^|; )shardlake_csrf=([^;]+)/);
  return m ? { "x-csrf-token": decodeURIComponent(m[1]) } : {};
}

// ---- device page ----

async function loadDevice(custom) {
  const id = state.device;
  $("device-title").textContent = id;
  $("device-error").hidden = true;
  let q = "range=" + state.range;
  if (custom) q = "range=custom&from=" + encodeURIComponent(custom[0]) + "&to=" + encodeURIComponent(custom[1]);
  loadSettings();
  try {
    const r = await api("/api/devices/" + encodeURIComponent(id) + "?" + q);
    const data = await r.json();
    if (state.device !== id) return;
    renderDevice(data);
  } catch (e) {
    $("device-error").textContent = e.message;
    $("device-error").hidden = false;
  }
}

function renderDevice(data) {
  const aggs = data.aggregates || [];
  const numeric = aggs.length ? Object.keys(aggs[0]).filter((k) => typeof aggs[0][k] === "number") : [];
  const sel = $("chart-field");
  const want = sel.value;
  sel.replaceChildren(...numeric.map((f) => { const o = el("option", f); o.value = f; return o; }));
  if (numeric.includes(want)) sel.value = want;
  const field = sel.value;
  const pts = aggs.filter((r) => typeof r[field] === "number")
    .map((r) => [Date.parse(r.window_start.replace(" ", "T") + (r.window_start.endsWith("Z") ? "" : "Z")), r[field]]);
  const chart = $("chart");
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 800 260");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.appendChild(polyline(pts, 800, 260, 20));
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", "24"); label.setAttribute("y", "14");
  label.textContent = (data.table || "no aggregation") + " · " + (field || "no field") + " · " + aggs.length + " windows from " + data.from + " to " + data.to;
  svg.appendChild(label);
  chart.replaceChildren(svg);
  chart.dataset.points = String(pts.length);

  const readings = data.readings || [];
  const cols = readings.length ? Object.keys(readings[0]) : [];
  $("readings-head").replaceChildren(...cols.map((c) => el("th", c)));
  $("readings-body").replaceChildren(...readings.map((r) => {
    const tr = el("tr");
    for (const c of cols) tr.appendChild(el("td", fmtValue(r[c])));
    return tr;
  }));
  $("device-alerts").replaceChildren(...(data.alerts || []).map((a) => {
    const tr = el("tr");
    tr.appendChild(el("td", a.event_time));
    tr.appendChild(el("td", a.rule));
    tr.appendChild(el("td", a.detail, "detail"));
    return tr;
  }));
}

// ---- device settings (desired and reported state) ----

async function loadSettings() {
  const id = state.device;
  $("settings").hidden = !state.me.commands;
  if (!state.me.commands) return;
  $("settings-error").hidden = true;
  const operator = state.me && (state.me.role === "operator" || state.me.role === "admin");
  try {
    const r = await api("/api/devices/" + encodeURIComponent(id) + "/desired");
    const data = await r.json();
    if (state.device !== id) return;
    renderSettings(data.desired, data.reported);
    $("settings-form").hidden = !operator;
  } catch (e) {
    $("settings-body").replaceChildren();
    $("settings-status").textContent = "";
    $("settings-form").hidden = true;
    $("settings-error").textContent = e.message;
    $("settings-error").hidden = false;
  }
}

function renderSettings(desired, reported) {
  const want = (desired && desired.state) || {};
  const have = (reported && reported.applied) || {};
  const keys = [...new Set([...Object.keys(want), ...Object.keys(have)])].sort();
  $("settings-body").replaceChildren(...keys.map((k) => {
    const tr = el("tr");
    tr.appendChild(el("td", k));
    tr.appendChild(el("td", k in want ? fmtValue(want[k]) : "—"));
    tr.appendChild(el("td", k in have ? fmtValue(have[k]) : "—"));
    return tr;
  }));
  let text = desired ? "desired version " + desired.version + " (" + (desired.by || "?") + ")" : "no desired state";
  if (reported) {
    text += "; the device reports version " + reported.version + ", " + reported.status;
    const refused = Object.entries(reported.refused || {});
    if (refused.length) text += ": " + refused.map(([k, v]) => k + ": " + v).join("; ");
  } else {
    text += "; no report from the device";
  }
  $("settings-status").textContent = text;
}

async function changeSetting(unset) {
  const key = $("setting-key").value.trim();
  if (!key) return;
  let body;
  if (unset) {
    body = { unset: [key] };
  } else {
    const raw = $("setting-value").value.trim();
    let value = raw;
    if (raw === "true" || raw === "false") value = raw === "true";
    else if (raw !== "" && !isNaN(Number(raw))) value = Number(raw);
    body = { set: { [key]: value } };
  }
  $("settings-error").hidden = true;
  try {
    const r = await api("/api/devices/" + encodeURIComponent(state.device) + "/desired", {
      method: "POST",
      headers: Object.assign({ "content-type": "application/json" }, csrfHeaders()),
      body: JSON.stringify(body),
    });
    const out = await r.json();
    renderSettings(out.desired, out.reported);
  } catch (e) {
    $("settings-error").textContent = e.message;
    $("settings-error").hidden = false;
  }
}

// ---- query page ----

async function runQuery(format) {
  const sql = $("sql").value;
  $("query-error").hidden = true;
  $("query-status").textContent = "running…";
  const started = performance.now();
  try {
    const headers = Object.assign({ "content-type": "application/json", accept: format === "csv" ? "text/csv" : "application/json" }, csrfHeaders());
    const r = await api("/api/query", { method: "POST", headers, body: JSON.stringify({ sql }) });
    const truncated = r.headers.get("x-shardlake-truncated") === "true";
    if (format === "csv") {
      const blob = await r.blob();
      const a = el("a");
      a.href = URL.createObjectURL(blob);
      a.download = "query.csv";
      document.body.appendChild(a);
      a.click();
      a.remove();
      $("query-status").textContent = "CSV downloaded";
      return;
    }
    const rows = await r.json();
    const cols = rows.length ? Object.keys(rows[0]) : [];
    $("result-head").replaceChildren(...cols.map((c) => el("th", c)));
    $("result-body").replaceChildren(...rows.map((row) => {
      const tr = el("tr");
      for (const c of cols) tr.appendChild(el("td", fmtValue(row[c])));
      return tr;
    }));
    $("query-status").textContent = rows.length + " rows" + (truncated ? " (cut at the row limit)" : "") + " in " + Math.round(performance.now() - started) + " ms";
  } catch (e) {
    $("query-status").textContent = "";
    $("query-error").textContent = e.message;
    $("query-error").hidden = false;
  }
}

// ---- start ----

async function start() {
  try {
    state.me = await (await api("/api/me")).json();
  } catch (e) {
    document.body.replaceChildren(el("p", "The console could not start: " + e.message, "error"));
    return;
  }
  $("pipeline").textContent = state.me.pipeline;
  if (state.me.signs_in) {
    $("logout").hidden = false;
    $("logout").addEventListener("click", async () => {
      await fetch("/auth/logout", { method: "POST", credentials: "same-origin" });
      window.location.href = "/";
    });
  }
  $("whoami").textContent = state.me.name + (state.me.tenant ? " · " + state.me.tenant : "") + " · " + state.me.role;
  const spark = $("spark-field");
  for (const f of state.me.numeric_fields) { const o = el("option", f); o.value = f; spark.appendChild(o); }
  const firstTable = state.me.device_table || (state.me.tables || [])[0] || "";
  $("sql").value = firstTable ? "SELECT * FROM " + firstTable + " ORDER BY 1 DESC LIMIT 100" : "SELECT 1";
  for (const id of ["filter-device", "filter-tenant", "filter-alerts", "filter-stale", "spark-field"]) {
    $(id).addEventListener("input", () => { state.page = 0; renderFleet(); });
  }
  $("prev-page").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderFleet(); });
  $("next-page").addEventListener("click", () => { state.page++; renderFleet(); });
  for (const b of document.querySelectorAll("button.range")) {
    b.addEventListener("click", () => { state.range = b.dataset.range; loadDevice(); });
  }
  $("range-custom").addEventListener("click", () => {
    const f = $("range-from").value, t = $("range-to").value;
    if (f && t) loadDevice([new Date(f).toISOString(), new Date(t).toISOString()]);
  });
  $("chart-field").addEventListener("input", () => loadDevice());
  $("setting-set").addEventListener("click", () => changeSetting(false));
  $("setting-unset").addEventListener("click", () => changeSetting(true));
  $("run-query").addEventListener("click", () => runQuery("json"));
  $("csv-query").addEventListener("click", () => runQuery("csv"));
  window.addEventListener("hashchange", route);
  await loadSnapshot();
  follow();
  route();
  // Ages move even when nothing arrives.
  setInterval(() => { if (!renderPending) scheduleRender(); }, 5000);
}

document.addEventListener("DOMContentLoaded", start);
