// kiri dashboard: reads the hub's JSON API and follows its change feed (/api/v1/events).
// Everything it shows comes from /api/v1; every button is one POST there. No build step,
// no CDN: uPlot is served by the hub. Text from the hub is always set as text, never as HTML.
"use strict";

const state = {
  token: localStorage.getItem("kiri.token") || "",
  range: 86400,          // seconds back from now, or null for all
  zoom: {},              // atom -> {since, until} after a drag
  charts: {},            // atom -> {u, ids, fields, key}
  series: {},            // atom -> last series reply
  host: {},              // atom -> the host its chart shows ("" = readings without a host); absent: all
  status: null,
  running: new Map(),    // task id -> <progress>
  timers: {},
  lastRun: {},
  asking: false,
};

const PALETTE = ["#8b949e", "#a371f7", "#3fb950", "#d29922", "#db61a2", "#39c5cf", "#f0883e", "#79c0ff"];

// --- small helpers -----------------------------------------------------------------

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

const $ = (sel) => document.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fmt = (x, d = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

function ago(t) {
  if (!t) return "–";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function when(t) {
  return t ? new Date(t * 1000).toLocaleString() : "–";
}

function toast(msg, bad) {
  const t = $("#toast");
  t.textContent = msg;
  t.style.color = bad ? "var(--bad)" : "";
  t.classList.add("show");
  clearTimeout(state.timers.toast);
  state.timers.toast = setTimeout(() => t.classList.remove("show"), 3500);
}

async function api(path, opts = {}) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let body;
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.body);
  }
  const r = await fetch(path, { method: opts.method || "GET", headers, body });
  if (r.status === 401) {
    askToken();
    throw new Error("this hub needs its token");
  }
  const ctype = r.headers.get("content-type") || "";
  const data = ctype.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error((data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return data;
}

function askToken() {
  if (state.asking) return;
  state.asking = true;
  const dlg = $("#tokendlg");
  $("#tokenerr").textContent = state.token ? "That token was refused." : "";
  dlg.showModal();
}

// Run fn soon, coalescing bursts, and not more often than every `gap` ms.
function schedule(name, fn, gap = 300) {
  if (state.timers[name]) return;
  const wait = Math.max(50, (state.lastRun[name] || 0) + gap - Date.now());
  state.timers[name] = setTimeout(async () => {
    state.timers[name] = null;
    state.lastRun[name] = Date.now();
    try { await fn(); } catch (e) { console.warn(name, e); }
  }, wait);
}

// --- atoms: heads and charts -------------------------------------------------------

function atomPanel(name) {
  let panel = document.querySelector(`[data-atom="${CSS.escape(name)}"]`);
  if (panel) return panel;
  panel = el("div", { class: "atom", "data-atom": name },
    el("div", { class: "atom-head" },
      el("span", { class: "name", text: name }),
      el("span", { class: "verdict" }),
      el("span", { class: "tokens" }),
      el("span", { class: "score muted" }),
      el("span", { class: "seen muted" }),
      el("span", { class: "wv muted" }),
      el("span", { class: "hosts muted" }),
      el("select", { class: "host-pick", "data-host-pick": name, title: "whose readings the chart shows",
                     onchange: (e) => { pickHost(name, e.target.value); } },
        el("option", { value: "*", text: "all hosts" })),
      el("button", { "data-retrain": name, onclick: () => retrain(name) }, "Retrain"),
      el("button", { class: "unzoom", hidden: true, onclick: () => { delete state.zoom[name]; loadSeries(name); } },
        "Reset zoom")),
    el("div", { class: "chart", "data-testid": `chart-${name}` }));
  $("#atoms").append(panel);
  return panel;
}

function renderAtoms(st) {
  for (const a of st.atoms) {
    const p = atomPanel(a.name);
    const l = a.latest;
    const v = p.querySelector(".verdict");
    v.className = `verdict ${l ? l.verdict : "unscored"}`;
    v.textContent = !l ? "no data"
      : a.learning ? `learning ${a.learning.host}: ${a.learning.training ? "training" : `${a.learning.have}/${a.learning.need}`}`
      : l.verdict;
    v.title = a.learning ? "these weights have not seen this host yet: scored, never alerted on, "
      + "until it is trained on its own data" : "";
    p.querySelector(".tokens").textContent = l ? l.tokens.join(" ") : "";
    p.querySelector(".score").textContent = l && l.score !== null ? `score ${fmt(l.score)} / ${fmt(l.threshold)}`
      + (l.tail_p !== null && l.tail_p !== undefined ? ` · p ${l.tail_p.toExponential(1)}` : "") : "";
    p.querySelector(".seen").textContent = l ? ago(l.time) : "";
    const judged = a.weights && a.weights.judged_anomalous !== null && a.weights.judged_anomalous !== undefined
      ? ` · ${(100 * a.weights.judged_anomalous).toFixed(1)}% of its training data judged anomalous` : "";
    p.querySelector(".wv").textContent = a.weights ? `weights v${a.weights.version}${judged}` : "untrained";
    // one verdict per stream: the atom's latest reading from each host
    const hosts = (a.hosts || []).filter((h) => h.host !== null);
    p.querySelector(".hosts").textContent = hosts.length
      ? "hosts: " + hosts.map((h) => `${h.host} ${h.verdict}`).join(" · ") : "";
    p.querySelector(".unzoom").hidden = !state.zoom[a.name];
    fillHostPicker(p.querySelector(".host-pick"), a.hosts || [], a.name);
  }
}

// The chart's host picker: all hosts (each bucket's band spans them all) or one host's stream.
function fillHostPicker(sel, hosts, name) {
  const want = ["*", ...hosts.map((h) => (h.host === null ? "" : h.host))];
  const have = [...sel.options].map((o) => o.value);
  if (want.join("\u0000") !== have.join("\u0000")) {
    sel.textContent = "";
    for (const v of want) sel.append(el("option", { value: v, text: v === "*" ? "all hosts" : v || "(no host)" }));
  }
  sel.value = name in state.host ? state.host[name] : "*";
  sel.hidden = hosts.length < 2 && !(name in state.host);
}

function pickHost(name, value) {
  if (value === "*") delete state.host[name];
  else state.host[name] = value;
  loadSeries(name).catch((e) => toast(e.message, true));
}

function seriesRange(name) {
  const z = state.zoom[name];
  if (z) return z;
  if (state.range === null) return { since: null, until: null };
  return { since: Date.now() / 1000 - state.range, until: null };
}

async function loadSeries(name) {
  const panel = atomPanel(name);
  const box = panel.querySelector(".chart");
  const r = seriesRange(name);
  const width = Math.max(300, box.clientWidth || 800);
  const q = new URLSearchParams({ atom: name, points: String(Math.min(5000, Math.max(100, Math.round(width)))) });
  if (r.since !== null && r.since !== undefined) q.set("since", String(r.since));
  if (r.until !== null && r.until !== undefined) q.set("until", String(r.until));
  if (name in state.host) q.set("host", state.host[name]);
  const s = await api(`/api/v1/series?${q}`);
  state.series[name] = s;
  panel.querySelector(".unzoom").hidden = !state.zoom[name];
  drawChart(name, box, s, width);
}

function drawChart(name, box, s, width) {
  const scale = (f) => (v) => (v === null ? null : (100 * (v - f.low)) / (f.high - f.low));
  const pct = s.fields.map((f) => s.values[f.name].map(scale(f)));
  // each field's min..max per bucket, drawn as a band behind its mean: a zoomed-out chart
  // shows how far readings went, not only their average
  const bands = s.fields.map((f) => ({ lo: (s.min || s.values)[f.name].map(scale(f)),
                                       hi: (s.max || s.values)[f.name].map(scale(f)) }));
  const anomalies = s.score.map((v, i) => (s.anomalous[i] ? v : null));
  const tail = (s.tail_p || s.t.map(() => null)).map((p) => (p === null ? null : Math.max(p, 1e-9)));
  const data = [s.t, s.score, s.threshold, anomalies, tail, ...pct];
  const key = s.fields.map((f) => f.name).join(",");
  let c = state.charts[name];
  if (c && c.key === key) {
    c.ids = s.id;
    c.bands = bands;
    c.u.setData(data);
    return;
  }
  if (c) c.u.destroy();
  box.textContent = "";
  const opts = {
    width, height: 210,
    scales: { x: { time: true }, s: { auto: true }, pct: { range: [0, 100] }, p: { distr: 3, range: [1e-9, 1] } },
    axes: [
      { stroke: "#7d8896", grid: { stroke: "#262c35" }, ticks: { stroke: "#262c35" } },
      { scale: "s", stroke: "#7d8896", grid: { stroke: "#262c35" }, label: "surprise (nats)", size: 50 },
      { scale: "pct", side: 1, stroke: "#7d8896", grid: { show: false }, label: "% of range", size: 50 },
    ],
    series: [
      { value: (u, v) => (v === null ? "–" : new Date(v * 1000).toLocaleString()) },
      { label: "score", scale: "s", stroke: "#58a6ff", width: 1.5 },
      { label: "threshold", scale: "s", stroke: "#f85149", dash: [6, 4], width: 1 },
      { label: "anomaly", scale: "s", stroke: "#f85149", fill: "#f85149", width: 0, paths: () => null,
        points: { show: true, size: 9, fill: "#f85149", stroke: "#f85149" } },
      { label: "tail p", scale: "p", stroke: "#d29922", width: 1, show: false,
        value: (u, v) => (v === null ? "–" : v.toExponential(1)) },
      ...s.fields.map((f, i) => ({ label: f.name, scale: "pct", stroke: PALETTE[i % PALETTE.length] + "99", width: 1,
                                   value: (u, v, si, idx) => fieldValue(name, f.name, idx) })),
    ],
    cursor: { drag: { x: true, y: false, setScale: false } },
    hooks: {
      drawAxes: [(u) => { state.charts[name].drawn = drawBands(u, state.charts[name].bands, s.fields.length); }],
      setSelect: [(u) => {
        if (u.select.width > 4) {
          const a = u.posToVal(u.select.left, "x");
          const b = u.posToVal(u.select.left + u.select.width, "x");
          state.zoom[name] = { since: a, until: b };
          u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
          loadSeries(name).catch((e) => toast(e.message, true));
        }
      }],
    },
  };
  c = state.charts[name] = { u: null, ids: s.id, key, bands, drawn: 0 };
  const u = new uPlot(opts, data, box);
  c.u = u;
  let down = null;
  u.over.addEventListener("mousedown", (e) => { down = [e.clientX, e.clientY]; });
  u.over.addEventListener("mouseup", (e) => {
    if (down && Math.abs(e.clientX - down[0]) < 3 && Math.abs(e.clientY - down[1]) < 3) {
      const idx = pick(u, e.clientX - u.over.getBoundingClientRect().left);
      if (idx !== null && c.ids[idx] !== undefined) showBlame(c.ids[idx]).catch((err) => toast(err.message, true));
    }
    down = null;
  });
  u.over.addEventListener("dblclick", () => { delete state.zoom[name]; loadSeries(name); });
}

// Fill each visible field's min..max band (where a bucket holds more than one reading).
function drawBands(u, bands, nFields) {
  if (!bands) return 0;
  const ctx = u.ctx, xs = u.data[0];
  let drawn = 0;
  for (let j = 0; j < nFields; j++) {
    const series = u.series[5 + j];
    if (!series || !series.show) continue;
    const { lo, hi } = bands[j];
    ctx.save();
    ctx.fillStyle = PALETTE[j % PALETTE.length] + "33";
    const x = (i) => u.valToPos(xs[i], "x", true);
    let start = -1;
    for (let i = 0; i <= xs.length; i++) {
      const ok = i < xs.length && lo[i] !== null && hi[i] !== null && hi[i] > lo[i];
      if (ok && start < 0) start = i;
      if (ok || start < 0) continue;
      ctx.beginPath();  // a run start..i-1: along the minima, back along the maxima
      for (let k = start; k < i; k++) ctx.lineTo(x(k), u.valToPos(lo[k], "pct", true));
      for (let k = i - 1; k >= start; k--) ctx.lineTo(x(k), u.valToPos(hi[k], "pct", true));
      ctx.closePath();
      ctx.fill();
      drawn++;
      start = -1;
    }
    ctx.restore();
  }
  return drawn;
}

// The point a click means: the highest score within a few pixels, so a spike is easy to hit.
function pick(u, left) {
  const t = u.data[0], s = u.data[1];
  if (!t.length) return null;
  const lo = u.posToVal(left - 5, "x"), hi = u.posToVal(left + 5, "x");
  let best = null;
  for (let i = 0; i < t.length; i++) {
    if (t[i] < lo || t[i] > hi) continue;
    if (best === null || (s[i] ?? -1) > (s[best] ?? -1)) best = i;
  }
  return best === null ? u.cursor.idx ?? null : best;
}

function fieldValue(atom, field, idx) {
  const s = state.series[atom];
  if (!s || idx === null || idx === undefined) return "–";
  const v = s.values[field][idx];
  if (v === null) return "–";
  const lo = s.min ? s.min[field][idx] : v, hi = s.max ? s.max[field][idx] : v;
  return lo !== null && hi !== null && hi > lo ? `${fmt(v, 2)} (${fmt(lo, 2)}–${fmt(hi, 2)})` : fmt(v, 2);
}

async function showBlame(obsId) {
  const { observation: o } = await api(`/api/v1/observations/${obsId}`);
  const sec = $("#blame-section");
  sec.hidden = false;
  $("#blame-title").textContent =
    `${o.atom} #${o.id} · ${when(o.time)} · score ${fmt(o.score)} / ${fmt(o.threshold)}`
    + (o.tail_p !== null && o.tail_p !== undefined ? ` · tail p ${o.tail_p.toExponential(1)}` : "") + ` · ${o.verdict}`;
  const box = $("#blame");
  box.textContent = "";
  const max = Math.max(1, ...o.blame.map((b) => b.surprise));
  if (!o.blame.length) box.append(el("p", { class: "muted", text: `tokens ${o.tokens.join(" ")} (not scored yet)` }));
  for (const b of o.blame) {
    box.append(el("div", { class: "blame-row", "data-token": b.token },
      el("span", { class: "tokens", text: b.token }),
      el("div", { class: `bar${o.threshold !== null && b.surprise > o.threshold ? " hot" : ""}`,
                  style: `width:${(100 * b.surprise) / max}%` }),
      el("span", { class: "muted", text: `${fmt(b.surprise)} nats · p=${fmt(b.probability, 3)}` })));
  }
}

// --- queue, agents, decisions, weights ---------------------------------------------

function renderQueue(st) {
  const box = $("#queue-counts");
  box.textContent = "";
  for (const s of ["queued", "leased", "done", "dead", "cancelled"]) {
    box.append(el("span", { class: "count", "data-state": s }, el("b", { text: st.queue.by_state[s] || 0 }), s));
  }
  const r = st.retention;
  if (r && r.finished_tasks_seconds !== undefined) {
    const span = (k) => (k === null ? "forever" : k >= 86400 ? `${k / 86400} days` : `${k / 3600} hours`);
    let text = `finished tasks kept ${span(r.finished_tasks_seconds)}`;
    if (r.raw_seconds !== undefined) text += ` · raw readings ${span(r.raw_seconds)}, then rollups`;
    box.append(el("span", { class: "muted", "data-testid": "retention", text,
                            title: "older readings are folded into 5-minute, hourly and daily rollups, kept forever" }));
  }
}

async function loadRunning() {
  const { tasks } = await api("/api/v1/tasks?status=leased&limit=50");
  const body = $("#running tbody");
  body.textContent = "";
  state.running.clear();
  for (const t of tasks) {
    const p = t.progress || {};
    const bar = el("progress", { "data-task-progress": t.id, max: p.steps || 1, value: p.step || 0 });
    const label = el("span", { class: "muted" });
    state.running.set(t.id, { bar, label });
    setProgress(t.id, p);
    body.append(el("tr", { "data-task": t.id },
      el("td", { text: `#${t.id} ${t.kind}${t.atom ? " " + t.atom : ""}` }),
      el("td", { text: t.lease_owner || "" }),
      el("td", {}, bar, " ", label),
      el("td", {}, el("button", { onclick: () => act(`/api/v1/tasks/${t.id}/cancel`, `cancel requested for #${t.id}`) },
        "Cancel"))));
  }
  if (!tasks.length) body.append(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "nothing running" })));
}

