// The Postern app's page. Plain JavaScript, no framework and no build step: the binary
// embeds this file as it is.
//
// How it works: the page asks the app's JSON API (same origin, cookie) for state, and a
// WebSocket (/live) pushes what happens — messages, ticks, banner changes, check
// progress. Text from the network (messages, usernames, reasons) is only ever put into
// the page as text nodes, never as HTML.

"use strict";

// ---- Small helpers ------------------------------------------------------------------

/** Builds an element: h("div", {class: "x", onclick: f}, "text", child, ...). */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function replace(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `the app answered ${status}`);
    this.status = status;
    this.kind = (body && body.error) || "http";
    this.attempts = (body && body.attempts) || [];
  }
}

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { error: "app_down", message: "The app is not running any more (was `postern app` stopped?)." });
  }
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = { message: text }; }
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

function formatTime(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  const now = new Date();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (d.toDateString() === now.toDateString()) return time;
  return d.toLocaleDateString([], { day: "numeric", month: "short" }) + " " + time;
}

const MARKS = { pending: "…", sent: "✓", delivered: "✓✓", failed: "✗", undecryptable: "⚠", received: "" };
const MARK_TITLES = {
  pending: "Not sent yet: it goes out as soon as the service is reachable",
  sent: "Sent: the server holds it for the recipient",
  delivered: "Delivered to the recipient's device",
  failed: "Not delivered",
};
/** A group's conversation key: "group:" and its id. */
const isGroup = (peer) => typeof peer === "string" && peer.startsWith("group:");

/**
 * The marks of an outgoing message and their explanation. A group message is ✓✓ once
 * every member's device has it, ✓✓ 1/2 while only some do.
 */
/** A history line's marks: the text as the client library words it ("✓✓ 1/2" included,
 *  m.marks), and a tooltip. */
function marksOf(m) {
  const p = m.progress;
  if (p) {
    return { text: m.marks, title: `Delivered to ${p.delivered} of ${p.reached} members; not yet to ${p.waiting.join(", ")}` };
  }
  const title = m.deliveries && m.deliveries.length && m.status === "delivered"
    ? "Delivered to every member's device" : (MARK_TITLES[m.status] || "");
  return { text: m.marks, title };
}

const STAGE_WORDS = { resolve: "Find the address (DNS)", connect: "Connect (TCP)", tls: "Secure connection (TLS)", handshake: "Reach the service and verify it" };

/** Route attempts as a list: "route — stage: reason". */
function attemptList(attempts) {
  const failed = (attempts || []).filter((a) => a.failed);
  if (!failed.length) return null;
  return h("ul", {}, failed.map((a) => h("li", {}, `${a.route} — ${STAGE_WORDS[a.failed[0]] || a.failed[0]}: ${failureText(a.failed[1])}`)));
}

/** A failure as the client library serialises it ({reason, detail}) in words. */
function failureText(f) {
  if (!f) return "";
  if (typeof f === "string") return f;
  const detail = f.detail ? ` (${f.detail})` : "";
  switch (f.reason) {
    case "name_not_resolved": return "the name did not resolve" + detail;
    case "refused": return "connection refused (nothing listens there)";
    case "timed_out": return "timed out (possibly blocked)";
    case "unreachable": return "network unreachable" + detail;
    case "tls_failed": return "TLS failed" + detail;
    case "speaks_tls": return "this port speaks TLS, but TLS is off for it";
    case "service_did_not_answer": return "the relay answered but the service behind it did not";
    case "server_identity": return "the far end could not prove it is the service (possible interception)";
    case "wrong_secret": return "the relay answered as a web site: its link's secret is missing or out of date (ask for its current link)";
    default: return f.detail || f.reason || "failed";
  }
}

// ---- State ---------------------------------------------------------------------------

const state = {
  account: null,
  connection: { state: "connecting", failures: [], lost: null },
  chats: [],
  history: [],
  openPeer: null,
  proxy: null,
  checks: new Map(), // check_id -> {route, report, done, ok}
  watchedCheck: null, // the check shown on the Proxy screen
  openQr: null,
};

const root = document.getElementById("app");
const views = {}; // persistent parts of the layout, built once

// ---- Live updates --------------------------------------------------------------------

let socket = null;
function connectLive() {
  socket = new WebSocket(`ws://${location.host}/live`);
  socket.onmessage = (m) => {
    let push;
    try { push = JSON.parse(m.data); } catch { return; }
    onPush(push);
  };
  socket.onclose = () => setTimeout(connectLive, 1000);
}

function onPush(push) {
  switch (push.type) {
    case "connection":
      state.connection = push.status;
      renderBanner();
      break;
    case "event": {
      const e = push.event;
      if (e.type === "transfer") {
        showTransfer(e);
        break;
      }
      if (["incoming", "sent", "delivered", "failed", "undecryptable", "key_changed",
           "attachment_saved", "attachment_failed", "group_changed"].includes(e.type)) {
        const peer = e.group ? `group:${e.group.id}` : (e.conversation || e.to || e.from || e.contact);
        refreshChats();
        if (peer && peer === state.openPeer) refreshHistory(true);
        if (e.type === "group_changed" && peer === state.openPeer) refreshGroup();
      }
      break;
    }
    case "queued":
      refreshChats();
      if (push.to === state.openPeer) refreshHistory(false);
      break;
    case "check":
      state.checks.set(push.check_id, { report: push.report, done: push.done, ok: push.ok });
      if (push.done && state.account) refreshProxies();
      renderCheck();
      break;
    case "account":
    case "resync":
      loadState();
      break;
  }
}

