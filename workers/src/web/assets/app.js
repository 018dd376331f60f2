// The coordinator's page: an overview kept live by server-sent events, an
// order's page (its route with the current step marked, its timeline, its
// payload) and the dead letters. Plain JavaScript, no build step.
"use strict";

const STATUSES = ["completed", "failed", "compensated", "cancelled"];
const COLOURS = { completed: "#2c9a4b", failed: "#c93434", compensated: "#e07b24", cancelled: "#7a7f8c" };
const state = { live: null, workflows: null, route: null };
const view = document.getElementById("view");

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function num(n) { return (n ?? 0).toLocaleString("en-US"); }
function ms(x) {
  if (x == null) return "";
  if (x < 1) return x.toFixed(2) + " ms";
  if (x < 1000) return Math.round(x) + " ms";
  if (x < 60000) return (x / 1000).toFixed(1) + " s";
  return (x / 60000).toFixed(1) + " min";
}
function when(micros) { return micros ? new Date(micros / 1000).toISOString().replace("T", " ").replace("Z", "") : ""; }
function orderLink(id) { return `<a class="mono order-link" href="#/order/${esc(id)}">${esc(id)}</a>`; }
function badge(status) { return `<span class="badge ${esc(status)}">${esc(status)}</span>`; }

async function getJson(url, options) {
  const r = await fetch(url, options);
  let body;
  try { body = await r.json(); } catch { body = { error: `${r.status} ${r.statusText}` }; }
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}
function act(url, body) {
  return getJson(url, {
    method: "POST",
    headers: { "content-type": "application/json", "x-waybill-action": "1" },
    body: JSON.stringify(body || {}),
  });
}

// ---- live updates ------------------------------------------------------
function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/api/events");
  es.addEventListener("live", (e) => {
    state.live = JSON.parse(e.data);
    conn.textContent = "live";
    conn.className = "conn live";
    onLive();
  });
  es.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "conn down"; };
}

function onLive() {
  const route = location.hash || "#/";
  if (route === "#/" || route === "#") renderOverview();
  else if (route.startsWith("#/order/")) refreshOrder();
  const d = state.live && state.live.dashboard;
  if (d) {
    document.getElementById("footer").textContent =
      `coordinator partition ${d.partition} · ${num(d.feed.hops_read)} hops read · last sequence ${num(d.feed.last_sequence)}` +
      (d.feed.caught_up ? "" : " · still replaying the hop stream");
  }
}

// ---- overview ----------------------------------------------------------
function tile(cls, key, n, what, href) {
  const tag = href ? "a" : "div";
  return `<${tag} class="tile ${cls}" data-count="${key}"${href ? ` href="${href}"` : ""}><span class="n">${num(n)}</span><span class="what">${esc(what)}</span></${tag}>`;
}

