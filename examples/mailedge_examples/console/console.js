// The mailedge console: plain DOM, no framework, nothing loaded from elsewhere.
"use strict";

const MAX_ROWS = 500; // as many as the server's ring keeps
const REFRESH_MS = 3000; // listeners' counts and the ban list
const csrf = document.querySelector('meta[name="csrf-token"]').content;
let state = null;

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: body === undefined ? "" : JSON.stringify(body),
  });
  let value = null;
  try { value = await response.json(); } catch (e) { value = null; }
  return { status: response.status, value };
}

function showListeners() {
  const body = document.querySelector("#listeners tbody");
  body.replaceChildren();
  for (const l of state.listeners) {
    const row = body.insertRow();
    row.dataset.listener = l.name;
    cell(row, l.name);
    cell(row, l.protocol);
    cell(row, l.addresses.join(" "));
    cell(row, l.tls ? "yes" : "no");
    cell(row, l.proxy ? "on" : "off", "proxy");
    cell(row, l.trusted.join(", ") || "[]", "trusted");
    cell(row, l.trusted_from, "from");
    cell(row, l.header_mode);
    cell(row, `header ${l.header_timeout}s, idle ${l.idle_timeout}s`);
    cell(row, l.open, "open");
    cell(row, Object.entries(l.recent).map(([e, n]) => `${e} ${n}`).join(", "), "recent");
  }
  const select = document.getElementById("filter-listener");
  if (select.options.length === 1) {
    for (const l of state.listeners) select.add(new Option(l.name, l.name));
  }
}

function showEditor() {
  const target = document.getElementById("trusted-target");
  if (target.options.length === 0) {
    target.add(new Option("server-wide (proxyTrustedNetworks)", ""));
    for (const l of state.listeners) {
      target.add(new Option(`listener ${l.name} (overrideProxyTrustedNetworks)`, l.name));
    }
    fillEditor();
  }
  const message = document.getElementById("trusted-message");
  const disabled = state.editable !== null;
  for (const id of ["trusted-target", "trusted-networks", "trusted-inherit", "trusted-save"]) {
    document.getElementById(id).disabled = disabled;
  }
  if (disabled) {
    message.textContent = `editing is off: ${state.editable}`;
    message.className = "message error";
  }
}

function fillEditor() {
  const name = document.getElementById("trusted-target").value;
  const inherit = document.getElementById("trusted-inherit");
  const input = document.getElementById("trusted-networks");
  document.getElementById("inherit-label").hidden = name === "";
  if (name === "") {
    input.value = state.server_wide.join(", ");
    inherit.checked = false;
  } else {
    const l = state.listeners.find((x) => x.name === name);
    inherit.checked = l.override === null;
    input.value = (l.override || []).join(", ");
  }
}

async function saveTrusted(event) {
  event.preventDefault();
  const name = document.getElementById("trusted-target").value;
  const text = document.getElementById("trusted-networks").value;
  const inherit = document.getElementById("trusted-inherit").checked;
  const networks = text.split(/[\s,]+/).filter((x) => x);
  const { status, value } = await post("/admin/api/trusted", {
    listener: name === "" ? null : name,
    networks: name !== "" && inherit ? null : networks,
  });
  const message = document.getElementById("trusted-message");
  message.textContent = value ? value.message : `refused (${status})`;
  message.className = status === 200 ? "message ok" : "message error";
  await refresh();
}

async function showBans() {
  const body = document.querySelector("#bans tbody");
  let bans;
  try {
    bans = await getJSON("/admin/bans");
  } catch (e) {
    bans = [];
  }
  body.replaceChildren();
  for (const ban of bans) {
    const row = body.insertRow();
    row.dataset.key = ban.key;
    cell(row, ban.key);
    cell(row, ban.until);
    cell(row, ban.reason);
    cell(row, ban.failures);
    const button = document.createElement("button");
    button.textContent = "lift";
    button.className = "lift";
    button.addEventListener("click", () => lift(ban.key));
    row.insertCell().append(button);
  }
}

