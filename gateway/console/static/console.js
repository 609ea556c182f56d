// The integration console's page. Everything it shows comes from /console/api as JSON and goes into the page as
// text (never as markup: a message's raw text may hold anything). The access token is sent once, in a header, to
// start a session (an HttpOnly cookie) and is never kept; the CSRF token lives in this module's memory only.

const state = { csrf: null, messageNext: null, auditNext: null, current: null, timer: null };
const $ = (id) => document.getElementById(id);

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text == null || text === "" ? "-" : String(text);
  return td;
}

function button(label, text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function fields(dl, pairs) {
  dl.replaceChildren();
  for (const [name, value] of pairs) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value == null || value === "" ? "-" : String(value);
    dl.append(dt, dd);
  }
}

class Unauthorised extends Error {}

async function call(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (options.method === "POST" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET", headers, credentials: "same-origin", cache: "no-store",
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    signedOut(body.detail || "your session has ended: sign in again");
    throw new Unauthorised(body.detail);
  }
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function report(target, error) {
  if (!(error instanceof Unauthorised)) $(target).textContent = `Could not do that: ${error.message}`;
}

// -- signing in and out --------------------------------------------------------------------------------

function signedIn(session) {
  state.csrf = session.csrf;
  $("who-name").textContent = session.name || session.sub;
  $("who-role").textContent = session.role;
  $("who-until").textContent = session.expires;
  $("login").hidden = true;
  $("who").hidden = false;
  $("app").hidden = false;
  loadAll();
  clearInterval(state.timer);
  state.timer = setInterval(() => loadCounters().catch(() => {}), 30000);
}

function signedOut(message) {
  state.csrf = null;
  clearInterval(state.timer);
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const field = $("token");
  const token = field.value.trim();
  field.value = ""; // not kept: the session cookie stands for it from now on
  $("login-error").textContent = "";
  try {
    const response = await fetch("session", { method: "POST", headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
                                              credentials: "same-origin", cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      $("login-error").textContent = `Not signed in: ${body.detail || response.statusText}`;
      return;
    }
    signedIn(body);
  } catch (error) {
    $("login-error").textContent = `Not signed in: ${error.message}`;
  }
});

$("sign-out").addEventListener("click", async () => {
  try { await call("session/end", { method: "POST" }); } catch (error) { /* signed out either way */ }
  signedOut("Signed out.");
  $("token").focus();
});

// -- counters ------------------------------------------------------------------------------------------

async function loadCounters() {
  const c = await call("api/counters?minutes=15");
  const minutes = new Set([...Object.keys(c.messages), ...Object.keys(c.uploads), ...Object.keys(c.refusals)]);
  const rows = [...minutes].sort().reverse().map((m) => {
    const tr = document.createElement("tr");
    const by = c.messages[m] || {};
    tr.append(cell(m), cell(by.applied || 0), cell(by.ignored || 0), cell(by.error || 0), cell(by.rejected || 0),
              cell(c.uploads[m] || 0), cell(c.refusals[m] || 0));
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell("Nothing in the last 15 minutes");
    td.colSpan = 7;
    tr.append(td);
    rows.push(tr);
  }
  $("counters-table").tBodies[0].replaceChildren(...rows);
  const totals = Object.entries(c.totals).map(([s, n]) => `${n} ${s}`).join(", ");
  const r = c.renditions;
  $("totals").textContent = `All stored messages: ${totals || "none"}. Photos waiting for their preview: ${r.due}; ` +
    `photos stored whose pixels did not decode (no preview; see the audit trail): ${r.failed}.`;
}
$("counters-refresh").addEventListener("click", () => loadCounters().catch((e) => report("totals", e)));

// -- messages ------------------------------------------------------------------------------------------

function messageQuery(before) {
  const q = new URLSearchParams();
  const status = $("f-status").value;
  if (status) q.append("status", status);
  const type = $("f-type").value.trim();
  if (type) q.set("type", type);
  for (const [id, key] of [["f-from", "from"], ["f-to", "to"]]) {
    const v = $(id).value;
    if (v) q.set(key, new Date(v).toISOString());
  }
  const control = $("f-control").value.trim();
  if (control) q.set("controlId", control);
  if (before) q.set("before", before);
  return q.toString();
}

async function loadMessages(before) {
  $("messages-status").textContent = "Loading messages...";
  try {
    const page = await call(`api/messages?${messageQuery(before)}`);
    const rows = page.items.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.status = m.status;
      tr.append(cell(m.id), cell(m.receivedAt), cell(m.sender), cell(m.controlId), cell(m.type), cell(m.status), cell(m.ack),
                cell(m.error));
      const td = document.createElement("td");
      td.append(button(`Open message ${m.id}`, "Open", () => openMessage(m.id)));
      tr.append(td);
      return tr;
    });
    $("messages-table").tBodies[0].replaceChildren(...rows);
    state.messageNext = page.nextBefore;
    $("messages-older").disabled = !page.nextBefore;
    $("messages-status").textContent = `${page.items.length} message(s) shown${before ? " (older page)" : ""}.`;
  } catch (error) {
    report("messages-status", error);
  }
}