function funnel(d) {
  const wfs = state.workflows || [];
  const rows = [];
  const seen = new Set();
  const max = Math.max(1, ...Object.values(d.summary.by_step || {}));
  const row = (wf, step) => {
    const key = `${wf}/${step}`;
    seen.add(key);
    const n = (d.summary.by_step || {})[key] || 0;
    const t = (d.step_times || {})[key];
    return `<tr data-step="${esc(key)}"><td>${esc(step)}</td><td class="bar"><div style="width:${(100 * n) / max}%"></div></td>` +
      `<td class="n waiting-count">${num(n)}</td><td class="n">${t ? ms(t.p50_ms) : ""}</td><td class="n">${t ? ms(t.p99_ms) : ""}</td><td class="n muted">${t ? num(t.count) : ""}</td></tr>`;
  };
  const names = [...new Set(wfs.map((w) => w.workflow))];
  for (const name of names) {
    const latest = wfs.filter((w) => w.workflow === name).pop();
    const counts = (d.summary.by_workflow || {})[name] || {};
    const parts = Object.entries(counts).map(([s, n]) => `${badge(s)} ${num(n)}`).join(" ");
    rows.push(`<tr class="wf"><th colspan="6">${esc(name)} <span class="muted">v${latest.version}</span> ${parts}</th></tr>`);
    for (const step of latest.steps) rows.push(row(name, step));
  }
  const others = Object.keys(d.summary.by_step || {}).concat(Object.keys(d.step_times || {})).filter((k) => !seen.has(k));
  for (const key of [...new Set(others)].sort()) {
    const [wf, step] = key.split("/");
    rows.push(row(wf, step));
  }
  return `<table id="funnel"><thead><tr><th>step</th><th>orders waiting there</th><th class="n">now</th><th class="n">p50</th><th class="n">p99</th><th class="n">hops (5–10 min)</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

function chart(points) {
  const w = 600, h = 170, pad = 28;
  if (!points || points.length < 2) return `<p class="muted">Collecting: a point a second.</p>`;
  const totals = points.map((p) => STATUSES.reduce((a, s) => a + (p.ended[s] || 0), 0));
  const max = Math.max(1, ...totals);
  const x = (i) => pad + ((w - pad - 4) * i) / (points.length - 1);
  const y = (v) => h - 18 - ((h - 30) * v) / max;
  const lines = STATUSES.map((s) => {
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(p.ended[s] || 0).toFixed(1)}`).join(" ");
    return `<path d="${d}" fill="none" stroke="${COLOURS[s]}" stroke-width="1.6" data-status="${s}"/>`;
  }).join("");
  const secs = Math.round((points[points.length - 1].at_ms - points[0].at_ms) / 1000);
  return `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none" id="throughput">` +
    `<line x1="${pad}" y1="${y(0)}" x2="${w}" y2="${y(0)}" stroke="#ccd"/><line x1="${pad}" y1="${y(max)}" x2="${w}" y2="${y(max)}" stroke="#eef"/>` +
    `<text x="2" y="${y(max) + 4}" font-size="10" fill="#667">${max}/s</text><text x="2" y="${y(0)}" font-size="10" fill="#667">0</text>` +
    `<text x="${pad}" y="${h - 4}" font-size="10" fill="#667">${secs} s ago</text><text x="${w - 24}" y="${h - 4}" font-size="10" fill="#667">now</text>` +
    `${lines}</svg><div class="legend">${STATUSES.map((s) => `<span><i style="background:${COLOURS[s]}"></i>${s}</span>`).join("")}</div>`;
}

function orderRows(list, empty, extra) {
  if (!list || !list.length) return `<p class="muted">${esc(empty)}</p>`;
  return `<table><thead><tr><th>order</th><th>workflow</th><th>step</th><th>status</th><th>${extra[0]}</th></tr></thead><tbody>` +
    list.map((o) => `<tr><td>${orderLink(o.id)}</td><td>${esc(o.workflow)} v${o.version}</td><td>${esc(o.step)}</td><td>${badge(o.status)}</td><td class="muted">${esc(extra[1](o))}</td></tr>`).join("") +
    `</tbody></table>`;
}

function renderOverview() {
  setNav("overview");
  const live = state.live;
  if (!live || !live.dashboard) { view.innerHTML = `<p class="muted">Waiting for the coordinator…</p>`; return; }
  const d = live.dashboard, s = d.summary;
  const by = s.by_status || {}, fin = s.finished || {};
  const now = live.at_ms * 1000;
  const scroll = window.scrollY;
  view.innerHTML = `
  <section><h2>Orders now</h2><div class="tiles" id="now">
    ${tile("", "in_flight", s.in_flight, "in flight")}
    ${tile("running", "running", by.running, "running")}
    ${tile("compensating", "compensating", by.compensating, "compensating")}
    ${tile("waiting", "waiting", s.waiting, "waiting on infrastructure")}
    ${tile("stalled", "stalled", s.stalled, "stalled")}
    ${tile("", "tracked", s.tracked, "tracked in memory")}
    ${tile("dead", "dead_letters", live.dead_letters, live.dead_letters_error ? "dead letters (unreadable)" : "dead letters", "#/dead-letters")}
  </div></section>
  <section><h2>Finished since the coordinator's view began</h2><div class="tiles" id="finished">
    ${STATUSES.map((st) => tile(st, st, fin[st], st)).join("")}
  </div></section>
  <div class="grid">
    <section><h2>Step funnel and time per step</h2>${funnel(d)}</section>
    <section class="chart"><h2>Orders finished per second</h2>${chart(live.throughput)}</section>
  </div>
  <div class="grid" style="margin-top:16px">
    <section id="stalled"><h2>Stalled orders</h2>${orderRows(d.stalled, "None: every order in flight is within its step's deadline.", ["due", (o) => o.due ? `${ms((now - o.due) / 1000)} overdue` : ""])}</section>
    <section id="failures"><h2>Recent failures</h2>${orderRows(d.recent_failures, "None yet.", ["ended", (o) => when(o.last_hop_at)])}</section>
  </div>`;
  window.scrollTo(0, scroll);
}

