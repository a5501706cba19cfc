// Aplantida PWA: photo → TF.js graph model (FP16) → top-5 species, offline.
//
// The exported model expects float32 [1, H, W, 3] RGB in 0-255 and returns
// calibrated probabilities (normalisation and temperature are in the graph),
// so this file only hands a photo to preprocess.js (crop and resize, as the eval
// transform does), reweights by the user's region and reads metadata.json /
// labels.json / region_prior.json. Photos are drawn through <img>, which applies
// their EXIF orientation as the download stage does.
// `?backend=cpu|wasm|webgl` picks the TF.js backend (default wasm);
// `?model=path/` points at another export folder (default model/).
'use strict';

const params = new URLSearchParams(location.search);
const MODEL_DIR = params.get('model') || 'model/';
const BACKEND = params.get('backend') || 'wasm';
const TOP_K = 5;

const $ = (id) => document.getElementById(id);
const state = {model: null, metadata: null, labels: null, input: null, prior: null,
               region: '', probabilities: null};
const REGION_KEY = 'aplantida.region';

function setStatus(text) { $('status').textContent = text; }

async function fetchJson(path) {
  const response = await fetch(MODEL_DIR + path);
  if (!response.ok) throw new Error(`${MODEL_DIR + path}: HTTP ${response.status}`);
  return response.json();
}

async function initBackend() {
  tf.wasm.setWasmPaths(new URL('vendor/tfjs-backend-wasm/dist/', location.href).href);
  if (!(await tf.setBackend(BACKEND))) {
    console.warn(`backend ${BACKEND} unavailable, using cpu`);
    await tf.setBackend('cpu');
  }
  await tf.ready();
}

// The region prior (metadata.json region_prior, fitted by the evaluate stage):
// p(y | x, r) = softmax(scale · log p(y | x) + strength · log_ratio[r]); '' = ignore location.
// On the model's output rather than in the graph, so changing region re-runs no model.
function applyPrior(probabilities, prior, region) {
  if (!prior || !region) return Float32Array.from(probabilities);
  const logRatio = prior.regions[region].log_ratio;
  const z = Array.from(probabilities, (p, c) => prior.scale * Math.log(Math.max(p, 1e-30)) +
                                               prior.strength * logRatio[c]);
  const high = Math.max(...z);
  const e = z.map((v) => Math.exp(v - high));
  const sum = e.reduce((a, b) => a + b, 0);
  return Float32Array.from(e, (v) => v / sum);
}

// The user's country from the language tag (es-ES → ES), else Spain's time zones; the region
// with the fewest countries that lists it, or '' (ignore location) when none does.
function defaultRegion(prior) {
  const tag = (navigator.language || '').split('-');
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || '';
  const country = tag.length > 1 ? tag[tag.length - 1].toUpperCase()
      : ['Europe/Madrid', 'Atlantic/Canary', 'Africa/Ceuta'].includes(zone) ? 'ES' : '';
  const matching = Object.entries(prior.regions).filter(([, r]) => r.countries.includes(country));
  matching.sort((a, b) => a[1].countries.length - b[1].countries.length);
  return matching.length ? matching[0][0] : '';
}

function setupRegion() {
  const select = $('region');
  if (!state.prior) return;
  const names = Object.keys(state.prior.regions);
  const label = (name) => name.charAt(0).toUpperCase() + name.slice(1).replace(/_/g, ' ');
  select.replaceChildren(new Option('Ignore location (travel, gardens)', ''),
                         ...names.map((name) => new Option(label(name), name)));
  const saved = localStorage.getItem(REGION_KEY);
  state.region = saved !== null && (saved === '' || names.includes(saved)) ? saved
                                                                           : defaultRegion(state.prior);
  select.value = state.region;
  $('region-picker').hidden = false;
  select.addEventListener('change', () => {
    state.region = select.value;
    localStorage.setItem(REGION_KEY, state.region);
    if (state.probabilities) show();
  });
}

// Genus = the binomial's first word; a name that is not one ('bluebell') has none.
function groupOf(label, level) {
  if (level === 'family') return label.family || '';
  const words = label.species.split(/\s+/);
  return words.length > 1 ? words[0] : '';
}

// The deepest useful answer (evaluation/rollup.py): the species when its probability reaches
// `threshold`; else the genus, then the family, whose summed probability reaches its own
// threshold (rollup.genus / rollup.family, null = never); else the top rollup.set_size species.
function answer(probabilities, labels, threshold, rollup) {
  const order = Array.from(probabilities.keys()).sort((a, b) => probabilities[b] - probabilities[a]);
  const best = order[0];
  if (probabilities[best] >= threshold) {
    return {level: 'species', name: labels[best].species, probability: probabilities[best]};
  }
  for (const level of ['genus', 'family']) {
    const levelThreshold = rollup ? rollup[level] : null;
    if (levelThreshold === null || levelThreshold === undefined) continue;
    const mass = new Map();  // insertion follows `order`: ties go to the more probable species
    for (const c of order) {
      const group = groupOf(labels[c], level);
      if (group) mass.set(group, (mass.get(group) || 0) + probabilities[c]);
    }
    let top = null;
    for (const [group, m] of mass) if (!top || m > top.probability) top = {name: group, probability: m};
    if (top && top.probability >= levelThreshold) return {level, ...top};
  }
  const members = order.slice(0, (rollup && rollup.set_size) || 3);
  return {level: 'set', names: members.map((c) => labels[c].species),
          probability: members.reduce((sum, c) => sum + probabilities[c], 0)};
}