function setProgress(taskId, p) {
  const r = state.running.get(taskId);
  if (!r) return false;
  if (p.steps) r.bar.max = p.steps;
  if (p.step !== undefined) r.bar.value = p.step;
  const parts = [];
  if (p.step !== undefined) parts.push(p.steps ? `${p.step}/${p.steps}` : `${p.step}`);
  if (p.loss !== undefined) parts.push(`loss ${fmt(p.loss, 3)}`);
  r.label.textContent = parts.join(" · ");
  return true;
}

async function loadDead() {
  const { tasks } = await api("/api/v1/tasks?status=dead&limit=20");
  const body = $("#dead tbody");
  body.textContent = "";
  for (const t of tasks) {
    body.append(el("tr", { "data-task": t.id },
      el("td", { text: `#${t.id} ${t.kind}${t.atom ? " " + t.atom : ""}` }),
      el("td", { class: "err", text: t.error || "" }),
      el("td", {}, el("button", { "data-retry": t.id, onclick: () => act(`/api/v1/tasks/${t.id}/retry`, `#${t.id} queued again`) },
        "Retry"))));
  }
  if (!tasks.length) body.append(el("tr", {}, el("td", { colspan: 3, class: "muted", text: "no dead tasks" })));
}

function renderAgents(st) {
  const body = $("#agents tbody");
  body.textContent = "";
  for (const a of st.agents) {
    const work = a.tasks.map((t) => `#${t.id} ${t.kind}${t.atom ? " " + t.atom : ""}`).join(", ");
    body.append(el("tr", { "data-agent": a.name },
      el("td", {}, el("span", { class: `dot ${a.health}`, title: a.health })),
      el("td", { text: a.name }), el("td", { text: a.role }), el("td", { text: a.host || "" }),
      el("td", { class: "muted", text: a.connected ? ago(a.last_seen) : `gone ${ago(a.last_seen)}` }),
      el("td", { text: work || "idle" })));
  }
  if (!st.agents.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "no agents yet" })));
}