// ---- one order ---------------------------------------------------------
let orderShown = null;
async function renderOrder(id) {
  setNav("");
  orderShown = id;
  state.orderSig = null;
  view.innerHTML = `<h1 class="mono">${esc(id)}</h1><p class="muted">Loading…</p>`;
  await refreshOrder(true);
}

async function refreshOrder(first) {
  const id = orderShown;
  if (!id || (!first && state.orderFinal === id)) return;
  let o;
  try {
    o = await getJson(`/api/orders/${encodeURIComponent(id)}`);
  } catch (e) {
    if (orderShown === id) view.innerHTML = `<h1 class="mono">${esc(id)}</h1><div class="notice error" id="order-error">${esc(e.message)}</div>`;
    return;
  }
  if (orderShown !== id) return;
  // Drawn again only when it moved (a redraw would lose the scroll).
  const sig = JSON.stringify(o);
  if (!first && sig === state.orderSig) return;
  state.orderSig = sig;
  state.orderFinal = ["completed", "failed", "compensated", "cancelled"].includes(o.status) ? id : null;
  const graph = await routeSvg(o.workflow, o.version);
  const inFlight = !state.orderFinal;
  view.innerHTML = `
  <h1><span class="mono">${esc(o.id)}</span> ${badge(o.status)} ${o.stalled ? badge("stalled") : ""} ${o.waiting ? badge("waiting") : ""} ${o.asleep_until ? badge("asleep") : ""} ${o.awaiting ? badge("awaiting") : ""}</h1>
  <div id="order-notice">${state.notice && state.notice.id === o.id ? state.notice.html : ""}</div>
  <div class="grid">
    <section><h2>Where it stands</h2><dl class="facts" id="facts">
      <dt>workflow</dt><dd>${esc(o.workflow)} v${o.version}</dd>
      <dt>step</dt><dd id="order-step">${esc(o.step)}${o.service ? ` <span class="muted">(${esc(o.service)})</span>` : ""}</dd>
      <dt>status</dt><dd id="order-status">${esc(o.status)}</dd>
      <dt>attempt · hop</dt><dd>${o.attempt} · ${o.hop}</dd>
      <dt>last hop</dt><dd>${esc(o.last_hop_at)}</dd>
      ${o.due ? `<dt>due</dt><dd>${esc(o.due)}</dd>` : ""}
      ${o.failure ? `<dt>failure</dt><dd>${esc(o.failure)}</dd>` : ""}
      ${o.waiting ? `<dt>waiting</dt><dd>on infrastructure since ${esc(o.waiting.since)}, ${o.waiting.tries} tries: ${esc(o.waiting.error)}</dd>` : ""}
      ${o.asleep_until ? `<dt>asleep</dt><dd id="order-asleep">until ${esc(o.asleep_until)}</dd>` : ""}
      ${o.awaiting ? `<dt>awaiting</dt><dd id="order-awaiting">signal <b>${esc(o.awaiting.signal)}</b> since ${esc(o.awaiting.since)} (deadline ${esc(o.awaiting.deadline)})</dd>` : ""}
      <dt>partition</dt><dd>${esc(o.partition)}</dd>
    </dl>
    ${inFlight ? `<p><button class="danger" id="cancel">Cancel this order</button></p>` : ""}
    </section>
    <section class="graph"><h2>Route</h2>${graph}</section>
  </div>
  <section style="margin-top:16px"><h2>Timeline</h2>${timeline(o.history || [], o.history_error)}</section>
  <section><h2>Payload</h2>${o.payload !== undefined ? `<pre id="payload">${esc(JSON.stringify(o.payload, null, 2))}</pre>` : `<p class="muted">${esc(o.payload_error || "not shown")}</p>`}</section>`;
  markRoute(o);
  const button = document.getElementById("cancel");
  if (button) button.onclick = () => cancelOrder(o.id);
}

async function routeSvg(workflow, version) {
  const key = `${workflow}/${version}`;
  state.routes = state.routes || {};
  if (!(key in state.routes)) {
    const r = await fetch(`/api/graph/${encodeURIComponent(workflow)}/${version}`);
    state.routes[key] = r.ok ? await r.text() : `<p class="muted">${esc((await r.json().catch(() => ({}))).error || "no drawing")}</p>`;
  }
  return state.routes[key];
}

function markRoute(o) {
  let node;
  const css = (s) => (window.CSS && CSS.escape ? CSS.escape(s) : s);
  if (o.status === "running") node = view.querySelector(`.route [data-step="${css(o.step)}"]`);
  else if (o.status === "compensating") node = view.querySelector(`.route [data-undo="${css(o.step)}"]`);
  else if (o.status === "completed") node = view.querySelector("#node-completed");
  else node = view.querySelector("#node-failed");
  if (node) node.classList.add("current");
}

