/*
  Roost's dashboard, one script, no dependencies.

  How it works:
  - Data comes from the admin API (/api/...); live changes from the event stream
    (GET /api/events, server-sent events, read with the browser's EventSource).
    Each event updates what is shown at once; the agent it is about is then
    re-read from the API (debounced), so the actions offered always come from
    the API (an agent's JSON lists the actions its state allows).
  - Connection: the page is "live" while the event stream is open and /healthz
    answers (polled every few seconds). Otherwise it says "disconnected" and every
    agent's state shows as "unknown" with its actions disabled: after Roost dies
    the page must not keep claiming agents run. On reconnect everything is re-read.
  - Charts (inline SVG) are computed from the event stream: the hub's recent
    events at load, then live ones. A wake is a sleeping agent (created, stopped,
    paused) going through "starting" to "running".
  - Views by URL hash: #/ agents, #/agents/NAME one agent, #/jobs, #/jobs/ID.
  - Nothing is inserted as HTML: every value goes in as text.
*/
"use strict";

const ACTIONS = ["start", "wake", "pause", "stop", "restart", "reset"];
const CONFIRM = {
  stop: "Its container gets SIGTERM, then SIGKILL after stop_timeout. Queued messages wait until it starts again.",
  restart: "Its container is replaced by a new one; requests in flight are cut.",
  reset: "Clears its failure and restart count and queues its dead messages again.",
};
const SLEEPING = new Set(["created", "stopped", "paused"]);
const EVENT_KINDS = [
  "agent.state", "agent.failed", "agent.waking", "agent.registered", "agent.deleted",
  "message.status", "job.state", "lease.granted", "lease.released", "lease.expired",
  "lease.renewed", "stream.overflow",
];
const HEALTH_INTERVAL_MS = 4000;
const LOG_REFRESH_MS = 3000;
const EVENT_BACKLOG = 2000;
const CHART_POINTS = 60;
const LOG_LINES = 2000;

const view = document.getElementById("view");
const connection = document.getElementById("connection");
const banner = document.getElementById("banner");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
const confirmDialog = document.getElementById("confirm");

const store = {
  agents: new Map(),
  agentsLoaded: false,
  connected: false,
  lastLive: null,
  lastEventId: 0,
  wakes: [],
  restarts: [],
  starting: new Map(),
  failures: new Map(),
  waking: new Map(),
  jobs: [],
  logFollow: false,
  message: "",
  messageIsError: false,
};
let page = {};
let source = null;
let renderQueued = false;
let logTimer = null;
let logAbort = null;
const pendingFetches = new Map();

// -- helpers -------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const enc = encodeURIComponent;
const shortId = (id) => (id ? String(id).slice(0, 12) : "-");
const dash = (value) => (value === null || value === undefined || value === "" ? "-" : String(value));

function ago(epochSeconds) {
  if (!epochSeconds) return "-";
  const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (seconds < 60) return `${Math.round(seconds)}s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)}h ago`;
  return `${Math.round(seconds / 86400)}d ago`;
}