$("message-filter").addEventListener("submit", (event) => { event.preventDefault(); loadMessages(null); });
$("messages-newest").addEventListener("click", () => loadMessages(null));
$("messages-older").addEventListener("click", () => loadMessages(state.messageNext));

async function openMessage(id) {
  $("reprocess-result").textContent = "";
  try {
    const m = await call(`api/messages/${id}`);
    state.current = id;
    $("detail-heading").textContent = `Message ${m.id}: ${m.type || "?"} from ${m.sender || "?"}`;
    fields($("detail-fields"), [["Status", m.status], ["ACK", m.ack], ["Error", m.error], ["Control id", m.controlId],
      ["Received (UTC)", m.receivedAt], ["Event time (UTC)", m.eventTime], ["From", m.peer], ["Patient id", m.patient],
      ["Refused as a reuse of message", m.duplicateOf]]);
    $("detail-raw").textContent = m.raw || "";
    $("detail-ack").textContent = m.ackText || "(no ACK sent)";
    $("detail-mapped").textContent = JSON.stringify(m.mapped.report, null, 2);
    const detail = $("message-detail");
    detail.hidden = false;
    detail.focus();
  } catch (error) {
    report("messages-status", error);
  }
}

$("reprocess").addEventListener("click", async () => {
  const id = state.current;
  $("reprocess-result").textContent = "Reprocessing...";
  try {
    const r = await call(`api/messages/${id}/reprocess`, { method: "POST" });
    await openMessage(id); // the stored message as it is now: its new status and ACK
    $("reprocess-result").textContent = `Message ${id}: ${r.previousStatus} -> ${r.status} (${r.ackCode})` +
      (r.status !== "applied" && r.error ? `: ${r.error}` : "");
    loadMessages(null);
    loadCounters().catch(() => {});
  } catch (error) {
    report("reprocess-result", error);
  }
});

// -- mapping bench and mapping file ----------------------------------------------------------------------

$("bench-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("bench-status").textContent = "Mapping...";
  try {
    const r = await call("api/bench", { method: "POST", json: { message: $("bench-message").value, database: $("bench-database").checked } });
    $("bench-report").textContent = JSON.stringify(r.report, null, 2);
    $("bench-ack").textContent = r.ack || "(no ACK would be sent)";
    $("bench-status").textContent = `${r.report.status || ""}${r.ok ? "" : " (not applied as it stands)"}`;
  } catch (error) {
    report("bench-status", error);
  }
});

async function loadMapping() {
  const m = await call("api/mapping");
  fields($("mapping-fields"), [["File", m.path + (m.default ? " (the default shipped with the gateway)" : "")], ["Mapping", m.name],
    ["Valid", m.valid ? "yes" : "no"], ["Rules", m.summary], ["SHA-256", m.sha256]]);
  $("mapping-problems").replaceChildren(...m.problems.map((p) => { const li = document.createElement("li"); li.textContent = p; return li; }));
  $("mapping-text").textContent = m.text || "";
}
$("mapping-refresh").addEventListener("click", () => loadMapping().catch((e) => report("mapping-problems", e)));

// -- DICOM peers and outbox --------------------------------------------------------------------------------