function timeline(history, error) {
  if (error) return `<div class="notice error">${esc(error)}</div>`;
  if (!history.length) return `<p class="muted">No step has run yet.</p>`;
  const t = (s) => Date.parse(s);
  const start = Math.min(...history.map((h) => t(h.started_at)));
  const end = Math.max(...history.map((h) => t(h.ended_at)), start + 1);
  const rows = history.map((h, i) => {
    let result, cls = h.kind === "compensation" ? "compensation" : "";
    if (h.cancelled !== undefined) { result = `cancelled: ${esc(h.cancelled)}`; cls = "cancel"; }
    else if (h.unavailable) { result = `waited on infrastructure (${h.unavailable.tries} tries): ${esc(h.unavailable.error)}`; cls = "unavailable"; }
    else if (h.signal) { result = h.signal.data !== undefined && h.signal.data !== null ? `signal <b>${esc(h.signal.name)}</b> <span class="muted">${esc(h.signal.data)}</span>` : `no signal <b>${esc(h.signal.name)}</b> by its deadline`; cls = "signal"; }
    else if (h.error !== undefined) { result = `${h.transient ? "transient" : "permanent"} error: ${esc(h.error)}`; cls = "error"; }
    else result = `outcome <b>${esc(h.outcome)}</b>${h.detail ? ` <span class="muted">${esc(h.detail)}</span>` : ""}`;
    const left = (100 * (t(h.started_at) - start)) / (end - start);
    const width = Math.max(0.5, (100 * (t(h.ended_at) - t(h.started_at))) / (end - start));
    return `<tr class="entry ${cls}"><td class="n">${i + 1}</td><td>${esc(h.step)}${h.kind === "compensation" ? " <span class=\"muted\">(undo)</span>" : ""}</td>` +
      `<td class="n">${h.attempt}</td><td>${result}</td><td class="mono">${esc(h.started_at)}</td><td class="n">${ms(t(h.ended_at) - t(h.started_at))}</td>` +
      `<td><div class="span"><div style="left:${left}%;width:${width}%"></div></div></td><td class="mono muted">${esc(h.worker)}</td></tr>`;
  }).join("");
  return `<table id="timeline"><thead><tr><th class="n">#</th><th>step</th><th class="n">attempt</th><th>result</th><th>started</th><th class="n">took</th><th>when</th><th>worker</th></tr></thead><tbody>${rows}</tbody></table>`;
}

async function cancelOrder(id) {
  const reason = prompt(`Cancel order ${id}? Its completed steps will be undone. Reason:`, "cancelled from the web page");
  if (reason === null) return;
  let html;
  try {
    const r = await act(`/api/orders/${encodeURIComponent(id)}/cancel`, { reason });
    html = `<div class="notice" id="cancel-result">${r.already_asked ? "A cancel was asked already." : "Cancel asked: the order stops at its next hop and its steps are undone."}</div>`;
  } catch (e) {
    html = `<div class="notice error" id="cancel-result">${esc(e.message)}</div>`;
  }
  // Kept across the page's redraws of this order.
  state.notice = { id, html };
  const notice = document.getElementById("order-notice");
  if (notice && orderShown === id) notice.innerHTML = html;
}