function when(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toLocaleString() : "-";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.round(seconds / 60)} min`;
}

function describeExit(exit) {
  if (!exit) return "";
  const parts = [];
  if (exit.exit_code !== null && exit.exit_code !== undefined) parts.push(`exit ${exit.exit_code}`);
  if (exit.oom_killed) parts.push("OOM-killed");
  if (exit.error) parts.push(exit.error);
  return parts.join(", ");
}

function badge(state, { known = true, title } = {}) {
  const shown = known ? state : "unknown";
  return h("span", {
    class: `state state-${shown}`,
    "data-state": shown,
    title: known ? title : `last known: ${state} (Roost is not connected)`,
  }, shown);
}

function say(message, isError = false) {
  store.message = message;
  store.messageIsError = isError;
  schedule();
}

// -- the API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() { return sessionStorage.getItem("roost-token") || ""; }

function setToken(value) {
  sessionStorage.setItem("roost-token", value);
  // The event stream takes the token from this cookie (EventSource sends no headers).
  document.cookie = `roost_token=${enc(value)}; path=/api/events; SameSite=Strict`;
}

async function api(method, path, { text = false, signal } = {}) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let response;
  try {
    response = await fetch(path, { method, headers, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    setConnected(false);
    throw new ApiError(0, "Roost does not answer");
  }
  if (response.status === 401) {
    askToken();
    throw new ApiError(401, "the API token is needed");
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    throw new ApiError(response.status, (body && body.error) || `${response.status} ${response.statusText}`);
  }
  if (response.status === 204) return null;
  return text ? response.text() : response.json();
}

function askToken() {
  tokenForm.hidden = false;
  tokenInput.focus();
}

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setToken(tokenInput.value.trim());
  tokenInput.value = "";
  tokenForm.hidden = true;
  connect();
});

// -- connection --------------------------------------------------------------------------

function setConnected(live) {
  if (live) store.lastLive = new Date();
  if (store.connected === live) return;
  store.connected = live;
  schedule();
}

function connect() {
  if (source) source.close();
  source = new EventSource("/api/events");
  source.onopen = () => {
    setConnected(true);
    refreshAll();
  };
  source.onerror = () => setConnected(false);
  for (const kind of EVENT_KINDS) {
    source.addEventListener(kind, (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch (_) { return; }
      onEvent(kind, data);
    });
  }
}

async function watchHealth() {
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    if (!response.ok) throw new Error(String(response.status));
    if (!source || source.readyState === EventSource.CLOSED) connect();
    else if (source.readyState === EventSource.OPEN) setConnected(true);
  } catch (_) {
    setConnected(false);
  }
}

async function refreshAll() {
  await Promise.allSettled([loadAgents(), loadRoute()]);
}

// -- events ------------------------------------------------------------------------------

function onEvent(kind, data) {
  if (data.id && data.id <= store.lastEventId && kind !== "stream.overflow") return;
  if (data.id) store.lastEventId = data.id;
  setConnected(true);
  const name = data.agent;
  switch (kind) {
    case "agent.state": {
      chartEvent(data);
      const agent = store.agents.get(name);
      if (agent) {
        agent.state = data.to;
        agent.restart_count = data.restart_count;
        agent.container_id = data.container_id;
        agent.state_since = data.at;
        agent.actions = null; // re-read: the API says what the new state allows
      }
      if (data.to === "running" || data.to === "failed") store.waking.delete(name);
      fetchAgentSoon(name);
      if (page.kind === "agent" && page.name === name) reloadPageSoon();
      break;
    }
    case "agent.failed":
      store.failures.set(name, data);
      break;
    case "agent.waking":
      store.waking.set(name, data);
      break;
    case "agent.registered":
    case "agent.deleted":
      loadAgents();
      if (page.kind === "agent" && page.name === name) reloadPageSoon();
      break;
    case "message.status":
      fetchAgentSoon(name);
      if (page.kind === "agent" && page.name === name) reloadPageSoon();
      break;
    case "job.state":
      if (page.kind === "jobs" || (page.kind === "job" && page.id === data.job)) reloadPageSoon();
      break;
    case "stream.overflow":
      connect();
      return;
    default:
      if (kind.startsWith("lease.") && page.kind === "agent" && page.name === name) reloadPageSoon();
  }
  schedule();
}

function chartEvent(data) {
  const name = data.agent;
  if (data.to === "starting" && data.from !== "starting") {
    store.starting.set(name, { at: data.at, from: data.from });
  } else if (data.to === "running" && data.from === "starting") {
    const began = store.starting.get(name);
    store.starting.delete(name);
    if (began && SLEEPING.has(began.from)) {
      store.wakes.push({ agent: name, from: began.from, seconds: Math.max(0, data.at - began.at), at: data.at });
      if (store.wakes.length > 5000) store.wakes.splice(0, store.wakes.length - 5000);
    }
  }
  if (data.to === "restarting" || (data.to === "starting" && data.from === "crashed")) {
    store.restarts.push({ agent: name, at: data.at, reason: data.reason });
    if (store.restarts.length > 5000) store.restarts.splice(0, store.restarts.length - 5000);
  }
}

async function loadBacklog() {
  try {
    const data = await api("GET", `/api/events?recent=${EVENT_BACKLOG}`);
    for (const event of data.events) {
      if (event.id <= store.lastEventId) continue;
      if (event.kind === "agent.state") chartEvent(event);
      if (event.kind === "agent.failed") store.failures.set(event.agent, event);
      store.lastEventId = Math.max(store.lastEventId, event.id);
    }
    schedule();
  } catch (_) { /* the charts start empty */ }
}

function fetchAgentSoon(name) {
  if (!name || pendingFetches.has(name)) return;
  pendingFetches.set(name, setTimeout(async () => {
    pendingFetches.delete(name);
    try {
      const agent = await api("GET", `/api/agents/${enc(name)}`);
      store.agents.set(name, agent);
    } catch (error) {
      if (error.status === 404) store.agents.delete(name);
    }
    schedule();
  }, 120));
}

let pageReload = null;
function reloadPageSoon() {
  if (pageReload) return;
  pageReload = setTimeout(() => { pageReload = null; loadRoute(); }, 150);
}

// -- loading -----------------------------------------------------------------------------

async function loadAgents() {
  try {
    const data = await api("GET", "/api/agents");
    store.agents = new Map(data.agents.map((agent) => [agent.name, agent]));
    store.agentsLoaded = true;
  } catch (error) {
    if (error.status !== 401) say(`cannot load agents: ${error.message}`, true);
  }
  schedule();
}

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "agents" && parts[1]) return { kind: "agent", name: parts[1] };
  if (parts[0] === "jobs" && parts[1]) return { kind: "job", id: parts[1] };
  if (parts[0] === "jobs") return { kind: "jobs" };
  return { kind: "agents" };
}

async function loadRoute() {
  const current = page;
  try {
    if (current.kind === "agent") {
      const name = enc(current.name);
      const [detail, messages, leases] = await Promise.all([
        api("GET", `/api/agents/${name}`),
        api("GET", `/api/agents/${name}/messages?limit=20`),
        api("GET", `/api/agents/${name}/leases`),
      ]);
      Object.assign(current, { detail, messages, leases, error: "" });
      store.agents.set(detail.name, detail);
      if (!current.logsStarted) startLogs(current);
    } else if (current.kind === "jobs") {
      current.jobs = (await api("GET", "/api/jobs?limit=200")).jobs;
      current.error = "";
    } else if (current.kind === "job") {
      current.job = await api("GET", `/api/jobs/${enc(current.id)}`);
      current.error = "";
      if (!current.logsStarted) startLogs(current);
    }
  } catch (error) {
    current.error = error.status === 404 ? "not found (deleted?)" : error.message;
  }
  schedule();
}

// -- logs --------------------------------------------------------------------------------

function stopLogs() {
  if (logTimer) clearInterval(logTimer);
  logTimer = null;
  if (logAbort) logAbort.abort();
  logAbort = null;
}

function startLogs(current) {
  current.logsStarted = true;
  current.logText = current.logText || "";
  current.follow = current.follow !== false;
  stopLogs();
  if (current.kind === "agent" && store.logFollow && current.follow) {
    followLogs(current);
    return;
  }
  const refresh = async () => {
    if (page !== current) return;
    if (current.kind === "agent" && !(current.detail && current.detail.container_id)) {
      current.logText = "";
      current.logError = "";
      schedule();
      return; // no container: nothing to read (the page says so)
    }
    const live = current.kind === "agent" || (current.job && current.job.status === "running");
    if (!live && current.logLoaded) return;
    const path = current.kind === "agent"
      ? `/api/agents/${enc(current.name)}/logs?tail=500`
      : `/api/jobs/${enc(current.id)}/logs?tail=500`;
    try {
      current.logText = await api("GET", path, { text: true });
      current.logError = "";
    } catch (error) {
      current.logError = error.message;
    }
    current.logLoaded = true;
    schedule();
  };
  refresh();
  if (current.follow) logTimer = setInterval(refresh, LOG_REFRESH_MS);
}

async function followLogs(current) {
  // The API streams new lines (GET .../logs?follow=true): plain text, appended as it comes.
  logAbort = new AbortController();
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  try {
    const response = await fetch(`/api/agents/${enc(current.name)}/logs?follow=true&tail=200`, {
      headers, signal: logAbort.signal, cache: "no-store",
    });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    current.logText = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const lines = (current.logText + value).split("\n");
      current.logText = lines.slice(-LOG_LINES).join("\n");
      schedule();
    }
  } catch (error) {
    if (error.name !== "AbortError") current.logError = error.message;
    schedule();
  }
}

// -- actions -----------------------------------------------------------------------------

function confirmAction(text) {
  return new Promise((resolve) => {
    document.getElementById("confirm-text").textContent = text;
    confirmDialog.returnValue = "";
    confirmDialog.addEventListener("close", () => resolve(confirmDialog.returnValue === "ok"), { once: true });
    confirmDialog.showModal();
  });
}

async function act(name, action) {
  if (CONFIRM[action] && !(await confirmAction(`${action[0].toUpperCase()}${action.slice(1)} agent ${name}? ${CONFIRM[action]}`))) {
    return;
  }
  const agent = store.agents.get(name);
  if (agent) agent.actions = null;
  say(`${action} ${name}…`);
  try {
    const wait = action === "start" || action === "wake" ? "?wait=false" : "";
    const result = await api("POST", `/api/agents/${enc(name)}/${action}${wait}`);
    store.agents.set(name, result);
    say(`${action} ${name}: ${result.state}`);
  } catch (error) {
    say(`${action} ${name} failed: ${error.message}`, true);
    fetchAgentSoon(name);
  }
  if (page.kind === "agent" && page.name === name) reloadPageSoon();
}

async function cancelJob(id) {
  if (!(await confirmAction(`Cancel job ${id}? A running job gets SIGTERM, then SIGKILL after kill_grace.`))) return;
  say(`cancelling ${id}…`);
  try {
    const job = await api("POST", `/api/jobs/${enc(id)}/cancel`);
    say(`job ${id}: ${job.status}`);
  } catch (error) {
    say(`cancel ${id} failed: ${error.message}`, true);
  }
  reloadPageSoon();
}

function actionButtons(agent) {
  const allowed = new Set(agent.actions || []);
  const live = store.connected && agent.actions;
  const buttons = [];
  for (const action of ACTIONS) {
    if (!allowed.has(action)) continue;
    // start and wake are one request: offer the word that fits the state.
    if (action === "start" && (agent.state === "paused" || agent.state === "idle")) continue;
    if (action === "wake" && !(agent.state === "paused" || agent.state === "idle")) continue;
    buttons.push(h("button", {
      type: "button",
      "data-action": action,
      class: CONFIRM[action] ? "danger" : null,
      disabled: !live,
      onclick: () => act(agent.name, action),
    }, action));
  }
  return h("span", { class: "actions" }, buttons.length ? buttons : h("span", { class: "muted" }, live ? "-" : "…"));
}

// -- charts ------------------------------------------------------------------------------

function barChart(points, { unit, label, emptyText }) {
  if (!points.length) return h("div", { class: "chart-empty" }, emptyText);
  const width = 600;
  const height = 140;
  const top = 14;
  const bottom = 18;
  const max = Math.max(...points.map((p) => p.value), unit === "s" ? 0.001 : 1);
  const step = width / Math.max(points.length, 8);
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": label });
  chart.append(svg("line", { class: "axis", x1: 0, y1: height - bottom, x2: width, y2: height - bottom }));
  points.forEach((point, index) => {
    const barHeight = Math.max(1, ((height - top - bottom) * point.value) / max);
    const bar = svg("rect", {
      class: point.slow ? "bar slow" : "bar",
      x: index * step + 1,
      y: height - bottom - barHeight,
      width: Math.max(1, step - 2),
      height: barHeight,
    }, svg("title", {}, point.title));
    chart.append(bar);
    if (point.label) {
      chart.append(svg("text", { x: index * step + step / 2, y: height - 4, "text-anchor": "middle" }, point.label));
    }
  });
  const maxText = unit === "s" ? duration(max) : `${max}`;
  chart.append(svg("text", { x: 2, y: 10 }, `max ${maxText}`));
  return chart;
}

function wakeChart(agentName) {
  const wakes = store.wakes.filter((w) => !agentName || w.agent === agentName).slice(-CHART_POINTS);
  return barChart(
    wakes.map((w) => ({
      value: w.seconds,
      slow: w.seconds > 5,
      label: agentName || wakes.length > 20 ? "" : w.agent.slice(0, 10),
      title: `${w.agent} from ${w.from}: ${duration(w.seconds)} (${when(w.at)})`,
    })),
    { unit: "s", label: "wake latency", emptyText: "no wakes seen yet" },
  );
}

function restartChart(agentName) {
  if (agentName) {
    // One bar per hour over the last 24 hours.
    const now = Date.now() / 1000;
    const hours = Array.from({ length: 24 }, (_, i) => ({ value: 0, start: now - (24 - i) * 3600 }));
    for (const r of store.restarts) {
      if (r.agent !== agentName || r.at < now - 86400) continue;
      hours[Math.min(23, Math.floor((r.at - (now - 86400)) / 3600))].value += 1;
    }
    if (!hours.some((hour) => hour.value)) return h("div", { class: "chart-empty" }, "no restarts in the last 24 h");
    return barChart(hours.map((hour) => ({ value: hour.value, slow: hour.value > 0, title: `${hour.value} restarts from ${when(hour.start)}` })),
      { unit: "", label: "restarts per hour", emptyText: "" });
  }
  const counts = new Map();
  for (const r of store.restarts) counts.set(r.agent, (counts.get(r.agent) || 0) + 1);
  const points = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 30)
    .map(([name, count]) => ({ value: count, slow: true, label: name.slice(0, 10), title: `${name}: ${count} restarts` }));
  return barChart(points, { unit: "", label: "restarts per agent", emptyText: "no restarts seen" });
}

// -- views -------------------------------------------------------------------------------

function schedule() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function render() {
  connection.dataset.connected = String(store.connected);
  connection.textContent = store.connected ? "live" : "disconnected";
  if (store.connected) {
    banner.hidden = !store.message;
    banner.textContent = store.message;
    banner.className = store.messageIsError ? "banner" : "banner note";
    banner.style.background = store.messageIsError ? "" : "transparent";
  } else {
    banner.hidden = false;
    banner.className = "banner";
    banner.style.background = "";
    const since = store.lastLive ? ` since ${store.lastLive.toLocaleTimeString()}` : "";
    banner.textContent = `Disconnected from Roost${since}: retrying. States are unknown until it answers again.`;
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = (page.kind === "jobs" || page.kind === "job") ? "jobs" : "agents";
    if (link.dataset.nav === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const scroller = view.querySelector("pre.log");
  const atBottom = scroller && scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 4;
  let content;
  if (page.kind === "agent") content = agentView();
  else if (page.kind === "jobs") content = jobsView();
  else if (page.kind === "job") content = jobView();
  else content = agentsView();
  view.replaceChildren(content);
  const log = view.querySelector("pre.log");
  if (log && (atBottom || !scroller)) log.scrollTop = log.scrollHeight;
}

function agentsView() {
  const agents = [...store.agents.values()];
  const counts = new Map();
  for (const agent of agents) counts.set(agent.state, (counts.get(agent.state) || 0) + 1);
  const rows = agents.map((agent) => {
    const waking = store.waking.get(agent.name);
    return h("tr", { "data-agent": agent.name, class: store.connected ? null : "stale" },
      h("td", {}, h("a", { href: `#/agents/${enc(agent.name)}` }, agent.name)),
      h("td", {}, badge(agent.state, { known: store.connected, title: `since ${when(agent.state_since)}` }),
        waking && agent.state === "starting" ? h("div", { class: "note" }, `waking (held ${waking.waited_ms} ms+)`) : null),
      h("td", { class: "num", "data-field": "restarts" }, agent.restart_count),
      h("td", { class: "num", "data-field": "queue" }, dash(agent.pending_messages)),
      h("td", {}, ago(agent.last_activity_at)),
      h("td", {}, describeExit(agent.last_exit) || dash(agent.last_error)),
      h("td", {}, actionButtons(agent)),
    );
  });
  return h("div", {},
    h("h1", {}, "Agents"),
    h("div", { class: "summary" }, [...counts.entries()].map(([state, count]) =>
      h("span", { class: `state state-${store.connected ? state : "unknown"}` }, `${count} ${store.connected ? state : "unknown"}`))),
    h("div", { class: "card wide" },
      agents.length || !store.agentsLoaded
        ? h("table", { id: "agents" },
          h("thead", {}, h("tr", {}, ["Name", "State", "Restarts", "Queue", "Last activity", "Last exit", "Actions"].map((t) => h("th", {}, t)))),
          h("tbody", {}, rows))
        : h("p", { class: "muted" }, "No agents. Add [agents.NAME] to roost.toml or POST /api/agents.")),
    h("div", { class: "grid", style: "margin-top:1rem" },
      h("div", { class: "card", id: "chart-wakes" }, h("h2", {}, "Wake latency (latest wakes)"), wakeChart(null)),
      h("div", { class: "card", id: "chart-restarts" }, h("h2", {}, "Restarts by agent"), restartChart(null))),
  );
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.filter(Boolean).flatMap(([key, value]) => [h("dt", {}, key), h("dd", {}, value)]));
}

