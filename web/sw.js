// Service worker: keeps the page, TF.js and the model on the device so the
// second visit works offline. Network first (a re-exported model is picked up
// at once when online), the cache when the network fails.
'use strict';

const CACHE = 'aplantida-v1';
const SHELL = [
  './', 'index.html', 'preprocess.js', 'app.js', 'manifest.webmanifest', 'icon.svg',
  'vendor/tfjs/dist/tf.min.js',
  'vendor/tfjs-backend-wasm/dist/tf-backend-wasm.min.js',
  'vendor/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm',
  'vendor/tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm',
  'vendor/tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm',
  'model/model.json', 'model/metadata.json', 'model/labels.json',
];

async function precache() {
  const cache = await caches.open(CACHE);
  await cache.addAll(SHELL);
  const model = await (await cache.match('model/model.json')).json();
  const shards = model.weightsManifest.flatMap((group) => group.paths.map((p) => 'model/' + p));
  const metadata = await (await cache.match('model/metadata.json')).json();
  await cache.addAll([...shards, ...(metadata.region_prior ? ['model/' + metadata.region_prior] : [])]);
}

self.addEventListener('install', (event) => {
  event.waitUntil(precache().then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) if (key !== CACHE) await caches.delete(key);
    await self.clients.claim();
  })());
});

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (error) {
    const cached = await cache.match(request, {ignoreSearch: true});
    if (cached) return cached;
    throw error;
  }
}

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== location.origin) return;
  event.respondWith(networkFirst(event.request));
});