// ---- Loading -------------------------------------------------------------------------

async function loadState() {
  const s = await api("GET", "/api/state");
  state.account = s.account;
  state.connection = s.connection;
  if (!state.account) {
    renderOnboarding();
    return;
  }
  buildShell();
  await refreshChats();
  route();
}

async function refreshChats() {
  if (!state.account) return;
  try {
    state.chats = await api("GET", "/api/chats");
  } catch (e) { return; }
  renderChatList();
}

async function refreshHistory(markRead) {
  const peer = state.openPeer;
  if (!peer) return;
  try {
    const history = await api("GET", `/api/chats/${encodeURIComponent(peer)}`);
    if (peer !== state.openPeer) return;
    state.history = history;
  } catch (e) { return; }
  renderMessages();
  if (markRead && document.visibilityState !== "hidden") {
    await api("POST", `/api/chats/${encodeURIComponent(peer)}/read`).catch(() => {});
    refreshChats();
  }
}

async function refreshProxies() {
  try {
    state.proxy = await api("GET", "/api/proxies");
  } catch (e) { return; }
  renderProxyList();
}

// ---- Onboarding ----------------------------------------------------------------------

function renderOnboarding() {
  for (const k of Object.keys(views)) delete views[k];
  const error = h("div", { class: "error hidden", "data-test": "onboarding-error", role: "alert" });
  const file = h("input", { type: "file", accept: ".toml,text/plain", "data-test": "network-file" });
  const path = h("input", { type: "text", placeholder: "/path/to/network.toml", "data-test": "network-path" });
  const username = h("input", { type: "text", placeholder: "e.g. alice", autocomplete: "username", "data-test": "username" });
  const proxy = h("input", { type: "text", placeholder: "relay.example.org or postern://proxy?host=…", "data-test": "onboarding-proxy" });
  const tls = h("select", { "data-test": "onboarding-proxy-tls" },
    h("option", { value: "" }, "TLS: as the address says (on for port 443)"),
    h("option", { value: "on" }, "TLS on"),
    h("option", { value: "off" }, "TLS off"));
  const proxyBox = h("details", { class: "proxy-box", "data-test": "proxy-box" },
    h("summary", {}, "Can't connect? Use a proxy"),
    h("p", { class: "small muted" }, "If your network blocks the service, ask someone you trust for a proxy (relay) address or link, and enter it here. The proxy never sees your messages: they are encrypted end to end, and the service proves who it is through it."),
    h("div", { class: "field" }, h("label", {}, "Proxy address or link"), proxy),
    h("div", { class: "field" }, tls));
  const submit = h("button", { class: "primary", type: "submit", "data-test": "create-account" }, "Create account");

  const form = h("form", { class: "onboarding", "data-test": "onboarding" },
    h("h1", {}, h("img", { src: "/icon.svg", alt: "" }), "Welcome to Postern"),
    h("p", { class: "muted" }, "An end-to-end encrypted messenger that keeps working when the network blocks it."),
    error,
    h("div", { class: "field" },
      h("label", {}, "1. Your service's network file"),
      file,
      h("div", { class: "help" }, "The network.toml file the service's operator gave you. Or type its path on this computer:"),
      path),
    h("div", { class: "field" },
      h("label", {}, "2. Choose a username"),
      username,
      h("div", { class: "help" }, "3 to 32 characters: lowercase letters, digits, '.', '_' and '-'. Others find you by it.")),
    proxyBox,
    submit);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.classList.add("hidden");
    submit.disabled = true;
    submit.textContent = "Connecting…";
    try {
      let network = null;
      if (file.files && file.files[0]) network = await file.files[0].text();
      const body = {
        username: username.value.trim(),
        network,
        network_path: path.value.trim() || null,
        proxy: proxy.value.trim() || null,
        proxy_tls: tls.value === "" ? null : tls.value === "on",
      };
      await api("POST", "/api/account", body);
      await loadState();
    } catch (e) {
      showOnboardingError(error, e, proxyBox);
      submit.disabled = false;
      submit.textContent = "Create account";
    }
  });
  replace(root, form);
}

function showOnboardingError(box, e, proxyBox) {
  let title;
  switch (e.kind) {
    case "name_taken": title = "That username is taken: choose another."; break;
    case "invalid_name": title = "That username cannot be used: " + e.message; break;
    case "invalid_network": title = "The network file cannot be used: " + e.message; break;
    case "invalid_proxy": title = "The proxy address cannot be used: " + e.message; break;
    case "unreachable":
      title = "Could not reach the service.";
      proxyBox.open = true;
      break;
    default: title = e.message;
  }
  const advice = e.kind === "unreachable"
    ? h("p", {}, "If your network blocks the service, use a proxy (below). If you already entered one, it may be blocked too: try another proxy address.")
    : null;
  replace(box, h("strong", {}, title), attemptList(e.attempts), advice);
  box.setAttribute("data-kind", e.kind);
  box.classList.remove("hidden");
}