function exitBlock(exit, title) {
  return h("div", { class: exit.oom_killed ? "exit oom" : "exit" },
    h("div", {}, h("strong", {}, title), " ", describeExit(exit) || "no details",
      exit.finished_at ? h("span", { class: "muted" }, ` (${exit.finished_at})`) : null),
    exit.log_tail ? h("pre", { class: "log tail" }, exit.log_tail) : null);
}

function agentView() {
  const agent = store.agents.get(page.name) || page.detail;
  if (!agent) {
    return h("div", {}, h("h1", {}, page.name), h("p", { class: page.error ? "error-text" : "muted" }, page.error || "loading…"));
  }
  const detail = page.detail || {};
  const exits = Array.isArray(detail.exits) ? detail.exits : null;
  const failure = store.failures.get(agent.name);
  const exitsCard = h("div", { class: "card", id: "exits" }, h("h2", {}, exits ? "Recent exits" : "Last exit"),
    exits && exits.length ? exits.map((exit, i) => exitBlock(exit, `#${exits.length - i}`)) : null,
    !exits && agent.last_exit ? exitBlock(agent.last_exit, "last") : null,
    failure && failure.log_tail ? exitBlock({ ...failure, error: failure.error }, "gave up:") : null,
    !(exits && exits.length) && !agent.last_exit && !failure ? h("p", { class: "muted" }, "no exit recorded") : null);
  const messages = page.messages;
  const queueCard = h("div", { class: "card", id: "queue" }, h("h2", {}, "Queue"),
    messages ? h("p", {}, h("strong", { "data-field": "pending" }, messages.pending), " pending") : h("p", { class: "muted" }, "…"),
    messages && messages.messages.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Message", "Status", "Tries", "Outcome"].map((t) => h("th", {}, t)))),
      h("tbody", {}, messages.messages.slice().reverse().map((m) => h("tr", {},
        h("td", { class: "mono", title: m.id }, shortId(m.id)),
        h("td", {}, badge(m.status)),
        h("td", { class: "num" }, m.attempts),
        h("td", { class: "mono" }, m.error ? m.error : (m.reply === null || m.reply === undefined ? "-" : JSON.stringify(m.reply).slice(0, 120))))))) : null);
  const leases = page.leases ? page.leases.leases : [];
  const leasesCard = h("div", { class: "card", id: "leases" }, h("h2", {}, "Leases"),
    leases.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Holder", "TTL", "Expires"].map((t) => h("th", {}, t)))),
      h("tbody", {}, leases.map((l) => h("tr", {}, h("td", {}, l.holder || "-"), h("td", { class: "num" }, duration(l.ttl)), h("td", {}, when(l.expires_at))))))
      : h("p", { class: "muted" }, "none held"));
  const history = (detail.history || []).slice().reverse();
  const historyCard = h("div", { class: "card", id: "history" }, h("h2", {}, "History"),
    history.length ? h("table", {}, h("thead", {}, h("tr", {}, ["When", "From", "To", "Why"].map((t) => h("th", {}, t)))),
      h("tbody", {}, history.map((e) => h("tr", {}, h("td", { title: when(e.at) }, ago(e.at)), h("td", {}, e.from), h("td", {}, badge(e.to)), h("td", {}, e.reason)))))
      : h("p", { class: "muted" }, "no changes yet"));
  const config = detail.config || {};
  const configCard = h("div", { class: "card", id: "config" }, h("h2", {}, "Config"),
    Object.keys(config).length
      ? facts(Object.entries(config).sort().map(([key, value]) => [key, h("code", {}, typeof value === "object" ? JSON.stringify(value) : String(value))]))
      : h("p", { class: "muted" }, "…"));
  const logsHint = store.logFollow ? "following the live log" : `the last lines, refreshed every ${LOG_REFRESH_MS / 1000} s`;
  const logsCard = h("div", { class: "card wide", id: "logs" },
    h("div", { class: "toolbar" }, h("h2", { style: "margin:0" }, "Logs"),
      h("label", { class: "note" }, h("input", {
        type: "checkbox", id: "follow", checked: page.follow !== false,
        onchange: (event) => { page.follow = event.target.checked; startLogs(page); },
      }), ` ${logsHint}`)),
    page.logError ? h("p", { class: "note" }, page.logError) : null,
    h("pre", { class: "log" }, page.logText || (agent.container_id ? "…" : "(no container)")));
  return h("div", {},
    h("p", {}, h("a", { href: "#/" }, "← agents")),
    h("h1", {}, agent.name, badge(agent.state, { known: store.connected, title: `since ${when(agent.state_since)}` }), actionButtons(agent)),
    page.error ? h("p", { class: "error-text" }, page.error) : null,
    h("div", { class: "grid" },
      h("div", { class: "card", id: "facts" }, h("h2", {}, "Agent"), facts([
        ["container", h("span", { class: "mono", title: agent.container_id || "" }, shortId(agent.container_id))],
        ["url", dash(agent.url)],
        ["image", dash(agent.image)],
        ["restarts", String(agent.restart_count)],
        ["state since", `${ago(agent.state_since)} (${when(agent.state_since)})`],
        ["last activity", ago(agent.last_activity_at)],
        agent.last_error ? ["last error", agent.last_error] : null,
        agent.agent_id ? ["agent id", agent.agent_id] : null,
        agent.capabilities && agent.capabilities.length ? ["capabilities", agent.capabilities.join(", ")] : null,
        ["config hash", h("span", { class: "mono", title: agent.config_hash }, shortId(agent.config_hash))],
      ])),
      exitsCard, queueCard, leasesCard,
      h("div", { class: "card", id: "agent-chart-wakes" }, h("h2", {}, "Wake latency"), wakeChart(agent.name)),
      h("div", { class: "card", id: "agent-chart-restarts" }, h("h2", {}, "Restarts (24 h)"), restartChart(agent.name)),
      logsCard, historyCard, configCard),
  );
}

