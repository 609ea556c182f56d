// The capture app's service worker: keeps the app's own files for a poor signal, never anything of a patient
// (API answers and photos are never cached; queued photos live encrypted in IndexedDB, see app.js).
"use strict";
const SHELL = "clinphoto-capture-shell-v1";
const FILES = ["/capture/", "/capture/app.js", "/capture/app.css", "/capture/manifest.webmanifest", "/capture/icon.svg", "/capture/options"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys().then((keys) => Promise.all(keys.filter((k) => k !== SHELL).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== location.origin || !FILES.includes(url.pathname)) return;
  // network first (the newest app when there is signal), the kept copy when there is none
  event.respondWith(fetch(event.request).catch(() => caches.match(event.request)));
});