// ---- The shell: banner, sidebar, main ------------------------------------------------

function buildShell() {
  if (views.shell && root.contains(views.shell)) return;
  views.banner = h("div", { class: "banner", "data-test": "banner", role: "status" });
  views.chatList = h("ul", { class: "chat-list", "data-test": "chat-list" });
  const newChatInput = h("input", { type: "text", placeholder: "Username", "data-test": "new-chat-name" });
  const newChat = h("form", { class: "new-chat hidden", "data-test": "new-chat-form" }, newChatInput,
    h("button", { type: "submit", class: "primary" }, "Chat"));
  newChat.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = newChatInput.value.trim().toLowerCase();
    if (!name) return;
    newChatInput.value = "";
    newChat.classList.add("hidden");
    location.hash = `#/chat/${encodeURIComponent(name)}`;
  });
  // A group: a name and the other members' usernames (commas or spaces between them).
  const groupName = h("input", { type: "text", placeholder: "Group name", "data-test": "new-group-name" });
  const groupMembers = h("input", { type: "text", placeholder: "Members: bob, carol", "data-test": "new-group-members" });
  const newGroup = h("form", { class: "new-chat new-group hidden", "data-test": "new-group-form" }, groupName, groupMembers,
    h("button", { type: "submit", class: "primary", "data-test": "new-group-create" }, "Create"));
  newGroup.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const members = groupMembers.value.split(/[\s,]+/).filter(Boolean);
    try {
      const made = await api("POST", "/api/groups", { name: groupName.value, members });
      groupName.value = "";
      groupMembers.value = "";
      newGroup.classList.add("hidden");
      location.hash = `#/chat/${encodeURIComponent(`group:${made.group.id}`)}`;
    } catch (e) {
      alert(e.message);
    }
  });
  views.me = h("div", { class: "me", "data-test": "me" });
  views.sidebar = h("aside", { class: "sidebar" },
    h("div", { class: "side-head" },
      views.me,
      h("button", { title: "New chat", "data-test": "new-chat", onclick: () => { newChat.classList.toggle("hidden"); newChatInput.focus(); } }, "+ New chat"),
      h("button", { title: "New group", "data-test": "new-group", onclick: () => { newGroup.classList.toggle("hidden"); groupName.focus(); } }, "+ Group"),
      h("button", { title: "Settings", "data-test": "settings", onclick: () => { location.hash = "#/settings"; } }, "⚙")),
    newChat,
    newGroup,
    views.chatList);
  views.main = h("main", { class: "main", "data-test": "main" });
  views.shell = h("div", { class: "shell" }, views.banner, h("div", { class: "body" }, views.sidebar, views.main));
  replace(root, views.shell);
  views.me.textContent = state.account.username;
  renderBanner();
}

function renderBanner() {
  const b = views.banner;
  if (!b) return;
  const c = state.connection || {};
  const settingsButton = h("button", { "data-test": "banner-proxy-settings", onclick: () => { location.hash = "#/settings/proxy"; } }, "Proxy settings");
  b.className = "banner " + (c.state === "connected" ? "connected" : c.state === "offline" ? "offline" : "connecting");
  b.setAttribute("data-state", c.state || "connecting");
  let text;
  if (c.state === "connected") {
    text = c.relay ? `Connected via relay ${c.via}` : "Connected directly";
    replace(b, h("span", { class: "dot" }), h("span", { class: "text", "data-test": "banner-text" }, text),
      h("button", { class: "link", onclick: () => { location.hash = "#/settings/proxy"; } }, "Proxy settings"));
    return;
  }
  if (c.state === "offline") {
    const failures = (c.failures || []).map((f) => h("li", {}, `${f.route} — ${f.stage_text}: ${f.reason}`));
    const retry = Math.max(1, Math.round((c.retry_in_ms || 0) / 1000));
    replace(b, h("span", { class: "dot" }),
      h("div", { class: "text" },
        h("span", { "data-test": "banner-text" }, `Not connected — no way to the service worked. Trying again in ${retry} s.`),
        failures.length ? h("ul", { class: "small" }, failures) : null,
        h("div", { class: "small" }, "Messages you write are kept and go out when the service is reachable. If your network blocks it, use a proxy.")),
      settingsButton);
    return;
  }
  const lost = c.lost ? ` (the last connection was lost: ${c.lost})` : "";
  const failures = (c.failures || []).map((f) => h("li", {}, `${f.route} — ${f.stage_text}: ${f.reason}`));
  replace(b, h("span", { class: "dot" }),
    h("div", { class: "text" }, h("span", { "data-test": "banner-text" }, "Connecting…" + lost),
      failures.length ? h("ul", { class: "small" }, failures) : null),
    settingsButton);
}