function jobRow(job) {
  const cancellable = job.status === "queued" || job.status === "running";
  return h("tr", { "data-job": job.id },
    h("td", { class: "mono" }, h("a", { href: `#/jobs/${enc(job.id)}` }, job.id)),
    h("td", {}, badge(job.status)),
    h("td", { class: "mono" }, job.image),
    h("td", { class: "mono" }, job.command ? job.command.join(" ") : "-"),
    h("td", {}, ago(job.created_at)),
    h("td", { class: "num" }, duration(job.duration)),
    h("td", { class: "num" }, dash(job.exit_code)),
    h("td", {}, cancellable ? h("button", { type: "button", class: "danger", "data-action": "cancel", disabled: !store.connected, onclick: () => cancelJob(job.id) }, "cancel") : null),
  );
}

function jobTable(title, id, jobs) {
  return h("div", { class: "card wide", id }, h("h2", {}, `${title} (${jobs.length})`),
    jobs.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Job", "Status", "Image", "Command", "Created", "Took", "Exit", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, jobs.map(jobRow)))
      : h("p", { class: "muted" }, "none"));
}

function jobsView() {
  const jobs = page.jobs || [];
  return h("div", {},
    h("h1", {}, "Jobs"),
    page.error ? h("p", { class: "error-text" }, page.error) : null,
    jobTable("Running", "jobs-running", jobs.filter((j) => j.status === "running")),
    h("div", { style: "height:1rem" }),
    jobTable("Queued", "jobs-queued", jobs.filter((j) => j.status === "queued")),
    h("div", { style: "height:1rem" }),
    jobTable("Finished", "jobs-finished", jobs.filter((j) => j.status !== "running" && j.status !== "queued")),
  );
}

