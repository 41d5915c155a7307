"use strict";
// The dashboard page: sign-in, the live session table, actions, a session page.
//
// The token lives only in this variable (never localStorage or cookies), so
// it is gone when the tab closes; every request and the websocket carry it,
// and the broker authorizes each call as that token.
let token = null;
let me = null;            // {can_view, can_manage, pairing_code, target} from /api/me
let ws = null;
let lastEventId = "";
let retryDelayMs = 500;
const sessions = new Map();   // session id -> {ev, retryEnd}
const qrUrls = new Map();     // session id -> blob URL of the QR image shown
// Every distinct state each row has shown, in order (tests read it; it also
// makes a brief RECONNECTING visible to anyone debugging in the console).
window.stateHistory = {};

const MANAGE_ACTIONS = [
  // [action, label, confirmation (null: none)]
  ["pair", "Pair", null],
  ["restart", "Restart", null],
  ["stop", "Stop", "Stop {id}? It disconnects and stays disconnected until restarted."],
  ["logout", "Log out", "Log {id} out? Its login is wiped; it must be paired again."],
  ["delete", "Delete", "Delete {id}? Its credentials and queued messages are gone for good."],
];
const STATES = ["STOPPED", "CONNECTING", "PAIRING", "OPEN", "RECONNECTING", "CONFLICT",
                "LOGGED_OUT", "FAILED"];
const HEALTH_POLL_MS = 2000;
const HOUR_S = 3600;

const $ = (id) => document.getElementById(id);
const tbody = document.querySelector("#sessions tbody");

// -- talking to the dashboard ------------------------------------------------

class ApiError extends Error {
  constructor(status, error) {
    const words = error && error.message ? error.message : `HTTP ${status}`;
    const why = error && (error.reason || error.code) ? ` (${error.reason || error.code})` : "";
    super(words + why);
    this.status = status;
    this.reason = error ? error.reason : "";
  }
}

async function api(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store", credentials: "omit",
  });
  const kind = response.headers.get("Content-Type") || "";
  if (!response.ok) {
    const data = kind.startsWith("application/json") ? await response.json() : null;
    throw new ApiError(response.status, data && data.error);
  }
  return kind.startsWith("application/json") ? response.json() : response.blob();
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setConn(text, cls) { $("conn").textContent = text; $("conn").className = cls; }

// -- sign-in ----------------------------------------------------------------

async function whoAmI() {
  try {
    me = await api("GET", "/api/me");
  } catch (err) {
    me = null;
    if (err.status === 401) { showSignIn(token ? "Sign-in failed: " + err.message : ""); return; }
    if (err.status === 403) { showSignIn("This token may not view sessions: " + err.message); return; }
    showError("Cannot reach the broker: " + err.message);
    setTimeout(whoAmI, 3000);
    return;
  }
  showError("");
  $("signin").hidden = true;
  $("target").textContent = me.target;
  $("who").textContent = token ? (me.can_manage ? "signed in: admin" : "signed in: viewer") : "";
  $("signout").hidden = !token;
  document.body.dataset.role = me.can_manage ? "manage" : "view";
  for (const el of document.querySelectorAll("[data-manage]")) el.disabled = !me.can_manage;
  for (const el of [$("new-session"), $("new-tenant")]) el.disabled = !me.can_manage;
  connect();
  route();
}

function showSignIn(message) {
  disconnect();
  clearTable();
  $("signin").hidden = false;
  $("list").hidden = true;
  $("detail").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  showError(message);
  $("token").focus();
}

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value.trim() || null;
  $("token").value = "";
  whoAmI();
});

$("signout").addEventListener("click", () => { token = null; me = null; showSignIn(""); });

// -- the live table ------------------------------------------------------------

function cell(row, name) { return row.querySelector(`[data-col="${name}"]`); }

function clearTable() {
  sessions.clear();
  tbody.replaceChildren();
  for (const url of qrUrls.values()) URL.revokeObjectURL(url);
  qrUrls.clear();
  lastEventId = "";
  $("empty").hidden = false;
}