// ---- dead letters ------------------------------------------------------
async function renderDeadLetters() {
  setNav("dead-letters");
  view.innerHTML = `<h1>Dead letters</h1><p class="muted">Loading…</p>`;
  let d;
  try { d = await getJson("/api/dead-letters"); } catch (e) {
    view.innerHTML = `<h1>Dead letters</h1><div class="notice error">${esc(e.message)}</div>`;
    return;
  }
  const counts = (m) => Object.entries(m).map(([k, n]) => `<tr><td>${esc(k)}</td><td class="n">${num(n)}</td></tr>`).join("") || `<tr><td class="muted">none</td><td></td></tr>`;
  const rows = d.letters.map((l) => `<tr data-seq="${l.sequence}"><td class="n"><a href="#/dead-letters/${l.sequence}">${l.sequence}</a></td><td class="mono">${esc(l.stored_at)}</td>` +
    `<td>${esc(l.kind)}</td><td>${esc(l.service)}</td><td>${l.order ? orderLink(l.order) : `<span class="muted">${esc(l.undecodable)}</span>`}</td>` +
    `<td>${esc(l.step || "")}</td><td class="n">${l.hop ?? ""}</td><td>${esc(l.reason)}</td><td><button class="redrive" data-seq="${l.sequence}">Redrive</button></td></tr>`).join("");
  view.innerHTML = `<h1>Dead letters <span class="muted" id="dlq-total">${num(d.total)}</span></h1><div id="dlq-notice"></div>
  <div class="grid"><section><h2>By reason</h2><table id="by-reason">${counts(d.by_reason)}</table></section>
  <section><h2>By service</h2><table id="by-service">${counts(d.by_service)}</table></section></div>
  <section style="margin-top:16px"><h2>Newest first${d.total > d.letters.length ? ` (${d.letters.length} of ${num(d.total)})` : ""}</h2>
  ${d.letters.length ? `<table id="letters"><thead><tr><th class="n">#</th><th>stored</th><th>reason</th><th>service</th><th>order</th><th>step</th><th class="n">hop</th><th>why</th><th></th></tr></thead><tbody>${rows}</tbody></table>` : `<p class="muted">No dead letters.</p>`}
  </section>`;
  view.querySelectorAll("button.redrive").forEach((b) => { b.onclick = () => redrive(b.dataset.seq, b); });
}

async function redrive(seq, button) {
  if (!confirm(`Send dead letter ${seq} back to its step?`)) return;
  const notice = document.getElementById("dlq-notice");
  if (button) button.disabled = true;
  try {
    const r = await act(`/api/dead-letters/${seq}/redrive`);
    notice.innerHTML = `<div class="notice" id="redrive-result">Dead letter ${seq} went back to its step (hop-stream message ${r.to}).</div>`;
  } catch (e) {
    notice.innerHTML = `<div class="notice error" id="redrive-result">Dead letter ${seq}: ${esc(e.message)}</div>`;
    if (button) button.disabled = false;
  }
}

async function renderDeadLetter(seq) {
  setNav("dead-letters");
  let d;
  try { d = await getJson(`/api/dead-letters/${encodeURIComponent(seq)}`); } catch (e) {
    view.innerHTML = `<h1>Dead letter ${esc(seq)}</h1><div class="notice error">${esc(e.message)}</div>`;
    return;
  }
  const l = d.letter;
  view.innerHTML = `<h1>Dead letter ${l.sequence}</h1><div id="dlq-notice"></div>
  <section><dl class="facts"><dt>stored</dt><dd>${esc(l.stored_at)}</dd><dt>reason</dt><dd>${esc(l.kind)}: ${esc(l.reason)}</dd>
  <dt>service</dt><dd>${esc(l.service)}</dd><dt>order</dt><dd>${l.order ? orderLink(l.order) : esc(l.undecodable)}</dd>
  <dt>step · hop · attempt</dt><dd>${esc(l.step || "")} · ${l.hop ?? ""} · ${l.attempt ?? ""}</dd>${d.failure ? `<dt>failure</dt><dd>${esc(d.failure)}</dd>` : ""}</dl>
  <p><button class="redrive" id="redrive">Redrive to its step</button></p></section>
  <section><h2>Its history</h2>${timeline(d.history || [])}</section>
  <section><h2>Payload</h2>${d.payload !== undefined ? `<pre>${esc(JSON.stringify(d.payload, null, 2))}</pre>` : `<p class="muted">${esc(d.payload_error || "not shown")}</p>`}</section>`;
  document.getElementById("redrive").onclick = (e) => redrive(l.sequence, e.target);
}

// ---- routing -----------------------------------------------------------
function setNav(which) {
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.id === `nav-${which}`);
}

function route() {
  const h = location.hash || "#/";
  orderShown = null;
  let m;
  if ((m = h.match(/^#\/order\/(.+)$/))) renderOrder(decodeURIComponent(m[1]));
  else if ((m = h.match(/^#\/dead-letters\/(\d+)$/))) renderDeadLetter(m[1]);
  else if (h === "#/dead-letters") renderDeadLetters();
  else renderOverview();
}

document.getElementById("find").onsubmit = (e) => {
  e.preventDefault();
  const id = document.getElementById("find-id").value.trim();
  if (id) location.hash = `#/order/${encodeURIComponent(id)}`;
};
window.addEventListener("hashchange", route);

(async function main() {
  try { state.workflows = await getJson("/api/workflows"); } catch { state.workflows = []; }
  try { state.live = await getJson("/api/live"); } catch { /* the stream brings it */ }
  route();
  connect();
})();