async function loadPeers() {
  const r = await call("api/peers");
  $("peers-table").tBodies[0].replaceChildren(...r.peers.map((p) => {
    const tr = document.createElement("tr");
    const routes = p.routes.map((x) => `${x.specialties.join("/") || "all specialties"}, ${x.sensitivities.join("/")}` +
      (x.storageCommitment ? ", commitment" : "")).join("; ");
    tr.append(cell(p.aeTitle), cell(p.name), cell(p.hosts.join(", ")), cell(p.port), cell(p.purposeOfUse),
              cell(p.sensitivities.join(", ")), cell(p.allow.join(", ")), cell(routes || "none"));
    return tr;
  }));
}

async function loadOutbox() {
  const status = $("o-status").value;
  try {
    const r = await call(`api/outbox${status ? `?status=${encodeURIComponent(status)}` : ""}`);
    $("outbox-table").tBodies[0].replaceChildren(...r.items.map((i) => {
      const tr = document.createElement("tr");
      tr.dataset.status = i.status;
      tr.append(cell(i.id), cell(i.photo), cell(i.destination), cell(i.status), cell(i.attempts), cell(i.nextAttemptAt),
                cell(i.lastError));
      const td = document.createElement("td");
      if (i.status === "dead" || i.status === "cancelled") td.append(button(`Retry outbox item ${i.id}`, "Retry", () => changeOutbox(i.id, "retry")));
      if (i.status === "pending" || i.status === "dead") td.append(button(`Cancel outbox item ${i.id}`, "Cancel", () => changeOutbox(i.id, "cancel")));
      tr.append(td);
      return tr;
    }));
    $("outbox-status").textContent = `${r.items.length} item(s) shown.`;
  } catch (error) {
    report("outbox-status", error);
  }
}

async function changeOutbox(id, change) {
  try {
    const r = await call(`api/outbox/${id}/${change}`, { method: "POST" });
    await loadOutbox();
    $("outbox-status").textContent = `Outbox item ${id}: ${r.status}.`;
  } catch (error) {
    report("outbox-status", error);
  }
}
$("outbox-filter").addEventListener("submit", (event) => { event.preventDefault(); loadOutbox(); });

// -- audit -----------------------------------------------------------------------------------------------

async function loadAudit(before) {
  const r = await call(`api/audit?count=50${before ? `&before=${before}` : ""}`);
  $("audit-table").tBodies[0].replaceChildren(...r.items.map((e) => {
    const tr = document.createElement("tr");
    tr.append(cell(e.seq), cell(e.recordedAt), cell(e.typeName), cell(e.subtype), cell(e.outcomeName), cell(e.agent),
              cell(e.agentRole), cell(e.agentNetwork), cell(e.outcomeDescription));
    return tr;
  }));
  state.auditNext = r.nextBefore;
  $("audit-older").disabled = !r.nextBefore;
}
$("audit-newest").addEventListener("click", () => loadAudit(null).catch((e) => report("verify-result", e)));
$("audit-older").addEventListener("click", () => loadAudit(state.auditNext).catch((e) => report("verify-result", e)));

$("verify").addEventListener("click", async () => {
  $("verify-result").textContent = "Verifying...";
  try {
    const r = await call("api/audit/verify");
    $("verify-result").textContent = r.ok
      ? `Audit trail intact: ${r.checked} record(s), ${r.anchoredSeq != null ? `anchored at record ${r.anchoredSeq}` : "no anchor file yet"}.`
      : `Audit trail BROKEN${r.firstBadSeq != null ? ` at sequence ${r.firstBadSeq}` : ""}: ${r.reason} (${r.checked} record(s) checked).`;
    $("verify-result").dataset.ok = String(r.ok);
    loadAudit(null).catch(() => {});
  } catch (error) {
    report("verify-result", error);
  }
});

// -- start -------------------------------------------------------------------------------------------------

function loadAll() {
  loadCounters().catch((e) => report("totals", e));
  loadMessages(null);
  loadMapping().catch((e) => report("mapping-problems", e));
  loadPeers().catch((e) => report("outbox-status", e));
  loadOutbox();
  loadAudit(null).catch((e) => report("verify-result", e));
}

(async () => {
  const response = await fetch("session", { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" });
  if (response.ok) signedIn(await response.json());
  else signedOut("");
})();