function rowFor(sid) {
  let row = document.getElementById("row-" + sid);
  if (row) return row;
  row = document.createElement("tr");
  row.id = "row-" + sid;
  row.dataset.session = sid;
  for (const col of ["id", "tenant", "state", "reason", "retry", "attempt", "updated", "qr",
                     "actions"]) {
    const td = document.createElement("td");
    td.dataset.col = col;
    td.className = col;
    row.appendChild(td);
  }
  const link = document.createElement("a");
  link.href = "#/session/" + encodeURIComponent(sid);
  link.textContent = sid;
  cell(row, "id").appendChild(link);
  for (const [action, label, confirmText] of MANAGE_ACTIONS) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.action = action;
    button.dataset.manage = "";
    if (confirmText) button.className = "danger";
    button.disabled = !(me && me.can_manage);
    button.addEventListener("click", () => act(sid, action, confirmText));
    cell(row, "actions").appendChild(button);
  }
  if (me && me.pairing_code) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Pair by code";
    button.dataset.action = "pairing-code";
    button.dataset.manage = "";
    button.disabled = !me.can_manage;
    button.addEventListener("click", () => askPhone(sid));
    cell(row, "actions").appendChild(button);
  }
  const after = [...tbody.children].find((r) => r.dataset.session > sid);
  tbody.insertBefore(row, after || null);
  $("empty").hidden = true;
  return row;
}

function apply(ev) {
  if (ev.event_id) lastEventId = ev.event_id;
  const known = sessions.get(ev.session_id);
  // A resumed stream or a resync snapshot may repeat what we already show.
  if (known && !ev.resync && ev.sequence < known.ev.sequence) return;
  const entry = { ev, retryEnd: ev.retry_left_ms ? performance.now() + ev.retry_left_ms : 0 };
  sessions.set(ev.session_id, entry);
  const history = (window.stateHistory[ev.session_id] ||= []);
  if (history[history.length - 1] !== ev.state) history.push(ev.state);
  render(ev.session_id, entry, known ? known.ev : null);
  if (detailId === ev.session_id) pollHealth();
}

function render(sid, entry, before) {
  const ev = entry.ev;
  const row = rowFor(sid);
  row.dataset.state = ev.state;
  cell(row, "tenant").textContent = ev.tenant;
  const badge = document.createElement("span");
  badge.className = "badge s-" + ev.state;
  badge.textContent = ev.state;
  cell(row, "state").replaceChildren(badge);
  cell(row, "reason").textContent = ev.reason ? ev.reason + (ev.code ? ` (${ev.code})` : "") : "";
  cell(row, "attempt").textContent = ev.attempt && ev.state !== "OPEN" ? String(ev.attempt) : "";
  cell(row, "updated").textContent = ev.at_ms ? new Date(ev.at_ms).toLocaleTimeString() : "";
  const pair = row.querySelector('button[data-action="pair"]');
  if (pair) pair.title = ev.state === "PAIRING" ? "scan the QR" : "start a new pairing";
  const qr = cell(row, "qr");
  const detailQr = $("detail-qr");
  if (ev.state === "PAIRING" && ev.has_qr) {
    // A new QR (a new event) is fetched again; the image carries the token's header.
    if (!before || before.event_id !== ev.event_id || !qr.querySelector("img.qr")) {
      loadQr(sid, qr);
      if (detailId === sid) loadQr(sid, detailQr);
    }
  } else {
    dropQr(sid, qr);
    if (detailId === sid) detailQr.replaceChildren();
  }
  tick();
}