function renderChatList() {
  const list = views.chatList;
  if (!list) return;
  if (!state.chats.length) {
    replace(list, h("li", { class: "empty" }, "No chats yet. Start one with “New chat”."));
    return;
  }
  replace(list, state.chats.map((c) => {
    const who = c.last_outgoing ? (MARKS[c.last_status] || "") + " You: " : (c.last_sender ? `${c.last_sender}: ` : "");
    const preview = c.last_status === "key_changed" ? "⚠ Safety number changed" : who + c.last_text;
    const title = c.title || c.peer;
    return h("li", {
      class: c.peer === state.openPeer ? "open" : "",
      "data-test": "chat", "data-peer": c.peer, "data-group": c.group ? "1" : null,
      onclick: () => { location.hash = `#/chat/${encodeURIComponent(c.peer)}`; },
    },
    h("div", { class: "avatar" + (c.group ? " group" : "") }, title.slice(0, 1)),
    h("div", { class: "info" },
      h("div", { class: "row" }, h("span", { class: "peer", "data-test": "chat-title" }, title), h("span", { class: "when" }, formatTime(c.last_ms))),
      h("div", { class: "row" }, h("span", { class: "preview" }, preview),
        c.unread ? h("span", { class: "unread", "data-test": "unread" }, c.unread) : null)));
  }));
}

// ---- Routing -------------------------------------------------------------------------

function route() {
  if (!state.account) return;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  state.openPeer = null;
  views.sidebar.classList.remove("has-open");
  if (parts[0] === "chat" && parts[1]) {
    state.openPeer = parts[1];
    views.sidebar.classList.add("has-open");
    renderConversation();
  } else if (parts[0] === "settings" && parts[1] === "proxy") {
    renderProxyScreen();
  } else if (parts[0] === "settings" && parts[1] === "account") {
    renderAccountScreen();
  } else if (parts[0] === "settings") {
    renderSettings();
  } else {
    replace(views.main, h("div", { class: "placeholder" }, h("p", {}, "Choose a chat, or start one with “New chat”."),
      h("p", { class: "small" }, "Messages are end-to-end encrypted: the server and the relays on the way cannot read them.")));
  }
  renderChatList();
}

window.addEventListener("hashchange", route);

// ---- Conversation --------------------------------------------------------------------

function renderConversation() {
  const peer = state.openPeer;
  const group = isGroup(peer);
  state.history = [];
  state.group = null;
  views.messages = h("div", { class: "messages", "data-test": "messages" });
  const text = h("textarea", { placeholder: group ? "Message the group" : `Message ${peer}`, "data-test": "compose", "aria-label": "Message" });
  const send = async () => {
    const body = text.value;
    if (!body.trim()) return;
    text.value = "";
    try {
      await api("POST", "/api/messages", { to: peer, text: body });
    } catch (e) {
      text.value = body; // nothing typed is lost
      alert(e.message);
      return;
    }
    refreshHistory(false);
    refreshChats();
  };
  text.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      send();
    }
  });
  // A file goes with what is typed as its caption. The bytes go to the app, which
  // encrypts them; progress comes back as `transfer` events.
  const picker = h("input", { type: "file", hidden: true, "data-test": "file-input" });
  picker.addEventListener("change", async () => {
    const file = picker.files[0];
    picker.value = "";
    if (!file) return;
    const caption = text.value;
    text.value = "";
    const query = new URLSearchParams({ to: peer, name: file.name, caption });
    try {
      const response = await fetch(`/api/files?${query}`, { method: "POST", body: file, credentials: "same-origin" });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.message || `the app answered ${response.status}`);
      }
    } catch (e) {
      text.value = caption;
      alert(`${file.name} was not sent: ${e.message}`);
      return;
    }
    refreshHistory(false);
    refreshChats();
  });
  const attach = h("button", { class: "attach", title: "Send a file", "aria-label": "Send a file", "data-test": "attach", onclick: () => picker.click() }, "📎");
  views.safety = h("div", { class: "safety", "data-test": "safety", hidden: true });
  views.groupPanel = h("div", { class: "safety group-panel", "data-test": "group-panel", hidden: true });
  views.convTitle = h("span", { "data-test": "conversation-peer" }, group ? "Group" : peer);
  views.convMembers = h("span", { class: "small members", "data-test": "group-members" });
  views.compose = h("div", { class: "compose" }, attach, picker, text, h("button", { class: "primary", "data-test": "send", onclick: send }, "Send"));
  replace(views.main,
    h("div", { class: "conv-head" }, views.convAvatar = h("div", { class: "avatar" + (group ? " group" : "") }, group ? "" : peer.slice(0, 1)),
      h("div", { class: "titles" }, views.convTitle, group ? views.convMembers : null),
      group
        ? h("button", { class: "link safety-button", "data-test": "members-button", onclick: () => { views.groupPanel.hidden = !views.groupPanel.hidden; } }, "Members")
        : h("button", { class: "link safety-button", "data-test": "safety-button", onclick: () => toggleSafety() }, "Safety number")),
    group ? views.groupPanel : views.safety,
    views.messages,
    views.compose);
  renderMessages();
  refreshHistory(true);
  if (group) refreshGroup();
  text.focus();
}

/** Reloads the open group's name and members. */
async function refreshGroup() {
  const peer = state.openPeer;
  if (!isGroup(peer)) return;
  let g;
  try {
    g = await api("GET", `/api/groups/${encodeURIComponent(peer)}`);
  } catch (e) { return; }
  if (peer !== state.openPeer) return;
  state.group = g;
  renderGroupPanel();
}

