// The bedside capture app: sign in, identify the patient positively, say what the photos are and under which
// consent, take them, and upload them through /api/v1/photos with an Idempotency-Key each. Nothing lands in the
// phone's gallery; photos waiting for signal are kept in IndexedDB encrypted (AES-GCM) with a key that exists only
// in this page's memory, so a closed app leaves nothing readable. The access token lives in memory only.
"use strict";

const $ = (id) => document.getElementById(id);
const app = {
  token: null, user: null, auth: null, options: null, patient: null, consents: [], site: null,
  taken: [], key: null, idleTimer: null, sending: false,
};
const DB_NAME = "clinphoto-capture";
const NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number";

// ---------------------------------------------------------------- small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function show(step) {
  for (const id of ["step-sign-in", "step-patient", "step-details", "step-photos"]) $(id).hidden = id !== step;
  const heading = $(step).querySelector("h2");
  if (heading) { heading.tabIndex = -1; heading.focus(); }
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${app.token}`, ...(options.headers || {}) };
  const res = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
  const body = res.headers.get("content-type")?.includes("json") ? await res.json() : null;
  if (!res.ok) throw Object.assign(new Error((body && (body.detail || body.message)) || `${res.status}`), { status: res.status });
  return body;
}

function nhsValid(n) {
  // the NHS number's modulus 11 check digit (NHS Data Dictionary)
  if (!/^\d{10}$/.test(n)) return false;
  const sum = [...n.slice(0, 9)].reduce((acc, d, i) => acc + Number(d) * (10 - i), 0);
  const check = 11 - (sum % 11);
  return (check === 11 ? 0 : check) === Number(n[9]) && check !== 10;
}

const b64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

// ---------------------------------------------------------------- sign in, idle time-out, sign out

async function start() {
  app.options = await fetch("/capture/options").then((r) => r.json());
  app.auth = await fetch("/capture/auth", { cache: "no-store" }).then((r) => r.json());
  for (const v of app.options.views) $("view").append(el("option", { value: v, text: v }));
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("/capture/sw.js", { scope: "/capture/" }).catch(() => {});
  wire();
  if (app.auth.mode === "dev") $("dev-form").hidden = false;
  else $("sso").hidden = false;
  const params = new URLSearchParams(location.search);
  if (params.get("code")) await finishSso(params);
  await refreshQueueCount();
}

async function signedIn(token) {
  app.token = token;
  const claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  app.user = { sub: claims.sub, name: claims.name || claims.sub, specialties: claims.specialties || [] };
  $("who").textContent = app.user.name;
  $("sign-out").hidden = false;
  // a fresh key for this session: photos queued under an earlier one cannot be read and are dropped
  app.key = await crypto.subtle.generateKey({ name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);
  await eraseQueue();
  touch();
  show("step-patient");
}

async function devSignIn(event) {
  event.preventDefault();
  const res = await fetch("/capture/dev-sign-in", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user: $("dev-user").value.trim(), name: $("dev-name").value.trim() || null,
      role: $("dev-role").value, specialty: $("dev-specialty").value.trim() || null }) });
  const body = await res.json();
  if (!res.ok) { $("sign-in-error").textContent = body.detail?.[0]?.msg || body.detail || "Sign-in refused"; return; }
  await signedIn(body.accessToken);
}

async function startSso() {
  // authorization code with PKCE; the verifier waits in sessionStorage only across the one redirect
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(48)));
  const state = b64url(crypto.getRandomValues(new Uint8Array(24)));
  const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  sessionStorage.setItem("pkce", JSON.stringify({ verifier, state }));
  const query = new URLSearchParams({ response_type: "code", client_id: app.auth.clientId, redirect_uri: `${location.origin}/capture/`,
    scope: app.auth.scope, state, code_challenge: challenge, code_challenge_method: "S256", resource: app.auth.audience || "" });
  location.assign(`${app.auth.authorizationEndpoint}?${query}`);
}

async function finishSso(params) {
  const saved = JSON.parse(sessionStorage.getItem("pkce") || "null");
  sessionStorage.removeItem("pkce");
  history.replaceState(null, "", "/capture/");  // the code leaves the address bar at once
  if (!saved || saved.state !== params.get("state")) { $("sign-in-error").textContent = "Sign-in did not start here: try again."; return; }
  const res = await fetch(app.auth.tokenEndpoint, { method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ grant_type: "authorization_code", code: params.get("code"), redirect_uri: `${location.origin}/capture/`,
      client_id: app.auth.clientId, code_verifier: saved.verifier }) });
  const body = await res.json().catch(() => ({}));
  if (!res.ok || !body.access_token) { $("sign-in-error").textContent = `Sign-in failed: ${body.error_description || body.error || res.status}`; return; }
  await signedIn(body.access_token);
}

function touch() {
  clearTimeout(app.idleTimer);
  if (app.token) app.idleTimer = setTimeout(() => signOut(true), app.auth.idleMinutes * 60_000);
}

const IDLE_GRACE_SECONDS = 60;

async function signOut(idle = false) {
  const waiting = await queueCount();
  if (!waiting) { await eraseEverything(); return; }
  // photos not yet in the record: ask first; left unanswered after a time-out, the phone erases them anyway
  $("confirm-text").textContent = `${waiting} photo${waiting === 1 ? " has" : "s have"} not reached the record yet. ` +
    `Signing out erases them from this phone.${idle ? ` Signing out in ${IDLE_GRACE_SECONDS} seconds unless you keep them.` : ""}`;
  if (!$("confirm-dialog").open) $("confirm-dialog").showModal();
  clearTimeout(app.graceTimer);
  if (idle) app.graceTimer = setTimeout(eraseEverything, IDLE_GRACE_SECONDS * 1000);
}

async function eraseEverything() {
  clearTimeout(app.idleTimer);
  clearTimeout(app.graceTimer);
  for (const t of app.taken) URL.revokeObjectURL(t.url);
  Object.assign(app, { token: null, user: null, patient: null, consents: [], site: null, taken: [], key: null });
  await eraseQueue();
  await new Promise((resolve) => { const r = indexedDB.deleteDatabase(DB_NAME); r.onsuccess = r.onerror = r.onblocked = resolve; });
  sessionStorage.clear();
  localStorage.clear();
  location.replace("/capture/");
}

// ---------------------------------------------------------------- the patient

function checkTyped() {
  const kind = document.querySelector("input[name=kind]:checked").value;
  const value = $("patient-id").value.replace(/\s/g, "");
  $("patient-check").textContent = kind !== "nhs" || !value ? "" :
    value.length < 10 ? `${10 - value.length} more digit${value.length === 9 ? "" : "s"}` :
    nhsValid(value) ? "Valid NHS number" : "Not a valid NHS number: check the digits";
}

async function readBarcode(file) {
  // the browser's own BarcodeDetector where it has one (Android Chrome), else ZXing (npm @zxing/library, served here)
  const url = URL.createObjectURL(file);
  try {
    if ("BarcodeDetector" in window) {
      const formats = await BarcodeDetector.getSupportedFormats();
      if (formats.includes("code_128") || formats.includes("data_matrix")) {
        const found = await new BarcodeDetector({ formats: ["code_128", "data_matrix"] }).detect(await createImageBitmap(file));
        if (found.length) return found[0].rawValue;
      }
    }
    if (!window.ZXing) {
      await new Promise((resolve, reject) => {
        document.head.append(el("script", { src: "/capture/vendor/zxing.js", onload: resolve, onerror: reject }));
      });
    }
    const hints = new Map([[ZXing.DecodeHintType.POSSIBLE_FORMATS, [ZXing.BarcodeFormat.CODE_128, ZXing.BarcodeFormat.DATA_MATRIX]],
      [ZXing.DecodeHintType.TRY_HARDER, true]]);
    return (await new ZXing.BrowserMultiFormatReader(hints).decodeFromImageUrl(url)).getText();
  } finally { URL.revokeObjectURL(url); }
}

async function scanWristband() {
  const file = $("scan").files[0];
  $("scan").value = "";
  if (!file) return;
  $("patient-check").textContent = "Reading the barcode…";
  try {
    const text = (await readBarcode(file)).replace(/\s/g, "");
    const nhs = text.match(/\d{10}/)?.[0];
    document.querySelector(`input[name=kind][value=${nhs ? "nhs" : "mrn"}]`).checked = true;
    $("patient-id").value = nhs || text;
    checkTyped();
  } catch {
    $("patient-check").textContent = "No barcode could be read: try again in better light, or type the number.";
  }
}

async function findPatient(event) {
  event.preventDefault();
  $("patient-error").textContent = "";
  const kind = document.querySelector("input[name=kind]:checked").value;
  const value = $("patient-id").value.replace(/\s/g, "");
  if (kind === "nhs" && !nhsValid(value)) { $("patient-error").textContent = "That is not a valid NHS number."; return; }
  try {
    const found = await api(`/api/v1/patients?identifier=${encodeURIComponent(`${kind}|${value}`)}`);
    if (!found.items.length) { $("patient-error").textContent = "No patient with that number that you may photograph."; return; }
    app.patient = { ...found.items[0], ref: `${kind}|${value}` };
  } catch (err) { $("patient-error").textContent = `Could not look the patient up: ${err.message}`; return; }
  const p = app.patient;
  const nhs = (p.identifiers || []).find((i) => i.system === NHS_SYSTEM)?.value;
  $("banner-name").textContent = `${(p.name?.family || "").toUpperCase()}, ${p.name?.given || ""}`;
  $("banner-facts").replaceChildren(
    el("dt", { text: "Born" }), el("dd", { text: p.birthDate || "—" }),
    el("dt", { text: "NHS No." }), el("dd", { text: nhs ? `${nhs.slice(0, 3)} ${nhs.slice(3, 6)} ${nhs.slice(6)}` : "—" }),
    el("dt", { text: "Ward" }), el("dd", { text: p.currentEncounter?.location || "—" }));
  $("banner").hidden = false;
  $("banner").focus();
}

async function confirmPatient() {
  const p = app.patient;
  $("encounter").value = p.currentEncounter?.visitNumber || "";
  $("specialty").value = p.currentEncounter?.specialty || app.user.specialties[0] || "";
  try { app.consents = (await api(`/api/v1/consents?patient=${encodeURIComponent(p.ref)}`)).items.filter((c) => c.status === "active"); }
  catch { app.consents = []; }
  $("consent-existing").replaceChildren(...app.consents.map((c) => el("label", {},
    el("input", { type: "radio", name: "consent", value: c.id }), ` Existing consent: ${c.level}, given by ${c.givenBy}, ${c.date || ""}`)));
  renderSites("");
  show("step-details");
}

// ---------------------------------------------------------------- what the photos are

function renderSites(filter) {
  const words = filter.toLowerCase().split(/\s+/).filter(Boolean);
  const sites = app.options.body_sites.filter((s) => words.every((w) => s.display.toLowerCase().includes(w)));
  $("site-list").replaceChildren(...sites.slice(0, 40).map((s) => el("button", {
    type: "button", "aria-pressed": String(app.site?.code === s.code), text: s.display, onclick: () => chooseSite(s) })));
}

async function chooseSite(site) {
  app.site = site;
  $("site-chosen").textContent = `Chosen: ${site.display}`;
  $("laterality-box").hidden = !site.lateral;
  renderSites($("site-search").value);
  // earlier photos of this site that this user may see, to frame the new one the same way
  $("earlier-list").replaceChildren();
  try {
    const found = await api(`/api/v1/photos?patient=${encodeURIComponent(app.patient.ref)}&site=${site.code}&limit=6`);
    const thumbs = await Promise.all(found.items.filter((p) => p.links.thumbnail).map(async (p) => {
      const res = await fetch(p.links.thumbnail, { headers: { Authorization: `Bearer ${app.token}` }, cache: "no-store" });
      return el("img", { src: URL.createObjectURL(await res.blob()), alt: `Earlier photo, ${p.takenAt ? new Date(p.takenAt).toLocaleDateString("en-GB") : "date not known"}` });
    }));
    $("earlier").hidden = !thumbs.length;
    $("earlier-list").replaceChildren(...thumbs);
  } catch { $("earlier").hidden = true; }
}

function consentChoice() {
  return document.querySelector("input[name=consent]:checked")?.value || null;
}

function showWording() {
  $("consent-new").hidden = consentChoice() !== "new";
  $("consent-wording").textContent = app.options.consent_wording[$("consent-level").value] || "";
}

async function toPhotos() {
  $("details-error").textContent = "";
  const choice = consentChoice();
  const problem = !app.site ? "Choose the body site." :
    app.site.lateral && !document.querySelector("input[name=laterality]:checked") ? "Say which side." :
    !choice ? "Make a consent decision: an existing consent, a new one, or no consent recorded." :
    choice === "new" && !$("consent-read").checked ? "Confirm the consent wording was read to or by the patient." :
    $("specialty").value && !/^\d{3}$/.test($("specialty").value) ? "The specialty is a 3-digit treatment function code." : null;
  if (problem) { $("details-error").textContent = problem; return; }
  if (choice === "new") {
    try {
      const encounter = $("encounter").value.trim();
      const level = $("consent-level").value;
      const consent = await api("/api/v1/consents", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ patient: app.patient.ref, level, givenBy: $("consent-given-by").value, scope: encounter ? "encounter" : "patient",
          encounter: encounter || null, purposeNote: level === "publication" ? app.options.consent_wording.publication : null }) });
      app.consents.push(consent);
      app.consentId = consent.id;
    } catch (err) { $("details-error").textContent = `The consent was not recorded: ${err.message}`; return; }
  } else app.consentId = choice === "none" ? null : choice;
  show("step-photos");
}

function metadata() {
  const laterality = document.querySelector("input[name=laterality]:checked")?.value;
  return {
    patient: app.patient.ref,
    bodySite: { code: app.site.code, display: app.site.display.slice(0, 64), ...(app.site.lateral && laterality ? { laterality } : {}) },
    view: $("view").value || null, specialty: $("specialty").value || null, encounter: $("encounter").value.trim() || null,
    sensitivity: document.querySelector("input[name=sensitivity]:checked").value,
    consentId: app.consentId || null, photographer: app.user.name, device: navigator.userAgent.slice(0, 200),
  };
}

// ---------------------------------------------------------------- taking and sending photos

function addPhotos() {
  for (const file of $("camera").files) {
    app.taken.push({ id: crypto.randomUUID(), file, url: URL.createObjectURL(file), meta: metadata(), key: crypto.randomUUID(), state: "taken" });
  }
  $("camera").value = "";  // the file input forgets it: nothing kept outside this app
  renderTaken();
}

function renderTaken() {
  $("taken").replaceChildren(...app.taken.map((t, i) => el("li", {},
    el("img", { src: t.url, alt: `Photo ${i + 1}` }),
    el("div", {},
      el("progress", { max: "100", value: String(t.progress || 0), "aria-label": `Upload of photo ${i + 1}` }),
      el("p", { class: "hint", text: { taken: "Ready to upload", sending: "Uploading…", queued: "Waiting for signal", stored: "In the record", failed: t.error || "Refused" }[t.state] }),
      t.state === "taken" || t.state === "failed" ? el("button", { type: "button", text: "Discard", onclick: () => discard(t.id) }) : null))));
  $("upload").disabled = !app.taken.some((t) => t.state === "taken");
}

function discard(id) {
  const t = app.taken.find((x) => x.id === id);
  URL.revokeObjectURL(t.url);
  app.taken = app.taken.filter((x) => x.id !== id);
  renderTaken();
}

function send(meta, blob, name, idempotencyKey, onProgress) {
  // XMLHttpRequest: fetch reports no upload progress
  return new Promise((resolve) => {
    const form = new FormData();
    form.append("metadata", new Blob([JSON.stringify(meta)], { type: "application/json" }));
    form.append("files", blob, name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/v1/photos");
    xhr.setRequestHeader("Authorization", `Bearer ${app.token}`);
    xhr.setRequestHeader("Idempotency-Key", idempotencyKey);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(Math.round((e.loaded / e.total) * 100)); };
    xhr.onload = () => resolve({ status: xhr.status, body: (() => { try { return JSON.parse(xhr.responseText); } catch { return null; } })() });
    xhr.onerror = () => resolve({ status: 0, body: null });
    xhr.send(form);
  });
}

async function uploadAll() {
  for (const t of app.taken.filter((x) => x.state === "taken")) {
    t.state = "sending"; renderTaken();
    const result = await send(t.meta, t.file, t.file.name || "photo.jpg", t.key, (p) => { t.progress = p; renderTaken(); });
    if (result.status === 200 || result.status === 201) {
      t.state = "stored"; t.progress = 100;
      if (result.body?.warnings?.length) $("photos-status").textContent = result.body.warnings.join(" ");
    } else if (result.status === 0 || result.status >= 500) {
      await enqueue(t);  // no signal (or the gateway is down): kept encrypted, sent when the network is back
      t.state = "queued";
    } else {
      t.state = "failed"; t.error = result.body?.message || result.body?.detail || `Refused (${result.status})`;
    }
    renderTaken();
  }
  await refreshQueueCount();
}

// ---------------------------------------------------------------- the encrypted queue

function db() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore("queue", { keyPath: "id" });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function store(mode, work) {
  const conn = await db();
  try {
    return await new Promise((resolve, reject) => {
      const tx = conn.transaction("queue", mode);
      const result = work(tx.objectStore("queue"));
      tx.oncomplete = () => resolve(result.result);
      tx.onerror = () => reject(tx.error);
    });
  } finally { conn.close(); }
}

async function enqueue(t) {
  const meta = new TextEncoder().encode(JSON.stringify({ meta: t.meta, name: t.file.name || "photo.jpg", type: t.file.type, key: t.key }));
  const image = new Uint8Array(await t.file.arrayBuffer());
  const plain = new Uint8Array(4 + meta.length + image.length);
  new DataView(plain.buffer).setUint32(0, meta.length);
  plain.set(meta, 4);
  plain.set(image, 4 + meta.length);
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const sealed = await crypto.subtle.encrypt({ name: "AES-GCM", iv }, app.key, plain);
  await store("readwrite", (s) => s.put({ id: t.id, iv, sealed }));
}

async function queueCount() {
  // asking must not create the database: after sign-out the phone holds none
  const known = (await indexedDB.databases()).some((d) => d.name === DB_NAME);
  if (!known) return 0;
  try { return await store("readonly", (s) => s.count()); } catch { return 0; }
}

async function refreshQueueCount() {
  const n = await queueCount();
  $("queue").hidden = !n;
  $("queue").textContent = n ? `${n} waiting to upload` : "";
}

async function flushQueue() {
  if (app.sending || !app.token || !app.key) return;
  app.sending = true;
  try {
    if (!(await queueCount())) return;
    const items = await store("readonly", (s) => s.getAll());
    for (const item of items) {
      let plain;
      try { plain = new Uint8Array(await crypto.subtle.decrypt({ name: "AES-GCM", iv: item.iv }, app.key, item.sealed)); }
      catch { await store("readwrite", (s) => s.delete(item.id)); continue; }  // another session's key: unreadable, dropped
      const length = new DataView(plain.buffer).getUint32(0);
      const head = JSON.parse(new TextDecoder().decode(plain.slice(4, 4 + length)));
      const blob = new Blob([plain.slice(4 + length)], { type: head.type });
      const t = app.taken.find((x) => x.id === item.id);
      const result = await send(head.meta, blob, head.name, head.key, (p) => { if (t) { t.progress = p; renderTaken(); } });
      if (result.status === 200 || result.status === 201 || (result.status >= 400 && result.status < 500)) {
        await store("readwrite", (s) => s.delete(item.id));  // confirmed (or refused for good): gone from the phone
        if (t) { t.state = result.status < 300 ? "stored" : "failed"; t.error = result.body?.message; renderTaken(); }
      }
    }
  } finally {
    app.sending = false;
    await refreshQueueCount();
  }
}

async function eraseQueue() {
  if ((await indexedDB.databases()).some((d) => d.name === DB_NAME)) {
    try { await store("readwrite", (s) => s.clear()); } catch { /* unreadable: deleted at sign-out */ }
  }
  await refreshQueueCount();
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("dev-form").addEventListener("submit", devSignIn);
  $("sso").addEventListener("click", startSso);
  $("sign-out").addEventListener("click", () => signOut(false));
  $("confirm-erase").addEventListener("click", () => { $("confirm-dialog").close(); eraseEverything(); });
  $("confirm-keep").addEventListener("click", () => { clearTimeout(app.graceTimer); $("confirm-dialog").close(); touch(); });
  $("patient-id").addEventListener("input", checkTyped);
  for (const r of document.querySelectorAll("input[name=kind]")) r.addEventListener("change", checkTyped);
  $("patient-form").addEventListener("submit", findPatient);
  $("scan").addEventListener("change", scanWristband);
  $("confirm-patient").addEventListener("click", confirmPatient);
  $("reject-patient").addEventListener("click", () => { app.patient = null; $("banner").hidden = true; $("patient-id").focus(); });
  $("site-search").addEventListener("input", (e) => renderSites(e.target.value));
  $("consent-box").addEventListener("change", showWording);
  $("consent-level").addEventListener("change", showWording);
  $("to-photos").addEventListener("click", toPhotos);
  $("camera").addEventListener("change", addPhotos);
  $("upload").addEventListener("click", uploadAll);
  $("next-patient").addEventListener("click", () => {
    for (const t of app.taken.filter((x) => x.state === "stored")) URL.revokeObjectURL(t.url);
    app.taken = app.taken.filter((x) => x.state !== "stored");
    app.patient = null; app.site = null; $("banner").hidden = true; $("patient-id").value = ""; renderTaken(); show("step-patient");
  });
  window.addEventListener("online", flushQueue);
  for (const e of ["pointerdown", "keydown"]) document.addEventListener(e, touch, { passive: true });
  setInterval(() => { if (navigator.onLine) flushQueue(); }, 15_000);
}

document.addEventListener("DOMContentLoaded", start);
