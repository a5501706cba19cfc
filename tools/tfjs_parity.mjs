// Runs an exported TF.js graph model in Node on images from a .npy file and
// prints the probabilities as JSON, once per backend (cpu, wasm).
//
//   node tools/tfjs_parity.mjs --model runs/demo/tfjs --images imgs.npy [--backends cpu,wasm]
//
// imgs.npy: float32 little-endian, C order, shape [N, H, W, 3], RGB 0-255 (the
// model's own input). The model is read from disk with fs and handed to TF.js
// through tf.io.fromMemory: no fetch, no network, no native tfjs-node.
import fs from 'node:fs';
import path from 'node:path';
import {createRequire} from 'node:module';

const require = createRequire(import.meta.url);
const tf = require('@tensorflow/tfjs');
require('@tensorflow/tfjs-backend-wasm');

function parseArgs(argv) {
  const args = {backends: 'cpu,wasm', repeats: '1'};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      throw new Error(`bad argument ${argv[i]}; usage: --model DIR --images FILE.npy [--backends cpu,wasm]`);
    }
    args[argv[i].slice(2)] = argv[i + 1];
  }
  if (!args.model || !args.images) throw new Error('--model and --images are required');
  return args;
}

// The .npy v1/v2/v3 format: magic, version, header length, a Python dict literal.
function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.toString('latin1', 0, 6) !== '\x93NUMPY') throw new Error(`${file} is not a .npy file`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12);
  const header = buf.toString('latin1', start, start + headerLen);
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    throw new Error(`${file}: need float32 little-endian C-order data, header ${header.trim()}`);
  }
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(',').filter((s) => s.trim()).map(Number);
  const offset = start + headerLen;
  const data = new Float32Array(buf.buffer.slice(buf.byteOffset + offset, buf.byteOffset + buf.length));
  return {shape, data};
}

function loadArtifacts(dir) {
  const model = JSON.parse(fs.readFileSync(path.join(dir, 'model.json'), 'utf8'));
  const weightSpecs = [];
  const buffers = [];
  for (const group of model.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const p of group.paths) buffers.push(fs.readFileSync(path.join(dir, p)));
  }
  const all = Buffer.concat(buffers);
  return {
    modelTopology: model.modelTopology, format: model.format, generatedBy: model.generatedBy,
    convertedBy: model.convertedBy, signature: model.signature,
    userDefinedMetadata: model.userDefinedMetadata, weightSpecs,
    weightData: all.buffer.slice(all.byteOffset, all.byteOffset + all.length),
  };
}

async function runBackend(name, artifacts, images, repeats) {
  if (!(await tf.setBackend(name))) throw new Error(`TF.js backend ${name} failed to initialise`);
  await tf.ready();
  const model = await tf.loadGraphModel(tf.io.fromMemory(artifacts));
  const [n, h, w, c] = images.shape;
  const size = h * w * c;
  const probabilities = [];
  const times = [];
  for (let i = 0; i < n; i++) {
    const x = tf.tensor4d(images.data.subarray(i * size, (i + 1) * size), [1, h, w, c], 'float32');
    for (let r = 0; r < repeats; r++) {
      const t0 = performance.now();
      const y = model.predict(x);  // synchronous: fails if the graph needed executeAsync
      const p = y.dataSync();
      times.push(performance.now() - t0);
      if (r === 0) probabilities.push(Array.from(p));
      y.dispose();
    }
    x.dispose();
  }
  model.dispose();
  times.sort((a, b) => a - b);
  return {probabilities, median_ms: times[Math.floor(times.length / 2)]};
}

const args = parseArgs(process.argv.slice(2));
const artifacts = loadArtifacts(args.model);
const images = readNpy(args.images);
const out = {tfjs_version: tf.version.tfjs, n: images.shape[0], backends: {}};
for (const name of args.backends.split(',')) {
  out.backends[name] = await runBackend(name, artifacts, images, Number(args.repeats));
}
process.stdout.write(JSON.stringify(out) + '\n');