function jobView() {
  const job = page.job;
  if (!job) return h("div", {}, h("h1", {}, page.id), h("p", { class: page.error ? "error-text" : "muted" }, page.error || "loading…"));
  const cancellable = job.status === "queued" || job.status === "running";
  return h("div", {},
    h("p", {}, h("a", { href: "#/jobs" }, "← jobs")),
    h("h1", {}, h("span", { class: "mono" }, job.id), badge(job.status),
      cancellable ? h("button", { type: "button", class: "danger", "data-action": "cancel", disabled: !store.connected, onclick: () => cancelJob(job.id) }, "cancel") : null),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "Job"), facts([
        ["image", job.image],
        ["command", job.command ? job.command.join(" ") : "(the image's)"],
        ["project", dash(job.project)],
        ["created", when(job.created_at)],
        ["started", when(job.started_at)],
        ["finished", when(job.finished_at)],
        ["took", duration(job.duration)],
        ["timeout", duration(job.timeout)],
        ["exit", describeExit(job) || "-"],
        ["snapshot", job.snapshot_key ? `${job.snapshot_key}${job.snapshot_used ? " (used)" : ""}` : "-"],
        ["env", job.env_names.length ? job.env_names.join(", ") : "-"],
      ]))),
    h("div", { class: "card wide", id: "logs" }, h("h2", {}, job.status === "running" ? "Logs (live)" : "Logs"),
      page.logError ? h("p", { class: "note" }, page.logError) : null,
      h("pre", { class: "log" }, page.logText || "…")),
  );
}

// -- start -------------------------------------------------------------------------------

function onRoute() {
  stopLogs();
  page = route();
  store.message = "";
  schedule();
  loadRoute();
}

async function detectLogFollow() {
  try {
    const schema = await (await fetch("/openapi.json", { cache: "no-store" })).json();
    const operation = schema.paths["/api/agents/{name}/logs"].get;
    store.logFollow = (operation.parameters || []).some((p) => p.name === "follow");
  } catch (_) {
    store.logFollow = false;
  }
}

window.addEventListener("hashchange", onRoute);
setInterval(watchHealth, HEALTH_INTERVAL_MS);
setInterval(schedule, 15000); // keep the "… ago" times fresh
detectLogFollow().then(() => {
  onRoute();
  loadAgents();
  loadBacklog();
  connect();
});