/** The group's title, its members, and (for a member) adding, removing and leaving. */
function renderGroupPanel() {
  const g = state.group;
  if (!g || !views.groupPanel) return;
  const me = state.account.username;
  views.convTitle.textContent = g.name;
  views.convAvatar.textContent = g.name.slice(0, 1);
  views.convMembers.textContent = g.joined ? g.members.map((m) => (m === me ? "you" : m)).join(", ") : "You are no longer a member";
  views.compose.hidden = !g.joined;
  const change = async (body) => {
    try {
      await api("POST", `/api/groups/${encodeURIComponent(state.openPeer)}/members`, body);
    } catch (e) { alert(e.message); return; }
    refreshGroup();
    refreshHistory(false);
    refreshChats();
  };
  if (!g.joined) {
    replace(views.groupPanel, h("p", {}, "You are no longer a member of this group: its messages do not reach you, and you cannot write to it. The conversation is kept."));
    return;
  }
  const add = h("input", { type: "text", placeholder: "Username", "data-test": "group-add-name" });
  const addForm = h("form", { class: "new-chat" }, add, h("button", { type: "submit", class: "primary", "data-test": "group-add" }, "Add"));
  addForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const names = add.value.split(/[\s,]+/).filter(Boolean);
    if (names.length) change({ add: names });
  });
  replace(views.groupPanel,
    h("ul", { class: "members-list" }, g.members.map((m) => h("li", { "data-test": "group-member", "data-member": m },
      m === me ? `${m} (you)` : m,
      m === me ? null : h("button", { class: "link", "data-test": "group-remove", onclick: () => change({ remove: [m] }) }, "Remove")))),
    addForm,
    h("p", { class: "small" }, "Messages and files go to every member's devices, each encrypted for them; the server sees neither the group nor its members. Someone added sees what is written from then on."),
    h("button", { class: "danger", "data-test": "group-leave", onclick: async () => {
      if (!confirm(`Leave “${g.name}”? The others are told; you keep the conversation.`)) return;
      try {
        await api("POST", `/api/groups/${encodeURIComponent(state.openPeer)}/leave`);
      } catch (e) { alert(e.message); return; }
      refreshGroup();
      refreshHistory(false);
      refreshChats();
    } }, "Leave group"));
}

function renderMessages() {
  const box = views.messages;
  if (!box || !document.body.contains(box)) return;
  if (!state.history.length) {
    const who = isGroup(state.openPeer) ? "in this group" : `with ${state.openPeer}`;
    replace(box, h("div", { class: "placeholder" }, `No messages ${who} yet. Say hello!`));
    return;
  }
  replace(box, state.history.map((m) => {
    const status = m.status;
    if (m.group_event) {
      const marks = m.outgoing ? ` ${marksOf(m).text}` : "";
      return h("div", { class: "group-notice", "data-test": "group-event" }, `${m.text} · ${formatTime(m.created_ms)}${marks}`);
    }
    if (status === "key_changed") {
      return h("div", { class: "key-notice", "data-test": "key-changed" },
        `⚠ ${state.openPeer}'s safety number changed (new identity key) · ${formatTime(m.created_ms)} `,
        h("button", { class: "link", onclick: () => toggleSafety(true) }, "Verify"));
    }
    const mk = marksOf(m);
    const marks = m.outgoing ? h("span", { class: `marks ${status}` + (mk.text.includes("/") ? " partial" : ""), title: mk.title, "data-test": "marks" }, mk.text) : null;
    return h("div", {
      class: "bubble" + (m.outgoing ? " out" : "") + (status === "failed" ? " failed" : ""),
      "data-test": "message", "data-status": status, "data-id": m.message_id,
    },
    m.sender && !m.outgoing ? h("div", { class: "sender", "data-test": "message-sender" }, m.sender) : null,
    m.attachment ? renderAttachment(m) : null,
    (m.text || !m.attachment) ? h("div", { class: "text", "data-test": "message-text" }, status === "undecryptable" ? "⚠ This message could not be decrypted." : m.text) : null,
    status === "failed" && m.failure ? h("div", { class: "reason", "data-test": "failure" }, `Not delivered: ${m.failure}`) : null,
    h("div", { class: "meta" }, h("span", {}, formatTime(m.created_ms)), marks));
  }));
  box.scrollTop = box.scrollHeight;
}

