// The runctx inspector's pages: the runs list and a run's page, drawn from the JSON API under /api/
// and kept live by server-sent events. Every value is written with textContent (never as HTML);
// every POST carries the page's CSRF token.
"use strict";

const CSRF = document.body.dataset.csrf;
const PAGE_ROWS = 100;
const HISTORY_PAGE = 2000;

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function post(path, body) {
  const headers = { "X-CSRF-Token": CSRF, ...(body !== undefined && { "Content-Type": "application/json" }) };
  return api(path, { method: "POST", headers, ...(body !== undefined && { body: JSON.stringify(body) }) });
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function shown(value) {
  return value === undefined ? "" : JSON.stringify(value);
}

function live(path, onUpdate) {
  const dot = document.getElementById("live");
  const source = new EventSource(path);
  source.onopen = () => dot.classList.add("on");
  source.onerror = () => dot.classList.remove("on");
  source.onmessage = (event) => onUpdate(JSON.parse(event.data));
  return source;
}

// ---- the runs list ----------------------------------------------------------------------------

function runsPage() {
  const { status, routine } = document.body.dataset;
  const query = new URLSearchParams({ ...(status && { status }), ...(routine && { routine }) });
  live(`/api/events?${query}`, (update) => {
    if (!update.runs) return;
    const body = document.querySelector("#runs tbody");
    body.replaceChildren(...update.runs.map(runRow));
    if (!update.runs.length) {
      const row = el("tr", undefined, "empty");
      const cell = el("td", "no runs");
      cell.colSpan = 6;
      row.append(cell);
      body.append(row);
    }
  });
}

function runRow(run) {
  const row = el("tr");
  row.dataset.run = run.run_id;
  const link = el("a", run.run_id);
  link.href = `/runs/${encodeURIComponent(run.run_id)}`;
  const id = el("td");
  id.append(link);
  const status = el("td");
  status.append(el("span", run.status, `status status-${run.status}`));
  row.append(id, el("td", `${run.routine}@${run.version}`), status, el("td", run.created_at || ""),
    el("td", run.finished_at || ""), el("td", run.steps));
  return row;
}

// ---- a run's page -----------------------------------------------------------------------------

const run = { id: null, entries: [], ids: new Set(), page: 0, loading: false, again: false, status: null, view: 0, step: 0 };
const OVERLAP = 200; // entries read again at each load: one that reached the server late sorts among them

function runPage() {
  run.id = document.body.dataset.run;
  run.status = document.getElementById("run-status").textContent;
  document.getElementById("cancel").addEventListener("click", () => runAction("cancel"));
  document.getElementById("resume").addEventListener("click", () => runAction("resume"));
  document.getElementById("signal-form").addEventListener("submit", sendSignal);
  document.getElementById("prev").addEventListener("click", () => { run.page = Math.max(0, run.page - 1); drawSteps(); });
  document.getElementById("next").addEventListener("click", () => { run.page += 1; drawSteps(); });
  document.getElementById("lanes").addEventListener("change", drawTimeline);
  document.getElementById("now").addEventListener("click", showContexts);
  document.getElementById("timeline").addEventListener("click", timelineClick);
  window.addEventListener("resize", drawTimeline);
  showContexts();
  loadHistory().then(() => live(`/api/runs/${encodeURIComponent(run.id)}/events`, runUpdate));
}

async function loadHistory() {
  if (run.loading) {
    run.again = true; // a change came while loading: load once more after
    return;
  }
  run.loading = true;
  try {
    do {
      run.again = false;
      let offset = Math.max(0, run.entries.length - OVERLAP);
      for (;;) {
        const found = await api(`/api/runs/${encodeURIComponent(run.id)}/history?brief=true&limit=${HISTORY_PAGE}&offset=${offset}`);
        for (const entry of found.entries) {
          if (!run.ids.has(entry.id)) {
            run.ids.add(entry.id);
            run.entries.push(entry);
          }
        }
        offset += found.entries.length;
        if (!found.entries.length || offset >= found.total) break;
      }
      run.entries.sort((a, b) => a.at - b.at || a.context_id.localeCompare(b.context_id) || a.version - b.version);
    } while (run.again);
  } finally {
    run.loading = false;
  }
  document.getElementById("history-count").textContent = `${run.entries.length} entries`;
  drawSteps();
  drawTimeline();
}

function runUpdate(update) {
  if (update.error && !update.status) return;
  const status = document.getElementById("run-status");
  status.textContent = update.status;
  status.className = `status status-${update.status}`;
  document.getElementById("cancel").hidden = !["running", "waiting"].includes(update.status);
  document.getElementById("resume").hidden = !["failed", "cancelled"].includes(update.status);
  document.getElementById("signal-form").hidden = !["running", "waiting"].includes(update.status);
  showWaiting(update.waiting_for || []);
  for (const [name, count] of Object.entries(update.totals || {})) {
    const total = document.querySelector(`[data-total="${name}"] b`);
    if (total) total.textContent = count;
  }
  const error = document.getElementById("run-error");
  error.hidden = !update.error;
  error.textContent = update.error || "";
  if (update.history_total > run.entries.length) loadHistory();
  if (update.status !== run.status && !["running", "waiting"].includes(update.status)) showContexts();
  run.status = update.status;
}

async function runAction(action) {
  const result = document.getElementById("action-result");
  try {
    const done = await post(`/api/runs/${encodeURIComponent(run.id)}/${action}`);
    const ok = action === "cancel" ? done.cancelled : done.resumed;
    result.textContent = ok ? `${action} requested` : `not ${action === "cancel" ? "cancelled" : "resumed"}: ${done.status}`;
  } catch (error) {
    result.textContent = error.message;
  }
}

function showWaiting(waits) {
  document.getElementById("waiting").hidden = !waits.length;
  document.getElementById("waiting-events").replaceChildren(...waits.map((wait) => el("code", wait.event)));
  document.getElementById("waiting-list").replaceChildren(...waits.map((wait) => {
    const option = el("option");
    option.value = wait.event;
    return option;
  }));
  const event = document.getElementById("signal-event");
  if (!event.value && waits.length) event.value = waits[0].event;
}

// A signal's payload may be a secret: it is sent, never shown back (the field is cleared once sent).
async function sendSignal(submitted) {
  submitted.preventDefault();
  const result = document.getElementById("action-result");
  const field = document.getElementById("signal-payload");
  let payload;
  try {
    payload = field.value.trim() ? JSON.parse(field.value) : null;
  } catch (error) {
    result.textContent = "payload: not JSON";
    return;
  }
  const event = document.getElementById("signal-event").value.trim();
  try {
    const done = await post(`/api/runs/${encodeURIComponent(run.id)}/signal`, { event, payload });
    field.value = "{}";
    result.textContent = done.delivered ? `${event} delivered to step ${done.step}` : `${event} kept until a step waits for it`;
  } catch (error) {
    result.textContent = error.message;
  }
}

async function forkFrom(stepId) {
  const result = document.getElementById("action-result");
  try {
    const done = await post(`/api/runs/${encodeURIComponent(run.id)}/fork`, { from_step: stepId });
    const link = el("a", `forked from ${stepId}: run ${done.run_id}`);
    link.href = `/runs/${encodeURIComponent(done.run_id)}`;
    link.id = "forked";
    result.replaceChildren(link);
  } catch (error) {
    result.textContent = error.message;
  }
}

// the history table, newest first, a page at a time

function drawSteps() {
  const pages = Math.max(1, Math.ceil(run.entries.length / PAGE_ROWS));
  run.page = Math.min(run.page, pages - 1);
  const newestFirst = run.entries.length - 1 - run.page * PAGE_ROWS;
  const rows = [];
  for (let i = newestFirst; i > newestFirst - PAGE_ROWS && i >= 0; i -= 1) rows.push(stepRow(run.entries[i], i));
  document.querySelector("#steps tbody").replaceChildren(...rows);
  document.getElementById("page").textContent = `page ${run.page + 1} of ${pages}`;
}

function label(entry) {
  if (entry.kind === "created") return "(created)";
  return entry.step_id || (entry.kind === "edit" ? "(edit)" : "-");
}

function stepRow(entry, index) {
  const row = el("tr", undefined, `kind-${entry.kind} st-${entry.status}`);
  const ms = entry.duration_s === null ? "" : (entry.duration_s * 1000).toFixed(1);
  const version = entry.kind === "event" ? "" : `v${entry.previous}→v${entry.version}`;
  row.append(el("td", index + 1), el("td", label(entry)), el("td", entry.status), el("td", entry.context || "(root)"),
    el("td", entry.worker), el("td", entry.attempt), el("td", ms), el("td", version), el("td", entry.changed ?? ""));
  if (entry.step_id) {
    row.classList.add("clickable");
    row.addEventListener("click", () => showStep(entry.step_id));
  }
  return row;
}

// the step panel: attempts, and what the step changed, before -> after

async function showStep(stepId) {
  const asked = ++run.step; // the last step clicked is shown, whichever answer comes last
  document.getElementById("panel-step").textContent = stepId;
  const panel = document.getElementById("step-panel");
  const detail = await api(`/api/runs/${encodeURIComponent(run.id)}/steps/${stepId.split("/").map(encodeURIComponent).join("/")}`);
  if (asked !== run.step) return;
  const attempts = el("table", undefined, "grid");
  attempts.append(headRow("status", "attempt", "worker", "ms", "note"));
  for (const entry of detail.entries) {
    const ms = entry.duration_s === null ? "" : (entry.duration_s * 1000).toFixed(1);
    const row = el("tr");
    row.append(el("td", entry.status), el("td", entry.attempt), el("td", entry.worker), el("td", ms), el("td", entry.note));
    attempts.append(row);
  }
  const changes = el("table", undefined, "grid changes");
  changes.append(headRow("variable", "before", "after"));
  for (const change of detail.changed) {
    const row = el("tr");
    const after = change.op === "delete" ? "(deleted)" : shown(change.after);
    row.append(el("td", change.name), el("td", change.existed ? shown(change.before) : "(new)"), el("td", after, "after"));
    changes.append(row);
  }
  const travel = el("button", "context just after this step");
  travel.type = "button";
  travel.addEventListener("click", () => showContextAt(stepId));
  const fork = el("button", "fork from this step");
  fork.type = "button";
  fork.id = "fork";
  fork.title = "a new run from this one as it was just before this step";
  fork.addEventListener("click", () => forkFrom(stepId));
  panel.replaceChildren(el("h3", "attempts"), attempts, el("h3", "changed"), changes, travel, fork);
}

function headRow(...names) {
  const row = el("tr");
  row.append(...names.map((name) => el("th", name)));
  return row;
}

// contexts: now (versions in L2 and L3, pending write-behind) or just after a step (time travel)

async function showContexts() {
  const view = ++run.view; // the last one asked for is shown, whichever answer comes last
  document.getElementById("travel-title").textContent = "now";
  const tree = await api(`/api/runs/${encodeURIComponent(run.id)}/contexts`);
  if (view !== run.view) return;
  const box = document.getElementById("context");
  box.replaceChildren(...tree.contexts.map((ctx) => {
    const block = el("div", undefined, "ctx");
    const pending = ctx.pending_write ? " · write-behind pending" : "";
    const l2 = ctx.version_l2 === null ? "not in L2" : `L2 v${ctx.version_l2}`;
    const l3 = ctx.version_l3 === null ? "not in L3" : `L3 v${ctx.version_l3}`;
    block.append(el("h3", `${ctx.path || "(root)"} [${ctx.routine}] ${l2} · ${l3}${pending}`), variablesTable(ctx.variables));
    return block;
  }));
}

async function showContextAt(stepId) {
  const view = ++run.view;
  const at = await api(`/api/runs/${encodeURIComponent(run.id)}/context?at=${encodeURIComponent(stepId)}`);
  if (view !== run.view) return;
  document.getElementById("travel-title").textContent = `${at.context || "(root)"} just after ${stepId} (v${at.version})`;
  const changed = new Map(at.changed.map((change) => [change.name, change]));
  const table = variablesTable({ ...at.variables, ...at.intermediate }, changed);
  table.id = "context-at";
  document.getElementById("context").replaceChildren(table);
}

function variablesTable(variables, changed = new Map()) {
  const table = el("table", undefined, "grid vars");
  table.append(headRow("variable", "value", changed.size ? "before this step" : ""));
  for (const name of Object.keys(variables).sort()) {
    const row = el("tr");
    row.dataset.variable = name;
    const change = changed.get(name);
    const before = change ? (change.existed ? shown(change.before) : "(new)") : "";
    row.append(el("td", name), el("td", shown(variables[name])), el("td", before, change ? "before" : ""));
    if (change) row.classList.add("changed");
    table.append(row);
  }
  return table;
}

// the timeline: a bar per commit (by worker or by context), markers for events

const COLORS = { step: "#3b7dd8", created: "#9aa5b1", edit: "#7a5cc2", retried: "#e08a00", timed_out: "#e08a00",
  failed: "#d33", skipped: "#b0b0b0", rewound: "#a0f", waiting: "#0a8", cancelled: "#777", succeeded: "#2a2" };
const LANE_HEIGHT = 18;

function timelineBars() {
  const byLane = document.getElementById("lanes").value === "context" ? "context" : "worker";
  const bars = [];
  for (const entry of run.entries) {
    const start = entry.duration_s === null ? entry.at : entry.at - entry.duration_s;
    const lane = byLane === "context" ? (entry.context || "(root)") : entry.worker;
    const color = entry.kind === "event" ? (COLORS[entry.status] || "#555") : COLORS[entry.kind] || COLORS.step;
    bars.push({ lane, start, end: entry.at, color, entry, marker: entry.kind === "event" });
  }
  return bars;
}

function drawTimeline() {
  const canvas = document.getElementById("timeline");
  const bars = timelineBars();
  const lanes = [...new Set(bars.map((bar) => bar.lane))];
  const width = canvas.parentElement.clientWidth || 1200;
  canvas.width = width;
  canvas.height = Math.max(40, lanes.length * LANE_HEIGHT + 20);
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (!bars.length) return;
  const t0 = Math.min(...bars.map((bar) => bar.start));
  const t1 = Math.max(...bars.map((bar) => bar.end), t0 + 0.001);
  const left = 160;
  const scale = (width - left - 10) / (t1 - t0);
  canvas.layout = { t0, scale, left, lanes, bars };
  g.font = "11px sans-serif";
  lanes.forEach((lane, i) => {
    g.fillStyle = i % 2 ? "#f6f8fa" : "#fff";
    g.fillRect(0, i * LANE_HEIGHT, width, LANE_HEIGHT);
    g.fillStyle = "#333";
    g.fillText(lane.slice(0, 26), 4, i * LANE_HEIGHT + 13);
  });
  for (const bar of bars) {
    const y = lanes.indexOf(bar.lane) * LANE_HEIGHT;
    const x = left + (bar.start - t0) * scale;
    g.fillStyle = bar.color;
    if (bar.marker) g.fillRect(x - 1, y + 1, 3, LANE_HEIGHT - 2);
    else g.fillRect(x, y + 4, Math.max(1, (bar.end - bar.start) * scale), LANE_HEIGHT - 8);
  }
  g.fillStyle = "#555";
  g.fillText(`${(t1 - t0).toFixed(2)} s`, width - 60, canvas.height - 4);
}

function timelineClick(event) {
  const layout = event.target.layout;
  if (!layout) return;
  const rect = event.target.getBoundingClientRect();
  const lane = layout.lanes[Math.floor((event.clientY - rect.top) / LANE_HEIGHT)];
  const t = layout.t0 + (event.clientX - rect.left - layout.left) / layout.scale;
  let best = null;
  for (const bar of layout.bars) {
    if (bar.lane !== lane || !bar.entry.step_id) continue;
    const distance = t < bar.start ? bar.start - t : t > bar.end ? t - bar.end : 0;
    if (!best || distance < best.distance) best = { distance, bar };
  }
  if (best) showStep(best.bar.entry.step_id);
}

if (document.body.dataset.page === "runs") runsPage();
if (document.body.dataset.page === "run") runPage();