async function loadQr(sid, td) {
  let blob;
  try {
    blob = await api("GET", `/qr/${encodeURIComponent(sid)}.svg`);
  } catch (err) {
    return;  // no longer pairing: the next event says so
  }
  const entry = sessions.get(sid);
  if (!entry || entry.ev.state !== "PAIRING") return;
  let img = td.querySelector("img.qr");
  if (!img) {
    img = document.createElement("img");
    img.className = "qr";
    img.alt = "pairing QR for " + sid;
    td.replaceChildren(img);
  }
  // The row and the session page show the same image: one URL per session.
  const url = URL.createObjectURL(blob);
  const old = qrUrls.get(sid);
  qrUrls.set(sid, url);
  img.src = url;
  for (const other of document.querySelectorAll("img.qr")) {
    if (other.src === old) other.src = url;
  }
  if (old) URL.revokeObjectURL(old);
}

function dropQr(sid, td) {
  td.replaceChildren();
  if (qrUrls.has(sid)) { URL.revokeObjectURL(qrUrls.get(sid)); qrUrls.delete(sid); }
}

function removeRow(sid) {
  const row = document.getElementById("row-" + sid);
  if (row) { dropQr(sid, cell(row, "qr")); row.remove(); }
  sessions.delete(sid);
  $("empty").hidden = tbody.children.length > 0;
}

function tick() {
  const now = performance.now();
  for (const [sid, entry] of sessions) {
    const row = document.getElementById("row-" + sid);
    if (!row) continue;
    const retry = cell(row, "retry");
    if (entry.ev.state === "RECONNECTING" && entry.retryEnd) {
      const left = Math.max(0, entry.retryEnd - now);
      retry.textContent = left > 0 ? `in ${(left / 1000).toFixed(1)} s` : "now";
    } else {
      retry.textContent = "";
    }
  }
}

// -- the status websocket --------------------------------------------------------

function connect() {
  disconnect();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(
    `${scheme}://${location.host}/ws?resume_after=${encodeURIComponent(lastEventId)}`);
  ws = socket;
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: "auth", token }));
    setConn("live", "live");
    retryDelayMs = 500;
  };
  socket.onmessage = (msg) => {
    const data = JSON.parse(msg.data);
    if (data.type === "hello") $("target").textContent = data.target;
    else if (data.type === "event") apply(data.event);
    else if (data.type === "error") setConn("broker: " + data.message, "down");
  };
  socket.onclose = (e) => {
    if (ws !== socket) return;  // replaced or signed out
    ws = null;
    if (e.code === 4401) { showSignIn("Signed out: " + (e.reason || "token refused")); return; }
    if (e.code === 4403) { setConn("this token may not watch sessions", "down"); return; }
    if ($("conn").className !== "down") setConn("reconnecting…", "down");
    setTimeout(() => { if (!ws && me) connect(); }, retryDelayMs);
    retryDelayMs = Math.min(retryDelayMs * 2, 10000);
  };
}

function disconnect() {
  const socket = ws;
  ws = null;
  if (socket) socket.close();
}

// -- actions -------------------------------------------------------------------

function confirmed(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-yes").onclick = $("confirm-no").onclick = null;
      dialog.close();
      resolve(answer);
    };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    dialog.oncancel = () => done(false);
    dialog.showModal();
  });
}

async function act(sid, action, confirmText) {
  if (confirmText && !(await confirmed(confirmText.replace("{id}", sid)))) return;
  const path = `/api/sessions/${encodeURIComponent(sid)}`;
  try {
    if (action === "delete") {
      await api("DELETE", path);
      removeRow(sid);
    } else if (action === "pair") {
      const entry = sessions.get(sid);
      // Already pairing: the QR is on the row. Otherwise a restart starts a new pairing.
      if (!entry || entry.ev.state !== "PAIRING") await api("POST", path + "/restart");
    } else {
      await api("POST", `${path}/${action}`);
    }
    showError("");
  } catch (err) {
    showError(`Could not ${action} ${sid}: ${err.message}`);
  }
}

$("create-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const sid = $("new-session").value.trim();
  try {
    await api("POST", "/api/sessions", { session_id: sid, tenant: $("new-tenant").value.trim() });
    $("new-session").value = "";
    showError("");
  } catch (err) {
    showError(`Could not create ${sid || "a session"}: ${err.message}`);
  }
});