/** `1.5 MB`, `820 KB`: sizes as people read them. */
function formatBytes(n) {
  if (n < 1e3) return `${n} bytes`;
  if (n < 1e6) return `${Math.round(n / 1e3)} KB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}

const INLINE_IMAGES = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/** The file of a message: a picture, or a card with its name, size and state. */
function renderAttachment(m) {
  const a = m.attachment;
  const url = `/api/files/${m.message_id}`;
  const here = a.path && (a.state === "done" || m.outgoing);
  const pct = a.ciphertext_size ? Math.floor((a.transferred * 100) / a.ciphertext_size) : 0;
  let state = null;
  if (a.state === "uploading") state = `Uploading… ${pct} %`;
  else if (a.state === "downloading") state = `Fetching… ${pct} %`;
  else if (a.state === "failed") state = `✗ ${a.error || "could not be transferred"}`;
  const name = here
    ? h("a", { href: url, target: "_blank", rel: "noopener", "data-test": "attachment-link" }, a.file_name)
    : h("span", {}, a.file_name);
  return h("div", { class: "attachment" + (a.state === "failed" ? " failed" : ""), "data-test": "attachment", "data-state": a.state },
    here && INLINE_IMAGES.includes(a.content_type)
      ? h("a", { href: url, target: "_blank", rel: "noopener" }, h("img", { src: url, alt: a.file_name, "data-test": "attachment-image" }))
      : null,
    h("div", { class: "file" }, "📎 ", name, h("span", { class: "size" }, ` · ${formatBytes(a.size)}`)),
    state ? h("div", { class: "transfer", "data-test": "transfer" }, state) : null);
}

/** A transfer moved on: update its bubble in place (the history is reloaded at the end). */
function showTransfer(e) {
  if (e.peer !== state.openPeer || !views.messages) return;
  const bubble = views.messages.querySelector(`[data-id="${e.message_id}"]`);
  const line = bubble && bubble.querySelector("[data-test=transfer]");
  const pct = e.total ? Math.floor((e.done * 100) / e.total) : 100;
  if (line) line.textContent = `${e.outgoing ? "Uploading…" : "Fetching…"} ${pct} %`;
  if (e.done === e.total) refreshHistory(false);
}

// ---- Safety number -------------------------------------------------------------------

/** Shows (or hides) the safety number panel of the open conversation. */
async function toggleSafety(show) {
  const panel = views.safety;
  const peer = state.openPeer;
  if (!panel || !peer) return;
  if (show === undefined ? !panel.hidden : !show) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  replace(panel, h("p", { class: "small" }, "Reading the safety number…"));
  let s;
  try {
    s = await api("GET", `/api/contacts/${encodeURIComponent(peer)}/safety`);
  } catch (e) {
    replace(panel, h("p", { class: "small", "data-test": "safety-error" }, e.message));
    return;
  }
  if (peer !== state.openPeer) return;
  renderSafety(s);
}

function renderSafety(s) {
  const panel = views.safety;
  const peer = s.contact;
  const path = `/api/contacts/${encodeURIComponent(peer)}/verified`;
  const mark = async (method, body) => {
    try {
      renderSafety(await api(method, path, body));
    } catch (e) {
      alert(e.message);
      toggleSafety(true);
    }
  };
  let status;
  if (s.verified) status = h("p", { class: "ok", "data-test": "safety-status" }, `✓ Verified: you compared this number with ${peer}.`);
  else if (s.changed_since_verified) status = h("p", { class: "bad", "data-test": "safety-status" }, `⚠ Not verified: ${peer}'s safety number changed since you verified it. Compare it again.`);
  else if (s.key_changed_ms) status = h("p", { class: "bad", "data-test": "safety-status" }, `⚠ Not verified. ${peer}'s safety number changed on ${formatTime(s.key_changed_ms)}.`);
  else status = h("p", { "data-test": "safety-status" }, "Not verified yet.");
  replace(panel,
    h("div", { class: "qr" },
      h("img", { src: `/api/contacts/${encodeURIComponent(peer)}/safety/qr?n=${s.number}`, alt: "QR code of the safety number" }),
      h("div", { class: "digits", "data-test": "safety-number" }, [0, 4, 8].map((i) => h("div", {}, s.groups.slice(i, i + 4).join("  "))))),
    status,
    s.checked_with_server ? null : h("p", { class: "small" }, "Computed from the keys kept on this device: the service was not reached."),
    h("p", { class: "small" }, `Compare this number with ${peer} in person, or on a call where you recognise each other: ${peer} opens your chat's safety number. The same 60 digits mean nobody is in between. Different digits mean someone may be reading your messages: do not mark it verified.`),
    h("div", { class: "row" },
      s.verified
        ? h("button", { "data-test": "safety-clear", onclick: () => mark("DELETE") }, "Clear verification")
        : h("button", { class: "primary", "data-test": "safety-confirm", onclick: () => mark("POST", { number: s.number }) }, "Mark as verified"),
      h("button", { class: "link", onclick: () => toggleSafety(false) }, "Close")));
}

// ---- Settings ------------------------------------------------------------------------

function crumbs(...items) {
  return h("div", { class: "crumbs", "data-test": "crumbs" }, items.map((it, i) => [
    i ? " → " : "",
    it.hash ? h("button", { class: "link", onclick: () => { location.hash = it.hash; } }, it.label) : h("span", {}, it.label),
  ]));
}

function renderSettings() {
  replace(views.main, h("div", { class: "page" },
    crumbs({ label: "Settings" }),
    h("div", { class: "card" },
      h("ul", { class: "menu" },
        h("li", {}, h("button", { "data-test": "settings-account", onclick: () => { location.hash = "#/settings/account"; } }, "Account — username, device, server")),
        h("li", {}, h("div", { class: "muted small", style: null }, "Storage and data")),
        h("li", {}, h("button", { "data-test": "settings-proxy", onclick: () => { location.hash = "#/settings/proxy"; } }, "Proxy — reach the service when your network blocks it"))))));
}

