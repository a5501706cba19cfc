"""Browser preprocessing: ways to shrink a phone photo in Chromium, against the eval transform.

Each method crops the eval transform's centre square and resizes it to the
model's input in the page; its pixels are compared with
`input_pipeline.centre_crop` of the same JPEG on the full decode (what a page
can decode), and both inputs go through the same TF.js model in the page, so
the probability difference isolates the preprocessing. "shipped" is
`aplantida.preprocess` from web/app.js (Pillow's resampler, ported);
"eval_transform_draft" is JAX's own `centre_crop` with its DCT draft, a
shortcut no page can take, whose distance is the floor any page method meets
against it. With a JAX serving function, the shipped input's TF.js
probabilities are also compared with JAX's on the reference input. BUILD.md
"Browser preprocessing" has the results.
"""

import base64
import glob
import os

import numpy as np
from PIL import Image

from aplantida_jax import fileio
from aplantida_jax.data import demo_data
from aplantida_jax.export import browser_bench
from aplantida_jax.train import input_pipeline

# (width, height) of the flowers12 photos once upscaled: 3, 6 and 12 MP, landscape and portrait.
PHONE_SIZES = ((2000, 1500), (2828, 2121), (4000, 3000), (3000, 4000))
DRAWN_SIDES = (1800, 1800, 3464)  # demo plants drawn at 3.2 and 12 MP, with per-pixel sensor noise

CANDIDATES_JS = """
const cropSide = (img, fr) => Math.max(1, Math.round(Math.min(img.naturalWidth, img.naturalHeight) * fr));
window.resizeCandidates = {
  shipped: (img, size, fr) => aplantida.preprocess(img, size, fr),
  canvas_halving: (img, size, fr) => {  // shipped until the Pillow port
    const side = cropSide(img, fr);
    let [source, left, top, span] = [img, Math.floor((img.naturalWidth - side) / 2),
                                     Math.floor((img.naturalHeight - side) / 2), side];
    for (;;) {
      const target = span >= 2 * size ? Math.round(span / 2) : size;
      const canvas = new OffscreenCanvas(target, target);
      const ctx = canvas.getContext('2d', {willReadFrequently: target === size});
      ctx.imageSmoothingQuality = target > span ? 'low' : 'high';
      ctx.drawImage(source, left, top, span, span, 0, 0, target, target);
      if (target === size) {
        return tf.tidy(() => tf.browser.fromPixels(ctx.getImageData(0, 0, size, size)).toFloat().expandDims(0));
      }
      [source, left, top, span] = [canvas, 0, 0, target];
    }
  },
  one_draw_high: (img, size, fr) => {
    const w = img.naturalWidth, h = img.naturalHeight, side = cropSide(img, fr);
    const ctx = new OffscreenCanvas(size, size).getContext('2d');
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(img, Math.floor((w - side) / 2), Math.floor((h - side) / 2), side, side, 0, 0, size, size);
    return tf.tidy(() => tf.browser.fromPixels(ctx.getImageData(0, 0, size, size)).toFloat().expandDims(0));
  },
  read_whole_resize_bilinear: (img, size, fr) => tf.tidy(() => {
    const px = tf.browser.fromPixels(img);
    const [h, w] = px.shape, side = cropSide(img, fr);
    const crop = px.slice([Math.floor((h - side) / 2), Math.floor((w - side) / 2), 0], [side, side, 3]);
    return tf.image.resizeBilinear(crop, [size, size]).toFloat().expandDims(0);
  }),
};
window.compareResize = async (b64, size, fr, reference, draft) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const img = new Image();
  img.src = URL.createObjectURL(new Blob([bytes], {type: 'image/jpeg'}));
  await img.decode();
  const model = await (window.benchModel ||= tf.loadGraphModel('model/model.json'));
  const probs = (x) => tf.tidy(() => model.predict(x)).data().then(Array.from);
  const fromArray = async (pixels) => {
    const input = tf.tensor(pixels, [1, size, size, 3]);
    const p = await probs(input);
    input.dispose();
    return p;
  };
  const out = {reference_probs: await fromArray(reference),
               eval_transform_draft: {pixels: draft, probs: await fromArray(draft), ms: 0, peak_bytes: 0}};
  for (const [name, fn] of Object.entries(resizeCandidates)) {
    fn(img, size, fr).dispose();  // warm-up
    const t0 = performance.now();
    let input;
    const before = tf.memory().numBytes;  // peakBytes counts what was held before (the model)
    const profile = await tf.profile(() => (input = fn(img, size, fr)));
    const ms = performance.now() - t0;
    // peakBytes: the most held while a kernel ran (-Infinity when none did); the input at the end.
    const peak = Math.max(profile.peakBytes, before + profile.newBytes);
    out[name] = {pixels: Array.from(await input.data()), probs: await probs(input), ms,
                 peak_bytes: peak - before};
    input.dispose();
  }
  return out;
};
"""