function askPhone(sid) {
  $("phone-session").textContent = sid;
  $("phone-code").textContent = "";
  $("phone").dataset.session = sid;
  $("phone").showModal();
}

$("phone-close").addEventListener("click", () => $("phone").close());
$("phone-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const sid = $("phone").dataset.session;
  try {
    const answer = await api("POST", `/api/sessions/${encodeURIComponent(sid)}/pairing-code`,
                             { phone_number: $("phone-number").value.trim() });
    $("phone-code").textContent = "Type this code into the phone: " + answer.code;
  } catch (err) {
    $("phone-code").textContent = "No code: " + err.message;
  }
});

// -- the session page ------------------------------------------------------------

let detailId = null;
let pollTimer = null;
const samples = new Map();   // session id -> [{t, accepted, acked, outbox}] (server clock, s)
window.plots = {};           // name -> uPlot (tests read their data)

function route() {
  const match = location.hash.match(/^#\/session\/(.+)$/);
  detailId = match ? decodeURIComponent(match[1]) : null;
  if (!me) return;
  $("list").hidden = detailId !== null;
  $("detail").hidden = detailId === null;
  clearInterval(pollTimer);
  if (detailId !== null) {
    $("detail-title").textContent = detailId;
    for (const p of Object.values(window.plots)) p.destroy();
    window.plots = {};
    for (const id of ["recs", "counters", "detail-qr"]) $(id).replaceChildren();
    const entry = sessions.get(detailId);
    if (entry && entry.ev.state === "PAIRING" && entry.ev.has_qr) loadQr(detailId, $("detail-qr"));
    $("transitions").tBodies[0].replaceChildren();
    pollHealth();
    pollTimer = setInterval(pollHealth, HEALTH_POLL_MS);
  }
}
window.addEventListener("hashchange", route);

async function pollHealth() {
  const sid = detailId;
  if (sid === null) return;
  let health;
  try {
    health = await api("GET", `/api/sessions/${encodeURIComponent(sid)}/health`);
  } catch (err) {
    showError(`No health for ${sid}: ${err.message}`);
    return;
  }
  if (sid !== detailId) return;
  showError("");
  const series = samples.get(sid) || [];
  const c = health.counters;
  const t = health.now_ms / 1000;
  series.push({ t, accepted: c.messages_accepted, acked: c.messages_acked, outbox: c.outbox_depth });
  while (series.length && series[0].t < t - HOUR_S) series.shift();
  samples.set(sid, series);
  renderHealth(health);
  renderPlots(health, series);
}

function renderHealth(health) {
  const badge = document.createElement("span");
  badge.className = "badge s-" + health.session.state;
  badge.textContent = health.session.state;
  $("detail-state").replaceChildren(badge);
  $("detail-owner").textContent = health.owner ? "owned by " + health.owner : "no owner";
  const recs = health.recommendations.length ? health.recommendations
    : [{ severity: "INFO", message: "Nothing needs attention." }];
  $("recs").replaceChildren(...recs.map((r) => {
    const li = document.createElement("li");
    li.className = r.severity;
    li.textContent = r.message;
    return li;
  }));
  const c = health.counters;
  const pct = (x) => (100 * x).toFixed(1) + " %";
  const rows = [
    ["Messages accepted", c.messages_accepted], ["Acked upstream", c.messages_acked],
    ["Delivery rate", pct(c.delivery_rate)], ["Outbox depth", c.outbox_depth],
    ["Availability, last hour", pct(c.availability_last_hour)],
    ["Disconnects, last hour", c.disconnects_last_hour],
    ["Reconnect, mean", Math.round(c.reconnect_ms_mean) + " ms"],
    ["Keepalive success", pct(c.keepalive_success_rate)],
    ["Consecutive failures", c.consecutive_failures],
  ];
  $("counters").replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    for (const text of [k, String(v)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
  $("transitions").tBodies[0].replaceChildren(...health.recent.slice().reverse().map((tr) => {
    const row = document.createElement("tr");
    const when = tr.at_ms ? new Date(tr.at_ms).toLocaleTimeString() : "";
    for (const text of [when, `${tr.from} → ${tr.to}`, tr.reason + (tr.code ? ` (${tr.code})` : "")]) {
      const td = document.createElement("td");
      td.textContent = text;
      row.appendChild(td);
    }
    return row;
  }));
}

// The state line: the state an hour ago (when the transitions reach back that
// far), one step per transition since, then the state now.
function stateSeries(health) {
  const now = health.now_ms / 1000;
  const start = now - HOUR_S;
  const known = health.recent.filter((tr) => tr.at_ms);
  const before = known.filter((tr) => tr.at_ms / 1000 < start).pop();
  const xs = [], ys = [];
  if (before) { xs.push(start); ys.push(STATES.indexOf(before.to)); }
  for (const tr of known) {
    if (tr.at_ms / 1000 < start) continue;
    xs.push(tr.at_ms / 1000);
    ys.push(STATES.indexOf(tr.to));
  }
  xs.push(now);
  ys.push(STATES.indexOf(health.session.state));
  return [xs, ys];
}

// Sent and acked per minute, from the counters' growth between samples.
function perMinute(series) {
  const buckets = new Map();
  for (let i = 1; i < series.length; i++) {
    const minute = Math.floor(series[i].t / 60) * 60;
    const b = buckets.get(minute) || { sent: 0, acked: 0 };
    b.sent += Math.max(0, series[i].accepted - series[i - 1].accepted);
    b.acked += Math.max(0, series[i].acked - series[i - 1].acked);
    buckets.set(minute, b);
  }
  const minutes = [...buckets.keys()].sort((a, b) => a - b);
  return [minutes, minutes.map((m) => buckets.get(m).sent), minutes.map((m) => buckets.get(m).acked)];
}

let plotNow = 0;   // the broker's clock at the latest sample, seconds

function plot(name, opts, data) {
  const existing = window.plots[name];
  if (existing) { existing.setData(data); return; }
  const el = $("plot-" + name);
  el.replaceChildren();
  // Every plot spans the last hour, whatever part of it has data.
  const x = { time: true, range: () => [plotNow - HOUR_S, plotNow] };
  window.plots[name] = new uPlot(
    { width: 320, height: 160, ...opts, scales: { x, ...(opts.scales || {}) } }, data, el);
}

function renderPlots(health, series) {
  plotNow = health.now_ms / 1000;
  plot("state", {
    scales: { y: { range: [0, STATES.length - 1] } },
    legend: { show: false },
    axes: [{}, { values: (u, ticks) => ticks.map((v) => STATES[v] || ""), size: 110,
                 font: "11px system-ui", splits: () => STATES.map((_, i) => i) }],
    series: [{}, { label: "state", stroke: "#1c64c8", paths: uPlot.paths.stepped({ align: 1 }) }],
  }, stateSeries(health));
  const bars = uPlot.paths.bars({ size: [0.4, 40] });
  plot("messages", {
    series: [{}, { label: "sent", stroke: "#1c64c8", fill: "#1c64c855", paths: bars },
             { label: "acked", stroke: "#1f8a4c", fill: "#1f8a4c55", paths: bars }],
  }, perMinute(series));
  plot("outbox", {
    legend: { show: false },
    scales: { y: { range: (u, min, max) => [0, Math.max(5, max)] } },
    series: [{}, { label: "outbox", stroke: "#d17f12" }],
  }, [series.map((s) => s.t), series.map((s) => s.outbox)]);
}

// -- start ---------------------------------------------------------------------

setInterval(tick, 200);
whoAmI().then(() => { if (me) $("list").hidden = detailId !== null; });