function renderAccountScreen() {
  const a = state.account;
  replace(views.main, h("div", { class: "page", "data-test": "account-screen" },
    crumbs({ label: "Settings", hash: "#/settings" }, { label: "Account" }),
    h("div", { class: "card" },
      h("dl", { class: "facts" },
        h("dt", {}, "Username"), h("dd", { "data-test": "account-username" }, a.username),
        h("dt", {}, "Device"), h("dd", {}, String(a.device_id)),
        h("dt", {}, "Server"), h("dd", { class: "mono" }, a.server),
        h("dt", {}, "Server key fingerprint"), h("dd", { class: "mono", "data-test": "fingerprint" }, a.server_key_fingerprint),
        h("dt", {}, "Server key"), h("dd", { class: "mono small" }, a.server_key),
        h("dt", {}, "Profile folder"), h("dd", { class: "mono small" }, a.profile)),
      h("p", { class: "small muted" }, "Compare the fingerprint with the one your service's operator publishes: if they match, nobody on the way — no relay, no network — can read your messages or pretend to be the service."))));
}

const MODE_CHOICES = [
  { mode: "off", title: "Don't use a proxy", help: "Connect straight to the service." },
  { mode: "auto", title: "Automatic", help: "Connect straight to the service when it works, and through your proxies when your network blocks it." },
  { mode: "on", title: "Use proxy", help: "Always go through a proxy: never connect straight to the service (so the network does not see you contact it)." },
];

function renderProxyScreen() {
  views.proxyMode = h("div", { "data-test": "proxy-mode" });
  views.proxyList = h("ul", { class: "proxy-list", "data-test": "proxy-list" });
  views.check = h("div", { class: "check hidden", "data-test": "check", "aria-live": "polite" });
  const address = h("input", { type: "text", placeholder: "relay.example.org, 203.0.113.5:5222 or a postern://proxy?… link", "data-test": "proxy-address", "aria-label": "Proxy address or link" });
  const tls = h("select", { "data-test": "proxy-tls", "aria-label": "TLS" },
    h("option", { value: "" }, "TLS: as the address says"),
    h("option", { value: "on" }, "TLS on"),
    h("option", { value: "off" }, "TLS off"));
  const addError = h("div", { class: "error hidden", "data-test": "proxy-error" });
  const save = h("button", { class: "primary", type: "submit", "data-test": "proxy-save" }, "Save");
  const form = h("form", {}, h("div", { class: "form-row" }, address, tls, save), addError);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    addError.classList.add("hidden");
    if (!address.value.trim()) return;
    try {
      const added = await api("POST", "/api/proxies", { address: address.value.trim(), tls: tls.value === "" ? null : tls.value === "on" });
      address.value = "";
      state.proxy = added.settings;
      watchCheck(added.check_id, `Proxy ${added.understood}`);
      renderProxyList();
    } catch (e) {
      replace(addError, e.message);
      addError.classList.remove("hidden");
    }
  });
  replace(views.main, h("div", { class: "page", "data-test": "proxy-screen" },
    crumbs({ label: "Settings", hash: "#/settings" }, { label: "Storage and data" }, { label: "Proxy" }),
    h("div", { class: "card" }, h("h2", {}, "Use proxy"), views.proxyMode),
    h("div", { class: "card" }, h("h2", {}, "Your proxies"),
      h("p", { class: "small muted" }, "Tried in this order. A proxy (relay) passes your encrypted connection on to the service; it cannot read your messages."),
      views.proxyList),
    h("div", { class: "card" }, h("h2", {}, "Add a proxy"),
      h("p", { class: "small muted" }, "Enter the address someone you trust gave you, or paste a proxy link. A host alone means port 443 with TLS."),
      form, views.check),
    h("div", { class: "card" }, h("h2", {}, "The direct way"),
      h("p", { class: "small muted" }, `Straight to the service at ${state.account.server}.`),
      h("button", { "data-test": "check-direct", onclick: () => startCheck("direct", "The direct way") }, "Check"))));
  renderProxyList();
  renderCheck();
  refreshProxies();
}

