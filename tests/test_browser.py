"""The PWA in real Chromium: classify a photo, agree with JAX, work offline, time the wasm backend.

Phone-sized photos (3–12 MP: flowers12 upscaled, demo plants drawn at that
size) must reach the model as the eval transform gives them to JAX, without
the page ever holding the full-resolution photo as a tensor.

Debian's chromium driven by Python Playwright (CI installs it with apt).
Served on 127.0.0.1 with and without cross-origin isolation (COOP/COEP),
which decides whether the wasm backend may use threads.
"""

import base64
import glob
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from aplantida_jax import fileio
from aplantida_jax.data import shards
from aplantida_jax.evaluation import metrics
from aplantida_jax.evaluation import region_prior
from aplantida_jax.evaluation import rollup
from aplantida_jax.export import pwa_screens
from aplantida_jax.export import pwa_server
from aplantida_jax.export import resize_bench
from aplantida_jax.train import input_pipeline
from tests import helpers
from tests import test_rollup
from tests import tfjs_fixture

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
]

pytestmark = [
  pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install chromium)"
  ),
  pytest.mark.skipif(
    not os.path.isdir(pwa_server.VENDOR_DIR), reason="node_modules missing (npm ci)"
  ),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tfjs_fixture.tiny_export(tmp_path_factory.getbasetemp())


def _centre(photo):
  """The fixture photo's model input: its centre IMAGE_SIZE square (the page's 0.875 crop)."""
  offset = (tfjs_fixture.PHOTO_SIZE - tfjs_fixture.IMAGE_SIZE) // 2
  size = tfjs_fixture.IMAGE_SIZE
  return photo[offset : offset + size, offset : offset + size].astype(np.float32)


@pytest.fixture(scope="module")
def photo(workdir, tmp_path_factory):
  """(png path, JAX top-1): the val photo whose top-1 wins by the widest margin.

  The photo is 64 px, so the page's centre crop (0.875) is exactly the 56 px
  input and nothing is resized: browser and JAX see the same pixels, and the
  widest margin keeps the FP16 comparison meaningful rather than a coin toss.
  """
  source = input_pipeline.RecordSource(shards.shard_paths(os.path.join(workdir, "dataset"), "val"))
  photos = [
    np.asarray(Image.open(io.BytesIO(shards.decode(source[i]["data"])["jpeg"])).convert("RGB"))
    for i in range(len(source))
  ]
  probs = tfjs_fixture.jax_probabilities(workdir, np.stack([_centre(p) for p in photos]))
  top2 = np.sort(probs, -1)[:, -2:]
  best = int(np.argmax(top2[:, 1] - top2[:, 0]))
  path = tmp_path_factory.mktemp("photo") / "plant.png"
  Image.fromarray(photos[best]).save(path)
  return str(path), int(probs[best].argmax())


@pytest.fixture(scope="module")
def phone_photos(tmp_path_factory):
  """JPEG paths of 3–12 MP photos that the page must shrink 30–70× to the 56 px input."""
  if not glob.glob(os.path.join(helpers.FLOWERS, "*", "*.jpg")):
    pytest.skip(f"{helpers.FLOWERS} holds no photos")
  return resize_bench.phone_photos(str(tmp_path_factory.mktemp("phone_photos")), helpers.FLOWERS)


@pytest.fixture(scope="module")
def browser():
  playwright_api = pytest.importorskip("playwright.sync_api")
  with playwright_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


def _classify(page, png):
  pwa_screens.classify(page, png)
  items = page.query_selector_all("#results li")
  return [
    (int(li.get_attribute("data-index")), float(li.get_attribute("data-probability")))
    for li in items
  ]