async function lift(key) {
  const { status } = await post(`/admin/bans/lift?ip=${encodeURIComponent(key)}`);
  const message = document.getElementById("bans-message");
  message.textContent = status === 200 ? `lifted ${key}` : `not lifted (${status})`;
  message.className = status === 200 ? "message ok" : "message error";
  await showBans();
}

function visible(d) {
  const listener = document.getElementById("filter-listener").value;
  const outcome = document.getElementById("filter-event").value;
  return (!listener || d.listener === listener) && (!outcome || d.event === outcome);
}

// A decision's row, newest on top; id is the event's ("<epoch>-<number>"), so a decision the
// stream sends again (it never should) is not listed twice. False when it was already there.
function addDecision(d, id) {
  const body = document.querySelector("#decisions tbody");
  if (id && body.querySelector(`tr[data-id="${CSS.escape(id)}"]`)) return false;
  const row = body.insertRow(0);
  if (id) row.dataset.id = id;
  row.dataset.event = d.event;
  row.dataset.listener = d.listener;
  row.dataset.peer = d.peer;
  row.dataset.decision = JSON.stringify(d);
  if (d.event === "proxy.untrusted_header" || d.event === "proxy.rejected") row.className = "bad";
  if (d.event === "proxy.timeout") row.className = "warn";
  cell(row, new Date(d.time * 1000).toLocaleTimeString([], { hour12: false }));
  cell(row, d.listener);
  cell(row, d.peer);
  cell(row, d.client);
  cell(row, d.event, "event");
  cell(row, d.reason, "reason");
  const text = d.first_bytes ? `${d.message} (first bytes: '${d.first_bytes}')` : d.message;
  cell(row, text, "message");
  row.hidden = !visible(d);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  return true;
}

function applyFilters() {
  for (const row of document.querySelectorAll("#decisions tbody tr")) {
    row.hidden = !visible(JSON.parse(row.dataset.decision));
  }
}

async function refresh() {
  state = await getJSON("/admin/api/state");
  showListeners();
  showEditor();
  await showBans();
}

// The stream starts with the server's recent decisions ("backlog" events, oldest first), then
// sends each new one; on a reconnect the browser sends the last id it got (Last-Event-ID) and
// the server resumes after it. Opening the stream is the only read: nothing falls between a
// list and a stream.
function listen() {
  const badge = document.getElementById("stream");
  const source = new EventSource("/admin/events");
  source.addEventListener("backlog", (message) => {
    // Already in the listeners' counts the state brought.
    addDecision(JSON.parse(message.data), message.lastEventId);
  });
  source.onopen = () => {
    badge.textContent = "live";
    badge.className = "badge on";
  };
  source.onerror = () => {
    badge.textContent = "live: reconnecting";
    badge.className = "badge off";
  };
  source.onmessage = (message) => {
    const d = JSON.parse(message.data);
    if (!addDecision(d, message.lastEventId)) return;
    // The listeners' counts follow at once; the next refresh brings the server's own.
    const l = state && state.listeners.find((x) => x.name === d.listener);
    if (l) {
      l.recent[d.event] = (l.recent[d.event] || 0) + 1;
      showListeners();
    }
  };
}

async function start() {
  document.getElementById("trusted").addEventListener("submit", saveTrusted);
  document.getElementById("trusted-target").addEventListener("change", fillEditor);
  // Typing networks for a listener means an override of its own.
  document.getElementById("trusted-networks").addEventListener("input", () => {
    document.getElementById("trusted-inherit").checked = false;
  });
  document.getElementById("filter-listener").addEventListener("change", applyFilters);
  document.getElementById("filter-event").addEventListener("change", applyFilters);
  await refresh();
  listen();
  setInterval(() => refresh().catch(() => {}), REFRESH_MS);
}

start();