function renderProxyList() {
  if (!views.proxyList || !document.body.contains(views.proxyList)) return;
  const p = state.proxy;
  if (!p) return;
  replace(views.proxyMode, MODE_CHOICES.map((c) => h("label", { class: "choice" },
    h("input", { type: "radio", name: "proxy-mode", value: c.mode, checked: p.mode === c.mode, "data-test": `mode-${c.mode}`,
      onchange: async () => {
        try { state.proxy = await api("PUT", "/api/proxy-mode", { mode: c.mode }); } catch (e) { alert(e.message); }
        renderProxyList();
      } }),
    h("span", {}, h("strong", {}, c.title), h("br"), h("span", { class: "small muted" }, c.help)))));
  if (p.mode === "on" && !p.proxies.length) {
    views.proxyMode.append(h("div", { class: "error small" }, "“Use proxy” is on but no proxy is saved: add one below, or the app cannot connect."));
  }
  if (!p.proxies.length) {
    replace(views.proxyList, h("li", { class: "muted" }, "No proxy saved."));
    return;
  }
  const order = p.proxies.map((x) => x.number);
  const move = async (i, delta) => {
    const o = order.slice();
    [o[i], o[i + delta]] = [o[i + delta], o[i]];
    try { state.proxy = await api("PUT", "/api/proxies/order", { order: o }); } catch (e) { alert(e.message); }
    renderProxyList();
  };
  replace(views.proxyList, p.proxies.map((x, i) => {
    const hl = x.health;
    let health = "not checked yet";
    if (hl && hl.hostile) health = "✗ refused: it could not prove it leads to the service";
    else if (hl && hl.last_ok_ms && (!hl.last_failure_ms || hl.last_ok_ms >= hl.last_failure_ms)) health = `✓ worked ${formatTime(hl.last_ok_ms)}${hl.last_latency_ms ? ` (${hl.last_latency_ms} ms)` : ""}`;
    else if (hl && hl.last_failure) health = `✗ failed ${formatTime(hl.last_failure_ms)}: ${hl.last_failure}`;
    const qrOpen = state.openQr === x.link;
    return h("li", { "data-test": "proxy", "data-address": x.address },
      h("div", { class: "proxy-row" },
        h("strong", {}, `${x.number}.`),
        h("span", { class: "addr" }, x.address),
        h("span", { class: "small muted" }, x.tls ? "TLS" : "plain"),
        h("button", { title: "Try earlier", disabled: i === 0, onclick: () => move(i, -1), "data-test": "proxy-up" }, "↑"),
        h("button", { title: "Try later", disabled: i === p.proxies.length - 1, onclick: () => move(i, 1), "data-test": "proxy-down" }, "↓"),
        h("button", { "data-test": "proxy-check", onclick: () => startCheck({ proxy: x.number }, `Proxy ${x.describe}`) }, "Check"),
        h("button", { "data-test": "proxy-qr", onclick: () => { state.openQr = qrOpen ? null : x.link; renderProxyList(); } }, qrOpen ? "Hide QR" : "QR code"),
        h("button", { "data-test": "proxy-remove", onclick: async () => {
          try { state.proxy = await api("DELETE", `/api/proxies/${x.number}`); } catch (e) { alert(e.message); }
          renderProxyList();
        } }, "Remove")),
      h("div", { class: "small muted", "data-test": "proxy-health" }, health),
      qrOpen ? h("div", { class: "qr" }, h("img", { src: `/api/proxies/${x.number}/qr.svg?${encodeURIComponent(x.link)}`, alt: `QR code of ${x.link}` }),
        h("div", {}, h("div", { class: "small muted" }, "Let someone scan this, or send them the link:"), h("code", { "data-test": "proxy-link" }, x.link))) : null);
  }));
}

async function startCheck(target, label) {
  try {
    const started = await api("POST", "/api/checks", target);
    watchCheck(started.check_id, label);
  } catch (e) {
    alert(e.message);
  }
}

function watchCheck(id, label) {
  state.watchedCheck = { id, label };
  renderCheck();
}

function renderCheck() {
  const box = views.check;
  if (!box || !document.body.contains(box) || !state.watchedCheck) return;
  box.classList.remove("hidden");
  const { id, label } = state.watchedCheck;
  const c = state.checks.get(id);
  const report = c && c.report;
  const done = c && c.done;
  const wanted = ["resolve", "connect"];
  const tls = report ? /\(TLS\)$/.test(report.route) : false;
  if (tls) wanted.push("tls");
  wanted.push("handshake");
  const completed = new Map(((report && report.stages) || []).map((s) => [s.stage, s.took]));
  const failed = report && report.failed;
  let reached = true;
  const rows = wanted.map((stage) => {
    let mark, cls, note = "";
    if (completed.has(stage)) { mark = "✓"; cls = "ok"; note = ` — ${Math.round(completed.get(stage))} ms`; }
    else if (failed && failed[0] === stage) { mark = "✗"; cls = "bad"; note = ` — ${failureText(failed[1])}`; reached = false; }
    else if (!done && reached) { mark = "…"; cls = "wait"; reached = false; }
    else { mark = "·"; cls = "wait"; }
    return h("li", { "data-test": "stage", "data-stage": stage, "data-result": cls },
      h("span", { class: `mark ${cls}` }, mark), h("span", {}, STAGE_WORDS[stage] + note));
  });
  let verdict = null;
  if (done && c.ok) {
    verdict = h("div", { class: "verdict ok", "data-test": "verdict", "data-ok": "true" },
      h("span", { class: "big", "data-test": "green-tick" }, "✓"),
      h("div", {}, h("strong", {}, "It works."), " The service answered through this way and proved who it is.",
        h("div", { class: "small muted" }, "If messages still do not go through, the proxy may be blocked: try another proxy address.")));
  } else if (done) {
    const stage = failed ? STAGE_WORDS[failed[0]] : "the check";
    verdict = h("div", { class: "verdict bad", "data-test": "verdict", "data-ok": "false" },
      h("span", { class: "big", "data-test": "red-cross" }, "✗"),
      h("div", {}, h("strong", {}, `Failed at “${stage}”: `), failed ? failureText(failed[1]) : "",
        h("div", { class: "small" }, "The proxy may be blocked or down: try another proxy address.")));
  }
  replace(box, h("div", {}, h("strong", {}, done ? "Checked: " : "Checking: "), label),
    h("ul", { class: "stages" }, rows), verdict);
  box.scrollIntoView({ block: "nearest" });
}

// ---- Start ---------------------------------------------------------------------------

connectLive();
loadState().catch((e) => replace(root, h("div", { class: "onboarding" }, h("div", { class: "error" }, e.message))));
