// The point-of-care viewer: the launch's photos grouped, one full size with zoom and pan, two side by side with
// their zoom and pan in step, details, and emergency access. Plain JS, no library: everything comes from this
// gateway, through the session cookie the launch set (the page never holds a token).
"use strict";

const state = { session: null, photos: [], byId: new Map(), chosen: [], compare: false, zoom: 1, x: 0, y: 0 };
const $ = (id) => document.getElementById(id);
const CSRF = { "X-Clinphoto-Viewer": "1" };

async function getJson(url) {
  const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!res.ok) throw new Error((await res.json().catch(() => ({}))).detail || `${res.status}`);
  return res.json();
}

function say(text) {
  $("status").textContent = text;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { $("status").textContent = ""; }, 4000);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const nhsFormat = (n) => (n && n.length === 10 ? `${n.slice(0, 3)} ${n.slice(3, 6)} ${n.slice(6)}` : n || "—");
const dateText = (iso) => (iso ? new Date(iso).toLocaleDateString("en-GB", { day: "numeric", month: "short", year: "numeric" }) : "date not known");
const timeText = (iso) => (iso ? new Date(iso).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" }) : "—");
const siteText = (p) => [p.bodySite.display || p.bodySite.code, p.bodySite.laterality].filter(Boolean).join(", ") || "body site not recorded";
const SENSITIVITY = { N: "Normal", R: "Restricted", V: "Very restricted" };

function renderBanner(s) {
  const p = s.patient;
  if (!p) {
    $("patient").replaceChildren(el("span", { class: "name", text: "Patient details are not available to you" }));
  } else {
  const name = `${(p.familyName || "").toUpperCase()}, ${p.givenNames || ""}`;
  $("patient").replaceChildren(
    el("span", { class: "name", text: name }),
    el("dl", {},
      el("dt", { text: "Born" }), el("dd", { text: p.birthDate ? dateText(p.birthDate) : "—" }),
      el("dt", { text: "NHS No." }), el("dd", { text: nhsFormat(p.nhsNumber) }),
      el("dt", { text: "Sex" }), el("dd", { text: p.sex || "—" })));
  }
  $("user").textContent = `${s.user.name} (${s.user.role})`;
  $("glass-state").hidden = !s.breakGlass;
  $("glass-state").textContent = s.breakGlass ? "Emergency access on" : "";
  $("break-glass").hidden = Boolean(s.breakGlass);
}

function groupKey(p, by) {
  if (by === "encounter") return p.encounter ? `Encounter ${p.encounter}` : "No encounter";
  if (by === "site") return siteText(p);
  return dateText(p.takenAt || p.storedAt);
}

function renderStrip() {
  const by = $("group-by").value;
  const groups = new Map();
  for (const p of state.photos) {
    const key = groupKey(p, by);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(p);
  }
  $("count").textContent = `${state.photos.length} photo${state.photos.length === 1 ? "" : "s"} you may see`;
  const out = [];
  for (const [key, photos] of groups) {
    const thumbs = photos.map((p) => el("button", {
      type: "button", class: "thumb", "data-id": p.id, "aria-pressed": String(state.chosen.includes(p.id)),
      "aria-label": `${siteText(p)}, ${timeText(p.takenAt || p.storedAt)}${p.sensitivity !== "N" ? `, ${SENSITIVITY[p.sensitivity]}` : ""}${p.careOnly ? ", care only" : ""}`,
      onclick: () => choose(p.id), onkeydown: (e) => thumbKeys(e),
    }, el("img", { src: p.thumbnail, alt: "", loading: "lazy" }),
    p.careOnly ? el("span", { class: "badge", text: "care only" }) : null,
    p.sensitivity !== "N" ? el("span", { class: "badge sens", text: p.sensitivity }) : null));
    out.push(el("section", { class: "group", "aria-label": key }, el("h2", { text: `${key} (${photos.length})` }), el("div", { class: "thumbs" }, ...thumbs)));
  }
  $("groups").replaceChildren(...out);
}

function thumbKeys(event) {
  // arrow keys move between thumbnails in the order shown (Tab also reaches each one)
  const all = [...document.querySelectorAll(".thumb")];
  const at = all.indexOf(event.currentTarget);
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
  if (step && all[at + step]) { event.preventDefault(); all[at + step].focus(); }
}

function choose(id) {
  const photo = state.byId.get(id);
  if (state.compare) {
    if (state.chosen.includes(id)) state.chosen = state.chosen.filter((c) => c !== id);
    else {
      const other = state.chosen.length ? state.byId.get(state.chosen[0]) : null;
      if (other && other.bodySite.code !== photo.bodySite.code) { say("Compare photos of the same body site"); return; }
      state.chosen = [...state.chosen, id].slice(-2);
    }
  } else state.chosen = [id];
  state.zoom = 1; state.x = 0; state.y = 0;
  renderStrip();
  renderPanes();
  renderDetails();
  const again = document.querySelector(`.thumb[data-id="${id}"]`);
  if (again) again.focus();
}

function renderPanes() {
  const photos = state.chosen.map((id) => state.byId.get(id)).sort((a, b) => (a.takenAt || "").localeCompare(b.takenAt || ""));
  if (!photos.length) { $("panes").replaceChildren(el("p", { class: "hint", text: state.compare ? "Choose two photos of the same body site." : "Choose a photo." })); return; }
  $("panes").replaceChildren(...photos.map((p) => {
    const img = el("img", { src: p.preview, alt: `${siteText(p)}, taken ${timeText(p.takenAt)}`, draggable: "false" });
    img.dataset.id = p.id;
    img.addEventListener("load", () => { if (!img.dataset.fitted) { img.dataset.fitted = "1"; applyTransform(); } });
    const pane = el("div", { class: "pane", tabindex: "0", role: "group",
      "aria-label": `${siteText(p)}, ${timeText(p.takenAt)}. Arrow keys pan, plus and minus zoom.` },
    img, el("div", { class: "caption", text: `${siteText(p)} · ${timeText(p.takenAt || p.storedAt)}` }),
    p.sensitivity !== "N" ? el("span", { class: "mark", text: `${SENSITIVITY[p.sensitivity]}: watermarked` }) : null);
    attachPanZoom(pane);
    return pane;
  }));
  applyTransform();
}

function fitScale(img, pane) {
  const w = img.naturalWidth || 1, h = img.naturalHeight || 1;
  return Math.min(pane.clientWidth / w, pane.clientHeight / h);
}

function applyTransform() {
  // every pane shows the same zoom and pan (side-by-side comparison stays in step)
  for (const pane of document.querySelectorAll(".pane")) {
    const img = pane.querySelector("img");
    if (!img.naturalWidth) continue;
    const base = fitScale(img, pane) * (img.dataset.scaleFix ? Number(img.dataset.scaleFix) : 1);
    const s = base * state.zoom;
    const left = (pane.clientWidth - img.naturalWidth * s) / 2 + state.x;
    const top = (pane.clientHeight - img.naturalHeight * s) / 2 + state.y;
    img.style.transform = `translate(${left}px, ${top}px) scale(${s})`;
    deepZoom(img);
  }
  $("zoom-level").textContent = `${Math.round(state.zoom * 100)}%`;
}

function deepZoom(img) {
  // past 2.5x the preview's pixels run out: the full-resolution image, when this user may have it
  const p = state.byId.get(img.dataset.id);
  if (state.zoom >= 2.5 && p.original && img.getAttribute("src") !== p.original) {
    const previewWidth = img.naturalWidth;
    const full = new Image();
    full.onload = () => {
      img.dataset.scaleFix = String(previewWidth / full.naturalWidth);
      img.src = p.original;
      img.onload = () => applyTransform();
    };
    full.src = p.original;
  }
}

function zoomBy(factor) {
  state.zoom = Math.min(16, Math.max(1, state.zoom * factor));
  if (state.zoom === 1) { state.x = 0; state.y = 0; }
  applyTransform();
}

function attachPanZoom(pane) {
  let drag = null;
  pane.addEventListener("pointerdown", (e) => { drag = { x: e.clientX - state.x, y: e.clientY - state.y }; pane.setPointerCapture(e.pointerId); });
  pane.addEventListener("pointermove", (e) => { if (drag) { state.x = e.clientX - drag.x; state.y = e.clientY - drag.y; applyTransform(); } });
  pane.addEventListener("pointerup", () => { drag = null; });
  pane.addEventListener("wheel", (e) => { e.preventDefault(); zoomBy(e.deltaY < 0 ? 1.25 : 0.8); }, { passive: false });
  pane.addEventListener("keydown", (e) => {
    const pan = { ArrowLeft: [40, 0], ArrowRight: [-40, 0], ArrowUp: [0, 40], ArrowDown: [0, -40] }[e.key];
    if (pan) { e.preventDefault(); state.x += pan[0]; state.y += pan[1]; applyTransform(); }
    else if (e.key === "+" || e.key === "=") { e.preventDefault(); zoomBy(1.25); }
    else if (e.key === "-") { e.preventDefault(); zoomBy(0.8); }
    else if (e.key === "0") { e.preventDefault(); state.zoom = 1; state.x = 0; state.y = 0; applyTransform(); }
  });
}

function renderDetails() {
  const photos = state.chosen.map((id) => state.byId.get(id));
  if (!photos.length) { $("details").replaceChildren(el("p", { class: "hint", text: "No photo chosen." })); return; }
  $("details").replaceChildren(...photos.map((p) => {
    const rows = [
      ["Body site", siteText(p)], ["View", p.view || "—"], ["Specialty", p.specialty || "—"],
      ["Sensitivity", `${SENSITIVITY[p.sensitivity] || p.sensitivity} (${p.sensitivity})`],
      ["Consent", p.consent ? `${p.consent.level}${p.consent.status !== "active" ? ` (${p.consent.status})` : ""}` : "none recorded"],
      ["Photographer", p.photographer || "—"], ["Taken", timeText(p.takenAt)], ["Device", p.device || "—"],
      ["Encounter", p.encounter || "—"], ["Size", p.width ? `${p.width} × ${p.height}` : "—"],
    ];
    return el("section", { "aria-label": `Details of ${siteText(p)}` },
      p.careOnly ? el("p", { class: "care-only", text: "Care only: consent for teaching was withdrawn. Do not use for teaching or publication." }) : null,
      el("dl", {}, ...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])),
      p.description ? el("p", { text: p.description }) : null);
  }));
}