def imagenet_export(pretrained_dir: str, out_dir: str, image_size: int) -> str:
  """The ImageNet Lite0 (tools/import_pretrained.py) as a TF.js folder the page loads.

  1,000 classes that mostly do not name flowers12's species: a model that is often unsure
  on these photos, which the task-trained exports are not.
  """
  from aplantida_jax import models  # pylint: disable=g-import-not-at-top
  from aplantida_jax.export import convert  # pylint: disable=g-import-not-at-top
  from aplantida_jax.models import pretrained  # pylint: disable=g-import-not-at-top

  variables, provenance = pretrained.load_pretrained(pretrained_dir)
  classes = provenance["num_classes"]
  convert.export(
    models.get_model(provenance["arch"], num_classes=classes),
    variables,
    image_size=image_size,
    out_dir=out_dir,
  )
  shape = [1, image_size, image_size, 3]
  fileio.write_json(
    os.path.join(out_dir, "metadata.json"),
    {
      "input": {"shape": shape, "eval_crop_fraction": 0.875},
      "num_classes": classes,
      "threshold": 0.5,
      "region_prior": None,
      "rollup": None,
    },
  )
  fileio.write_json(
    os.path.join(out_dir, "labels.json"),
    [
      {"index": i, "species": f"ImageNet class {i}", "common_names": {}, "family": ""}
      for i in range(classes)
    ],
  )
  return out_dir


def imagenet_jax_fn(pretrained_dir: str):
  """The same import's JAX serving function: uint8 [H, W, 3] → its 1,000 probabilities."""
  import jax  # pylint: disable=g-import-not-at-top

  from aplantida_jax import models  # pylint: disable=g-import-not-at-top
  from aplantida_jax.export import serving  # pylint: disable=g-import-not-at-top
  from aplantida_jax.models import pretrained  # pylint: disable=g-import-not-at-top

  variables, provenance = pretrained.load_pretrained(pretrained_dir)
  model = models.get_model(provenance["arch"], num_classes=provenance["num_classes"])
  serve = jax.jit(serving.serving_fn(model))
  return lambda image: np.asarray(serve(variables, np.asarray(image, np.float32)[None]))[0]