function topK(probabilities, k) {
  return Array.from(probabilities.keys())
      .sort((a, b) => probabilities[b] - probabilities[a]).slice(0, k)
      .map((index) => ({index, probability: probabilities[index], ...state.labels[index]}));
}

// The catalog's common names in the page's language (else the first language listed).
function commonName(names) {
  if (!names) return '';
  const lang = (navigator.language || 'en').slice(0, 2);
  if (Array.isArray(names)) return names.map((n) => (Array.isArray(n) ? n[1] : n)).join(', ');
  const chosen = names[lang] || Object.values(names)[0] || '';
  return Array.isArray(chosen) ? chosen.join(', ') : chosen;
}

// The answer and top 5 for the last photo's output, under the region in use.
function show() {
  const probabilities = applyPrior(state.probabilities, state.prior, state.region);
  const fitted = state.prior && state.region ? state.prior : state.metadata;  // each has its own
  const result = answer(probabilities, state.labels, fitted.threshold, fitted.rollup);
  const percent = (p) => `${(100 * p).toFixed(0)}%`;
  const text = {
    species: () => result.name,
    genus: () => `Not sure of the species: genus ${result.name} (${percent(result.probability)})`,
    family: () => `Not sure of the species: family ${result.name} (${percent(result.probability)})`,
    set: () => `Not sure — one of these: ${result.names.join(', ')}`,
  }[result.level]();
  const unsure = result.level !== 'species';
  document.body.dataset.region = state.region;
  $('verdict').textContent = text;
  $('verdict').className = unsure ? 'unsure' : '';
  $('verdict').dataset.unsure = String(unsure);
  $('verdict').dataset.level = result.level;
  const top = topK(probabilities, TOP_K);
  $('results').replaceChildren(...top.map((entry) => {
    const li = document.createElement('li');
    li.dataset.index = entry.index;
    li.dataset.probability = entry.probability;
    li.innerHTML = '<span class="p"></span><i class="name"></i> <span class="common"></span>';
    li.querySelector('.name').textContent = entry.species;
    li.querySelector('.common').textContent = commonName(entry.common_names);
    li.querySelector('.p').textContent = `${(100 * entry.probability).toFixed(1)}%`;
    return li;
  }));
  return top;
}

async function classifyImage(image) {
  const [, size] = state.metadata.input.shape;
  tf.dispose(state.input);
  state.input = preprocess(image, size, state.metadata.input.eval_crop_fraction || 1);
  const t0 = performance.now();
  const output = state.model.predict(state.input);
  state.probabilities = await output.data();
  output.dispose();
  const top = show();
  document.body.dataset.state = 'classified';
  setStatus(`${state.status} · ${(performance.now() - t0).toFixed(1)} ms`);
  return top;
}

// Median latency of `runs` predictions on the last photo (input already on the backend).
async function benchmark(runs = 20) {
  const times = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const output = state.model.predict(state.input);
    await output.data();
    times.push(performance.now() - t0);
    output.dispose();
  }
  times.sort((a, b) => a - b);
  return {runs, median_ms: times[Math.floor(runs / 2)], min_ms: times[0], max_ms: times[runs - 1],
          ...info()};
}

function info() {
  return {backend: tf.getBackend(), crossOriginIsolated: self.crossOriginIsolated === true,
          threads: tf.getBackend() === 'wasm' ? tf.wasm.getThreadsCount() : null};
}

function onPhoto(event) {
  const file = event.target.files[0];
  if (!file) return;
  const preview = $('preview');
  preview.onload = () => classifyImage(preview).catch((error) => setStatus(`Error: ${error.message}`));
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
}

async function init() {
  await initBackend();
  [state.metadata, state.labels] = await Promise.all([fetchJson('metadata.json'), fetchJson('labels.json')]);
  if (state.metadata.region_prior) state.prior = await fetchJson(state.metadata.region_prior);
  setupRegion();
  state.model = await tf.loadGraphModel(MODEL_DIR + 'model.json');
  tf.tidy(() => state.model.predict(tf.zeros(state.metadata.input.shape)));  // warm-up (compiles kernels)
  const i = info();
  state.status = `${state.metadata.num_classes} species · backend ${i.backend}` +
      (i.threads ? ` · ${i.threads} threads` : '') + (i.crossOriginIsolated ? ' · isolated' : '');
  setStatus(state.status);
  $('photo').disabled = false;
  $('photo').addEventListener('change', onPhoto);
  document.body.dataset.state = 'ready';
}

if ('serviceWorker' in navigator) {
  navigator.serviceWorker.register('sw.js').catch((error) => console.warn('service worker:', error));
}
window.aplantida = {ready: init().catch((error) => {
  document.body.dataset.state = 'error';
  setStatus(`Could not load the model: ${error.message}`);
  throw error;
}), classifyImage, preprocess, applyPrior, answer, benchmark, info};