async function loadPhotos() {
  const found = await getJson("/viewer/api/photos");
  state.photos = found.items;
  state.byId = new Map(found.items.map((p) => [p.id, p]));
  state.chosen = state.chosen.filter((id) => state.byId.has(id));
  renderStrip();
  renderPanes();
  renderDetails();
}

async function breakGlass(event) {
  event.preventDefault();
  const reason = $("glass-reason").value.trim();
  if (!reason) { $("glass-error").textContent = "Say why emergency access is needed."; $("glass-reason").focus(); return; }
  const res = await fetch("/viewer/api/break-glass", { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", ...CSRF }, body: JSON.stringify({ reason }) });
  if (!res.ok) { $("glass-error").textContent = (await res.json().catch(() => ({}))).detail || "Refused"; return; }
  $("glass-dialog").close();
  state.session = await getJson("/viewer/api/session");
  renderBanner(state.session);
  await loadPhotos();
  say("Emergency access on: recorded in the audit trail");
}

async function start() {
  $("group-by").addEventListener("change", renderStrip);
  $("compare-mode").addEventListener("change", (e) => { state.compare = e.target.checked; state.chosen = state.chosen.slice(0, 1); renderStrip(); renderPanes(); renderDetails(); });
  $("zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("zoom-reset").addEventListener("click", () => { state.zoom = 1; state.x = 0; state.y = 0; applyTransform(); });
  $("break-glass").addEventListener("click", () => { $("glass-error").textContent = ""; $("glass-dialog").showModal(); $("glass-reason").focus(); });
  $("glass-cancel").addEventListener("click", () => $("glass-dialog").close());
  $("glass-form").addEventListener("submit", breakGlass);
  $("sign-out").addEventListener("click", async () => {
    await fetch("/viewer/api/sign-out", { method: "POST", credentials: "same-origin", headers: CSRF });
    document.body.replaceChildren(el("main", {}, el("p", { class: "hint", text: "Signed out. Open the viewer from the patient record again." })));
  });
  window.addEventListener("resize", applyTransform);
  try {
    state.session = await getJson("/viewer/api/session");
    renderBanner(state.session);
    await loadPhotos();
  } catch (err) {
    $("patient").textContent = `Cannot show photos: ${err.message}`;
  }
}

document.addEventListener("DOMContentLoaded", start);