async function loadDecisions() {
  const { decisions } = await api("/api/v1/decisions?limit=25");
  const body = $("#decisions tbody");
  body.textContent = "";
  for (const d of decisions) {
    const label = d.label ? `${d.label.verdict} → ${d.label.action}` : "";
    body.append(el("tr", { "data-decision-row": d.id },
      el("td", { text: d.id }), el("td", { class: "muted", text: ago(d.created_at) }), el("td", { text: d.atom }),
      el("td", { class: `action-${d.action}`, text: d.action }), el("td", { class: "muted", text: d.policy }),
      el("td", { text: d.alert || "", class: ["failed", "partial"].includes(d.alert) ? "error" : "",
                 title: d.alert === "partial" ? "some alert sinks failed" : d.alert === "failed" ? "every alert sink failed" : "" }),
      el("td", { class: "label", text: label }),
      el("td", {},
        el("button", { "data-feedback": "approve", "data-decision": d.id, title: "the nerve was right",
                       onclick: () => feedback(d.id, "approve") }, "Approve"), " ",
        el("button", { "data-feedback": "dismiss", "data-decision": d.id, title: "the nerve was wrong",
                       onclick: () => feedback(d.id, "dismiss") }, "Dismiss"))));
  }
  if (!decisions.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted", text: "no decisions yet" })));
}

let shownWeights = null; // the list the table was last drawn from

async function loadWeights() {
  const { weights } = await api("/api/v1/weights?limit=60");
  // redrawn only when the list changed: a redraw between a press and its release on a
  // button loses the click, and a reconnect or another atom's news reloads this list often
  const drawn = JSON.stringify(weights);
  if (drawn === shownWeights) {
    for (const td of document.querySelectorAll("#weights td[data-created]")) td.textContent = ago(Number(td.dataset.created));
    return;
  }
  shownWeights = drawn;
  const byId = new Map(weights.map((w) => [w.id, w]));
  const active = new Map(weights.filter((w) => w.status === "active").map((w) => [w.atom, w.version]));
  const body = $("#weights tbody");
  body.textContent = "";
  for (const w of weights) {
    const parent = w.parent_id ? byId.get(w.parent_id) : null;
    const cur = active.get(w.atom);
    const verb = cur !== undefined && w.version < cur ? "Roll back" : "Activate";
    body.append(el("tr", { "data-weights": `${w.atom}:${w.version}` },
      el("td", { text: w.atom }), el("td", { text: `v${w.version}` }), el("td", { text: w.status }),
      el("td", { class: "muted", text: parent ? `v${parent.version}` : w.parent_id ? `#${w.parent_id}` : "scratch" }),
      el("td", { class: "muted", "data-created": w.created_at, text: ago(w.created_at) }),
      el("td", { text: fmt(w.loss, 3) }),
      el("td", { text: fmt(w.info && w.info.threshold) }), el("td", { class: "muted", text: w.reason || "" }),
      el("td", {}, w.status === "active" ? "" : el("button", {
        "data-activate": `${w.atom}:${w.version}`,
        onclick: () => act(`/api/v1/weights/${encodeURIComponent(w.atom)}/${w.version}/activate`,
                           `${w.atom} v${w.version} is active`),
      }, verb))));
  }
  if (!weights.length) body.append(el("tr", {}, el("td", { colspan: 9, class: "muted", text: "nothing trained yet" })));
}

// --- actions -----------------------------------------------------------------------

async function act(path, done, body = {}) {
  try {
    const r = await api(path, { method: "POST", body });
    toast(done);
    return r;
  } catch (e) {
    toast(e.message, true);
    return null;
  }
}

async function retrain(atom) {
  const r = await act(`/api/v1/atoms/${encodeURIComponent(atom)}/retrain`, `training ${atom}`);
  if (r) toast(r.deduplicated ? `${atom} already has training queued (#${r.task_id})` : `training ${atom}: task #${r.task_id}`);
  schedule("running", loadRunning, 0);
}

async function feedback(id, verdict) {
  const r = await act("/api/v1/feedback", `decision ${id}: ${verdict}`, { decision_id: id, verdict });
  if (r) schedule("decisions", loadDecisions, 0);
}

// --- loading and live updates ------------------------------------------------------

async function loadStatus() {
  const st = await api("/api/v1/status");
  state.status = st;
  renderAtoms(st);
  renderQueue(st);
  renderAgents(st);
  return st;
}

async function loadAllSeries() {
  const st = state.status || (await loadStatus());
  await Promise.all(st.atoms.map((a) => loadSeries(a.name).catch((e) => console.warn(a.name, e))));
}

async function refreshAll() {
  await loadStatus();
  await Promise.all([loadAllSeries(), loadRunning(), loadDead(), loadDecisions(), loadWeights()]);
}

function onChanged(topics) {
  const all = topics.includes("all");
  const has = (t) => all || topics.includes(t);
  if (has("tasks") || has("agents") || has("observations") || has("scores") || has("weights") || has("decisions")) {
    schedule("status", loadStatus, 500);
  }
  if (has("tasks")) { schedule("running", loadRunning, 500); schedule("dead", loadDead, 1000); }
  if (has("scores") || has("observations")) schedule("series", loadAllSeries, 3000);
  if (has("decisions")) schedule("decisions", loadDecisions, 1000);
  if (has("weights")) schedule("weights", loadWeights, 1000);
}

function onProgress(taskId, progress) {
  if (!setProgress(taskId, progress)) schedule("running", loadRunning, 500);
}

function setLive(on) {
  const l = $("#live");
  l.className = `pill ${on ? "on" : "off"}`;
  l.textContent = on ? "live" : "reconnecting…";
}

function handleFrame(frame) {
  let ev = "message";
  let data = "";
  for (const line of frame.split("\n")) {
    if (line.startsWith("event: ")) ev = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  const d = JSON.parse(data);
  if (ev === "changed") onChanged(d.topics);
  else if (ev === "progress") onProgress(d.task_id, d.progress);
}

// EventSource cannot send a token, so the feed is read with fetch.
async function listen() {
  for (;;) {
    try {
      const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
      const r = await fetch("/api/v1/events", { headers });
      if (r.status === 401) { askToken(); await sleep(3000); continue; }
      if (!r.ok || !r.body) throw new Error(`events: ${r.status}`);
      setLive(true);
      refreshAll().catch((e) => toast(e.message, true));
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          handleFrame(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
    } catch (e) {
      console.warn("event feed", e);
    }
    setLive(false);
    await sleep(2000);
  }
}

async function hubInfo() {
  try {
    const h = await api("/healthz");
    $("#hubinfo").textContent = `hub ${h.version}`;
  } catch (e) {
    $("#hubinfo").textContent = "hub unreachable";
  }
}

function init() {
  for (const b of document.querySelectorAll("#ranges button")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll("#ranges button")) o.classList.toggle("on", o === b);
      state.range = b.dataset.range === "all" ? null : Number(b.dataset.range);
      state.zoom = {};
      loadAllSeries();
    });
  }
  $("#tokenform").addEventListener("submit", () => {
    state.token = $("#tokeninput").value.trim();
    localStorage.setItem("kiri.token", state.token);
    state.asking = false;
    refreshAll().catch((e) => toast(e.message, true));
  });
  window.addEventListener("resize", () => {
    for (const [name, c] of Object.entries(state.charts)) {
      const box = atomPanel(name).querySelector(".chart");
      c.u.setSize({ width: Math.max(300, box.clientWidth), height: 210 });
    }
  });
  setInterval(() => { if (state.status) renderAgents(state.status); }, 15000);
  hubInfo();
  listen();
}

document.addEventListener("DOMContentLoaded", init);
