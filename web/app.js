// Aplantida PWA: photo → TF.js graph model (FP16) → top-5 species, offline.
//
// The exported model expects float32 [1, H, W, 3] RGB in 0-255 and returns
// calibrated probabilities (normalisation and temperature are in the graph),
// so this file only crops, resizes and reads metadata.json / labels.json. Photos are drawn
// through <img>, which applies their EXIF orientation as the download stage does.
// `?backend=cpu|wasm|webgl` picks the TF.js backend (default wasm);
// `?model=path/` points at another export folder (default model/).
'use strict';

const params = new URLSearchParams(location.search);
const MODEL_DIR = params.get('model') || 'model/';
const BACKEND = params.get('backend') || 'wasm';
const TOP_K = 5;

const $ = (id) => document.getElementById(id);
const state = {model: null, metadata: null, labels: null, input: null};

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

// Python's round(): halves go to the even neighbour, so the crop is the eval transform's box.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// The eval transform in the browser's own antialiased resampler: the centre square of `fraction`
// of the short side, halved by drawImage while it is at least twice the input, then drawn at the
// input size. Only size×size pixels ever become a tensor (a 12 MP photo read whole by fromPixels
// is a ~146 MB int32 tensor, and resizeBilinear does not antialias). BUILD.md has the measurements.
function preprocess(image, size, fraction) {
  const width = image.naturalWidth || image.width;
  const height = image.naturalHeight || image.height;
  const side = Math.max(1, roundHalfEven(Math.min(width, height) * fraction));
  let [source, left, top, span] = [image, Math.floor((width - side) / 2), Math.floor((height - side) / 2), side];
  for (;;) {
    const target = span >= 2 * size ? Math.round(span / 2) : size;
    const canvas = new OffscreenCanvas(target, target);
    const context = canvas.getContext('2d', {willReadFrequently: target === size});
    context.imageSmoothingQuality = target > span ? 'low' : 'high';  // 'low' upsamples bilinearly, as Pillow does
    context.drawImage(source, left, top, span, span, 0, 0, target, target);
    if (target === size) {
      const pixels = context.getImageData(0, 0, size, size);
      return tf.tidy(() => tf.browser.fromPixels(pixels).toFloat().expandDims(0));
    }
    [source, left, top, span] = [canvas, 0, 0, target];
  }
}

function topK(probabilities, k) {
  return Array.from(probabilities.keys())
      .sort((a, b) => probabilities[b] - probabilities[a]).slice(0, k)
      .map((index) => ({index, probability: probabilities[index], ...state.labels[index]}));
}

function commonName(names) {
  if (!names) return '';
  const lang = (navigator.language || 'en').slice(0, 2);
  if (Array.isArray(names)) return names.map((n) => (Array.isArray(n) ? n[1] : n)).join(', ');
  return names[lang] || Object.values(names)[0] || '';
}

function show(top) {
  const threshold = state.metadata.threshold;
  const unsure = top[0].probability < threshold;
  $('verdict').textContent = unsure ? 'Not sure — the photo does not match any species well enough.'
                                    : `${top[0].species}`;
  $('verdict').className = unsure ? 'unsure' : '';
  $('verdict').dataset.unsure = String(unsure);
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
}

async function classifyImage(image) {
  const [, size] = state.metadata.input.shape;
  tf.dispose(state.input);
  state.input = preprocess(image, size, state.metadata.input.eval_crop_fraction || 1);
  const t0 = performance.now();
  const output = state.model.predict(state.input);
  const probabilities = await output.data();
  output.dispose();
  const top = topK(probabilities, TOP_K);
  show(top);
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
}), classifyImage, preprocess, benchmark, info};