def phone_photos(folder: str, flowers_dir: str) -> list:
  """Writes JPEGs of 3–12 MP (flowers12 upscaled, demo plants drawn) to `folder`; their paths."""
  flowers = sorted(glob.glob(os.path.join(flowers_dir, "*", "*.jpg")))[::60][:8]
  images = []
  for i, path in enumerate(flowers):
    width, height = PHONE_SIZES[i % len(PHONE_SIZES)]
    image = Image.open(path).convert("RGB")
    short = min(image.size)
    crop = (short, short * height // width) if width > height else (short * width // height, short)
    images.append((f"flowers{i}", image.crop((0, 0, *crop)).resize((width, height), Image.LANCZOS)))
  rng = np.random.default_rng(0)
  for i, side in enumerate(DRAWN_SIDES):
    images.append((f"drawn{i}", demo_data.draw_plant(demo_data.SPECIES[5 * i], rng, side)))
  paths = []
  for name, image in images:
    paths.append(os.path.join(folder, f"{name}_{image.size[0]}x{image.size[1]}.jpg"))
    image.save(paths[-1], quality=90)
  return paths


def compare(tfjs_dir: str, photos: list, jax_fn=None) -> dict:
  """Per method: mean |Δ| pixels (median and worst photo), max |Δp|, top-1 agreement, ms, peak.

  `jax_fn` (uint8 [H, W, 3] → probabilities), when given, adds the shipped path's TF.js
  probabilities against JAX's on the reference input: the preprocessing and FP16 together.
  """
  metadata = fileio.read_json(os.path.join(tfjs_dir, "metadata.json"))
  size, fraction = metadata["input"]["shape"][1], metadata["input"]["eval_crop_fraction"]
  rows, vs_jax = {}, {"dp": [], "top1": []}
  with browser_bench.pwa_page(tfjs_dir, CANDIDATES_JS) as page:
    for path in photos:
      with open(path, "rb") as f:
        jpeg = f.read()
      reference = input_pipeline.centre_crop(jpeg, size, fraction, draft=False)
      draft = input_pipeline.centre_crop(jpeg, size, fraction)
      out = page.evaluate(
        "([b64, size, fr, ref, draft]) => compareResize(b64, size, fr, ref, draft)",
        [
          base64.b64encode(jpeg).decode(),
          size,
          fraction,
          reference.ravel().tolist(),
          draft.ravel().tolist(),
        ],
      )
      ref_probs = np.asarray(out.pop("reference_probs"))
      for name, r in out.items():
        row = rows.setdefault(name, {"pixel": [], "dp": [], "top1": [], "ms": [], "peak": []})
        row["pixel"].append(float(np.abs(np.asarray(r["pixels"]) - reference.ravel()).mean()))
        row["dp"].append(float(np.abs(np.asarray(r["probs"]) - ref_probs).max()))
        row["top1"].append(int(np.argmax(r["probs"]) == np.argmax(ref_probs)))
        row["ms"].append(r["ms"])
        row["peak"].append(r["peak_bytes"])
      if jax_fn is not None:
        jax_probs, shipped = np.asarray(jax_fn(reference)), np.asarray(out["shipped"]["probs"])
        vs_jax["dp"].append(float(np.abs(shipped - jax_probs).max()))
        vs_jax["top1"].append(int(np.argmax(shipped) == np.argmax(jax_probs)))
  result = {
    "model": tfjs_dir,
    "input_size": size,
    "photos": [os.path.basename(p) for p in photos],
    "methods": {
      name: {
        "pixel_mean_abs_diff_median": float(np.median(r["pixel"])),
        "pixel_mean_abs_diff_worst": float(np.max(r["pixel"])),
        "max_abs_prob_diff": float(np.max(r["dp"])),
        "top1_agreement": float(np.mean(r["top1"])),
        "median_ms": float(np.median(r["ms"])),
        "peak_tensor_mb": float(np.max(r["peak"]) / 1e6),
        "per_photo_max_abs_prob_diff": [round(d, 4) for d in r["dp"]],
        "per_photo_pixel_mean_abs_diff": [round(d, 2) for d in r["pixel"]],
        "per_photo_top1_agrees": r["top1"],
      }
      for name, r in rows.items()
    },
  }
  if jax_fn is not None:
    result["shipped_vs_jax"] = {
      "max_abs_prob_diff": float(np.max(vs_jax["dp"])),
      "top1_agreement": float(np.mean(vs_jax["top1"])),
      "per_photo_max_abs_prob_diff": [round(d, 4) for d in vs_jax["dp"]],
    }
  return result