@pytest.mark.parametrize("isolate", [True, False], ids=["coop_coep", "no_isolation"])
def test_pwa_classifies_online_then_offline(workdir, photo, browser, isolate, capsys):
  png, jax_top1 = photo
  server = pwa_server.make_server(os.path.join(workdir, "tfjs"), port=0, isolate=isolate)
  pwa_server.serve_in_thread(server)
  url = f"http://127.0.0.1:{server.server_address[1]}/"
  context = browser.new_context()
  page = context.new_page()
  errors = []
  page.on("pageerror", lambda e: errors.append(str(e)))
  try:
    page.goto(url)
    top = _classify(page, png)
    assert len(top) == min(5, tfjs_fixture.NUM_CLASSES)
    assert top[0][0] == jax_top1
    probabilities = [p for _, p in top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-4
    unsure = page.get_attribute("#verdict", "data-unsure") == "true"
    assert unsure == (top[0][1] < tfjs_fixture.THRESHOLD)
    info = page.evaluate("aplantida.info()")
    assert info["backend"] == "wasm" and info["crossOriginIsolated"] == isolate
    bench = page.evaluate("aplantida.benchmark(20)")
    page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    page.wait_for_function("navigator.serviceWorker.controller !== null", timeout=30_000)

    server.shutdown()  # second visit: nothing answers on the network any more
    server.server_close()
    context.set_offline(True)
    page.reload()
    offline_top = _classify(page, png)
    assert offline_top[0][0] == jax_top1
    assert not errors, errors
    with capsys.disabled():
      print(
        f"\n[browser] wasm median latency over {bench['runs']} runs: {bench['median_ms']:.2f} ms "
        f"(threads {bench['threads']}, cross-origin isolated {bench['crossOriginIsolated']})"
      )
  finally:
    context.close()
    server.server_close()


@pytest.fixture(scope="module")
def prior_export(workdir, photo, tmp_path_factory):
  """(export dir, prior): the fixture's export with a planted region prior for Spain/Europe.

  Spain's log-ratio lifts the photo's JAX runner-up by 6 nats, more than the margin of the
  widest-margin photo, so the region in use decides the answer.
  """
  out = str(tmp_path_factory.mktemp("prior") / "tfjs")
  shutil.copytree(os.path.join(workdir, "tfjs"), out)
  png, _ = photo
  rng = np.random.default_rng(0)
  spain = rng.normal(0, 0.3, tfjs_fixture.NUM_CLASSES)
  spain[_runner_up(workdir, png)] += 6.0
  prior = {
    "scale": 0.9,
    "strength": 1.3,
    "threshold": 0.0,
    "regions": {
      "spain": {"countries": ["ES"], "log_ratio": spain.round(4).tolist()},
      "europe": {"countries": ["DE", "ES", "FR"], "log_ratio": [0.0] * tfjs_fixture.NUM_CLASSES},
    },
  }
  fileio.write_json(os.path.join(out, "region_prior.json"), prior)
  metadata = fileio.read_json(os.path.join(out, "metadata.json"))
  fileio.write_json(
    os.path.join(out, "metadata.json"), {**metadata, "region_prior": "region_prior.json"}
  )
  return out, prior


def _runner_up(workdir, png):
  crop = _centre(np.asarray(Image.open(png).convert("RGB")))
  return int(np.argsort(tfjs_fixture.jax_probabilities(workdir, crop[None])[0])[-2])


def _probabilities(top):
  dense = np.zeros(tfjs_fixture.NUM_CLASSES)
  for index, probability in top:
    dense[index] = probability
  return dense


def test_the_region_in_use_reweights_the_answer_as_the_prior_says_and_offline(
  prior_export, photo, browser
):
  out, prior = prior_export
  png, jax_top1 = photo
  server = pwa_server.make_server(out, port=0, isolate=False)
  pwa_server.serve_in_thread(server)
  context = browser.new_context(locale="es-ES")  # navigator.language es-ES → Spain
  page = context.new_page()
  try:
    page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
    page.wait_for_selector("body[data-state=ready]", timeout=60_000)
    assert page.is_visible("#region") and page.input_value("#region") == "spain"
    in_spain = _classify(page, png)
    page.select_option("#region", "")  # ignore location: the plain model
    page.wait_for_selector("body[data-region='']")
    plain = [
      (int(li.get_attribute("data-index")), float(li.get_attribute("data-probability")))
      for li in page.query_selector_all("#results li")
    ]
    assert plain[0][0] == jax_top1 and len(plain) == tfjs_fixture.NUM_CLASSES
    expected = np.exp(
      region_prior.apply(
        np.log(_probabilities(plain))[None],
        prior["regions"]["spain"]["log_ratio"],
        prior["scale"],
        prior["strength"],
      )[0]
    )
    np.testing.assert_allclose(_probabilities(in_spain), expected, atol=1e-5)
    assert in_spain[0][0] == int(np.argmax(expected)) != jax_top1

    page.select_option("#region", "spain")
    page.wait_for_function("navigator.serviceWorker.controller !== null", timeout=30_000)
    server.shutdown()  # offline: the prior comes from the cache, the choice from localStorage
    server.server_close()
    context.set_offline(True)
    page.reload()
    offline = _classify(page, png)
    assert page.input_value("#region") == "spain"
    np.testing.assert_allclose(_probabilities(offline), expected, atol=1e-5)
  finally:
    context.close()
    server.server_close()


def test_with_a_region_the_page_rolls_up_at_the_priors_own_thresholds(
  prior_export, photo, browser, tmp_path
):
  out, prior = prior_export
  png, _ = photo
  unsure = str(tmp_path / "tfjs")
  shutil.copytree(out, unsure)
  metadata = fileio.read_json(os.path.join(unsure, "metadata.json"))
  fileio.write_json(
    os.path.join(unsure, "metadata.json"),
    {**metadata, "threshold": 1.01, "rollup": {"genus": None, "family": None, "set_size": 3}},
  )
  # Every fixture species is a Testaceae: at family threshold 0 the prior always names it.
  fileio.write_json(
    os.path.join(unsure, "region_prior.json"),
    {**prior, "threshold": 1.01, "rollup": {"genus": None, "family": 0.0, "set_size": 3}},
  )
  server = pwa_server.make_server(unsure, port=0, isolate=False)
  pwa_server.serve_in_thread(server)
  context = browser.new_context(locale="es-ES")
  page = context.new_page()
  try:
    page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
    _classify(page, png)
    assert page.input_value("#region") == "spain"
    assert page.get_attribute("#verdict", "data-level") == "family"
    assert "Testaceae" in page.text_content("#verdict")
    page.select_option("#region", "")  # the plain model's thresholds: nothing rolls up
    page.wait_for_selector("body[data-region='']")
    assert page.get_attribute("#verdict", "data-level") == "set"
  finally:
    context.close()
    server.shutdown()
    server.server_close()


ROLLUP_LABELS = test_rollup.CLASSES  # Rosa ×2, Prunus (Rosaceae), Cistus, a non-binomial
ROLLUP_CASES = [  # (probabilities, rollup thresholds, expected level)
  ([0.90, 0.04, 0.03, 0.02, 0.01], {"genus": 0.8, "family": 0.9}, "species"),
  ([0.45, 0.44, 0.05, 0.03, 0.03], {"genus": 0.8, "family": 0.9}, "genus"),
  ([0.45, 0.44, 0.05, 0.03, 0.03], {"genus": None, "family": 0.9}, "family"),
  ([0.30, 0.20, 0.45, 0.03, 0.02], {"genus": 0.8, "family": 0.9}, "family"),
  ([0.10, 0.10, 0.10, 0.35, 0.35], {"genus": 0.8, "family": 0.9}, "set"),
]


def test_unsure_answers_roll_up_to_genus_family_or_one_of_these_as_the_evaluation_does(page_of):
  page_of.wait_for_selector("body[data-state=ready]", timeout=60_000)
  groups = rollup.groups(ROLLUP_LABELS)
  for probabilities, thresholds, level in ROLLUP_CASES:
    got = page_of.evaluate(
      "([p, labels, rollup]) => aplantida.answer(Float32Array.from(p), labels, 0.8, rollup)",
      [probabilities, ROLLUP_LABELS, {**thresholds, "set_size": 3}],
    )
    assert got["level"] == level, (probabilities, thresholds, got)
    scores = metrics.Scores.of(np.log([probabilities]), np.zeros(1, np.int64))
    if level in rollup.LEVELS:  # the page's group and mass are the evaluation's
      mass, group, _ = rollup.level_answers(rollup.Ranked.of(scores, 1.0), groups[level][0])
      assert got["name"] == groups[level][1][group[0]]
      assert got["probability"] == pytest.approx(mass[0], abs=1e-6)
    elif level == "set":
      order = np.argsort(-np.asarray(probabilities), kind="stable")[:3]  # ties: lower index
      assert got["names"] == [ROLLUP_LABELS[i]["species"] for i in order]


def test_screenshots_show_the_answer_the_region_and_not_sure_online_and_offline(
  workdir, photo, browser, tmp_path
):
  png, jax_top1 = photo
  labels = fileio.read_json(os.path.join(workdir, "tfjs", "labels.json"))
  shots = pwa_screens.capture(
    os.path.join(workdir, "tfjs"), {"online": png}, str(tmp_path / "shots"), browser=browser
  )
  # The same export, except that no answer reaches the threshold and nothing rolls up.
  unsure_dir = str(tmp_path / "unsure_tfjs")
  shutil.copytree(os.path.join(workdir, "tfjs"), unsure_dir)
  metadata = fileio.read_json(os.path.join(unsure_dir, "metadata.json"))
  never = {"genus": None, "family": None, "set_size": 3}
  metadata.update(threshold=1.01, rollup=never)
  fileio.write_json(os.path.join(unsure_dir, "metadata.json"), metadata)
  prior_path = os.path.join(unsure_dir, metadata["region_prior"])  # Spain's own thresholds too
  fileio.write_json(
    prior_path, {**fileio.read_json(prior_path), "threshold": 1.01, "rollup": never}
  )
  shots.update(
    pwa_screens.capture(
      unsure_dir, {"unsure": png}, str(tmp_path / "shots"), offline=False, browser=browser
    )
  )
  for name in ("online", "offline", "unsure"):
    shot = shots[name]
    with Image.open(tmp_path / "shots" / f"{name}.png") as image:
      assert image.width == pwa_screens.VIEWPORT["width"] and image.height >= 400
    assert shot["photo"] and shot["verdict"] and shot["region"] == "Spain"  # es-ES locale
    assert len(shot["results"]) == tfjs_fixture.NUM_CLASSES
    assert [r["species"] for r in shot["results"]] == [
      labels[r["index"]]["species"] for r in shot["results"]
    ]
    assert all(r["percent"].endswith("%") for r in shot["results"])
    assert shot["results"][0]["index"] == jax_top1
    assert f"{tfjs_fixture.NUM_CLASSES} species" in shot["status"]
  assert shots["offline"]["verdict"] == shots["online"]["verdict"]
  assert shots["offline"]["results"] == shots["online"]["results"]
  unsure = shots["unsure"]
  assert unsure["unsure"] and unsure["level"] == "set"
  top3 = ", ".join(r["species"] for r in unsure["results"][:3])
  assert unsure["verdict"] == f"Not sure — one of these: {top3}"


@pytest.mark.parametrize("isolate", [True, False], ids=["coop_coep", "no_isolation"])
def test_wasm_runs_threads_only_when_cross_origin_isolated(workdir, browser, isolate):
  """On a machine that reports 8 logical cores (TF.js 4.22 gives XNNPACK half of them, at most
  4; this 2-core CI machine therefore gets 1 thread, README "Export to TF.js")."""
  server = pwa_server.make_server(os.path.join(workdir, "tfjs"), port=0, isolate=isolate)
  pwa_server.serve_in_thread(server)
  context = browser.new_context()
  page = context.new_page()
  page.add_init_script(
    "Object.defineProperty(Navigator.prototype, 'hardwareConcurrency', {get: () => 8})"
  )
  try:
    page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
    page.wait_for_selector("body[data-state=ready]", timeout=60_000)
    info = page.evaluate("aplantida.info()")
    assert info["crossOriginIsolated"] == isolate
    assert info["threads"] == (4 if isolate else 1)
    assert ("4 threads" in page.text_content("#status")) == isolate
  finally:
    context.close()
    server.shutdown()
    server.server_close()


@pytest.fixture
def page_of(workdir, browser):
  """Opens the PWA (no isolation) and yields the page; closes both after the test."""
  server = pwa_server.make_server(os.path.join(workdir, "tfjs"), port=0, isolate=False)
  pwa_server.serve_in_thread(server)
  context = browser.new_context()
  page = context.new_page()
  page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
  yield page
  context.close()
  server.shutdown()
  server.server_close()


# The page ports Pillow's resampler, so its input is the eval transform's on the full decode bit for
# bit; the model's FP16 weights and TF.js kernels are then all that moves the probabilities.
MAX_PROB_DIFF = 0.02

PREPROCESS_BYTES_JS = """async ([b64, size, fraction]) => {
  const photo = new Image();
  photo.src = URL.createObjectURL(new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))]));
  await photo.decode();
  const input = aplantida.preprocess(photo, size, fraction);
  const data = Array.from(await input.data());
  input.dispose();
  return data;
}"""


def test_phone_photos_reach_the_model_as_the_eval_transform_gives_them_to_jax(
  page_of, phone_photos, workdir
):
  with Image.open(phone_photos[0]) as first:
    assert first.width * first.height >= 3_000_000
  inputs, page_probs, mismatched = [], [], {}
  for path in phone_photos:
    top = _classify(page_of, path)
    assert len(top) == tfjs_fixture.NUM_CLASSES
    page_probs.append([p for _, p in sorted(top)])
    pixels = page_of.evaluate(
      """([size, fraction]) => {
        const input = aplantida.preprocess(document.getElementById('preview'), size, fraction);
        return input.data().then((data) => { input.dispose(); return Array.from(data); });
      }""",
      [tfjs_fixture.IMAGE_SIZE, 0.875],
    )
    with open(path, "rb") as f:
      expected = input_pipeline.centre_crop(f.read(), tfjs_fixture.IMAGE_SIZE, 0.875, draft=False)
    page_input = np.asarray(pixels, np.float32).reshape(expected.shape)
    mismatched[os.path.basename(path)] = int((page_input != expected).sum())
    inputs.append(expected)
  assert not any(mismatched.values()), mismatched
  jax_probs = tfjs_fixture.jax_probabilities(workdir, np.stack(inputs))
  page_probs = np.asarray(page_probs)
  assert np.abs(page_probs - jax_probs).max() <= MAX_PROB_DIFF, np.abs(page_probs - jax_probs)
  np.testing.assert_array_equal(page_probs.argmax(1), jax_probs.argmax(1))


@pytest.mark.parametrize(
  "width,height,size,fraction",
  [
    (37, 23, 56, 0.875),
    (57, 91, 160, 1.0),
    (641, 359, 56, 0.875),
    (3, 5, 7, 0.875),
    (999, 2, 9, 1.0),
  ],
  ids=["upscale", "upscale_portrait", "shrink_11x", "tiny", "one_row_panorama"],
)
def test_preprocessing_is_pillows_resize_bit_for_bit(page_of, width, height, size, fraction):
  noise = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(noise).save(out, "JPEG", quality=90)  # noise: every weight and rounding shows
  jpeg = out.getvalue()
  pixels = page_of.evaluate(PREPROCESS_BYTES_JS, [base64.b64encode(jpeg).decode(), size, fraction])
  expected = input_pipeline.centre_crop(jpeg, size, fraction, draft=False)
  np.testing.assert_array_equal(np.asarray(pixels, np.float32).reshape(expected.shape), expected)


def test_transparent_pixels_reach_the_model_as_white(page_of):
  """As the download stage flattens them: a cut-out PNG is not classified on black."""
  rng = np.random.default_rng(7)
  rgba = rng.integers(0, 256, (48, 40, 4), np.uint8)
  rgba[..., 3] = np.where(rng.random((48, 40)) < 0.5, 0, 255)  # whole alpha: no blending rounding
  out = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(out, "PNG")
  white = Image.new("RGBA", (40, 48), (255, 255, 255, 255))
  flattened = io.BytesIO()
  Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB").save(flattened, "PNG")
  pixels = page_of.evaluate(
    PREPROCESS_BYTES_JS, [base64.b64encode(out.getvalue()).decode(), 24, 0.875]
  )
  expected = input_pipeline.centre_crop(flattened.getvalue(), 24, 0.875, draft=False)
  np.testing.assert_array_equal(np.asarray(pixels, np.float32).reshape(expected.shape), expected)


def test_preprocessing_a_12_mp_photo_holds_no_full_resolution_tensor(page_of, phone_photos):
  twelve_mp = next(p for p in phone_photos if "4000x3000" in p)
  _classify(page_of, twelve_mp)
  # An <img> outside the page keeps its natural size as .width, as a photo taken from a file,
  # a camera or a fetch does; the preview is CSS-shrunk, so reading it whole would be small.
  profile = page_of.evaluate(
    """async (size) => {
      const photo = new Image();
      photo.src = document.getElementById('preview').src;
      await photo.decode();
      aplantida.preprocess(photo, size, 0.875).dispose();  // warm-up: kernels and canvases
      let shape;
      const before = tf.memory().numBytes;  // peakBytes counts what was held before (the model)
      const profile = await tf.profile(() => {
        const input = aplantida.preprocess(photo, size, 0.875);
        shape = input.shape;
        return input;
      });
      tf.dispose(profile.result);
      // peakBytes is the most held while a kernel ran (-Infinity when none ran); the returned
      // input is held at the end.
      const peak = Math.max(profile.peakBytes, before + profile.newBytes);
      return {peakBytes: peak - before, shape, width: photo.width};
    }""",
    tfjs_fixture.IMAGE_SIZE,
  )
  assert profile["width"] == 4000
  assert profile["shape"] == [1, tfjs_fixture.IMAGE_SIZE, tfjs_fixture.IMAGE_SIZE, 3]
  assert 4 * 3 * tfjs_fixture.IMAGE_SIZE**2 <= profile["peakBytes"] < 20_000_000, profile
