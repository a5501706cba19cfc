"""Demo data: deterministic bytes, catalog shape and license mix, learnable-not-trivial classes, server."""

import collections
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from aplantida_jax.data import demo_data
from aplantida_jax.data import licenses
from aplantida_jax.data import sources
from configs import common


def _files(root):
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_same_seed_gives_byte_identical_output(tmp_path):
  kwargs = dict(
    base_url="http://127.0.0.1:1", num_species=3, images_per_species=(2, 3), image_size=48
  )
  demo_data.make_demo_data(str(tmp_path / "a"), seed=7, **kwargs)
  demo_data.make_demo_data(str(tmp_path / "b"), seed=7, **kwargs)
  demo_data.make_demo_data(str(tmp_path / "c"), seed=8, **kwargs)
  a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
  assert a == b
  assert len(a) > 6 and "catalog.jsonl" in a
  assert a["catalog.jsonl"] != c["catalog.jsonl"]
  assert a["images/pictaflora_hispanica/000.jpg"] != c["images/pictaflora_hispanica/000.jpg"]


@pytest.fixture(scope="module")
def full_catalog(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  summary = demo_data.make_demo_data(
    str(out), "http://127.0.0.1:9/", seed=0, images_per_species=(6, 8), image_size=32
  )
  return out, summary


def test_catalog_has_design_shape_regions_and_license_mix(full_catalog):
  out, summary = full_catalog
  docs = [
    json.loads(line) for line in (out / "catalog.jsonl").read_text(encoding="utf-8").splitlines()
  ]
  assert len(docs) == len(demo_data.SPECIES) + 1  # + one empty document
  for doc in docs[:-1]:
    assert set(doc) == {"_id", "scientificName", "family", "commonNames", "regions", "images"}
    assert set(doc["commonNames"]) == {"es", "en"}
  regions = [tuple(d["regions"]) for d in docs[:-1]]
  europe = set(common.regions_config().europe)
  spain_only = sum(r == ("ES",) for r in regions)
  european = sum(r != ("ES",) and set(r) <= europe for r in regions)
  elsewhere = sum(not set(r) & europe for r in regions)
  assert min(spain_only, european, elsewhere) >= 5 and spain_only + european + elsewhere == 20

  cfg = common.catalog_config()
  cfg.path = str(out / "catalog.jsonl")
  stats = collections.Counter()
  records = list(sources.iter_records(cfg, stats))
  assert len(records) == summary["images"] + 1  # the duplicated URL is listed twice
  assert stats == {
    "image: missing url (field 'url')": 1,
    "document: images missing or empty (field 'images')": 1,
  }
  assert all(r.url.startswith("http://127.0.0.1:9/images/") for r in records)
  assert all((out / r.url.split("/", 3)[3]).is_file() for r in records)
  assert len({r.url for r in records}) == len(records) - 1
  assert any(r.country for r in records) and any(not r.country for r in records)
  policy = licenses.get_policy("commercial")
  reasons = collections.Counter(policy.check(r.license)[1] for r in records)
  for reason in (
    licenses.REASON_NC,
    licenses.REASON_ND,
    licenses.REASON_UNKNOWN,
    licenses.REASON_RESERVED,
  ):
    assert reasons[reason] > 0, reason
  assert 0.6 < reasons["allowed"] / len(records) < 0.95
  per_species = collections.Counter(r.species for r in records if policy.check(r.license)[0])
  assert len(per_species) == 20 and min(per_species.values()) >= 2


def _features(num_per_species, size=64):
  """Raw 8x8 thumbnails, and a hue histogram of saturated (flower) pixels."""
  thumbs, hues, labels = [], [], []
  for i, sp in enumerate(demo_data.SPECIES):
    for k in range(num_per_species):
      img = demo_data.draw_plant(sp, np.random.default_rng([0, i, k]), size)
      thumbs.append(np.asarray(img.resize((8, 8)), np.float32).ravel() / 255)
      hsv = np.asarray(img.convert("HSV")).reshape(-1, 3).astype(int)
      mask = (hsv[:, 1] > 110) & (hsv[:, 2] > 90)
      hist = np.bincount(hsv[mask, 0] // 16, minlength=16).astype(np.float32)
      hues.append(np.append(hist / max(1, hist.sum()), mask.mean()))
      labels.append(i)
  return np.array(thumbs), np.array(hues), np.array(labels)


def _nearest_centroid_accuracy(x, y, train):
  centroids = np.stack([x[train & (y == c)].mean(0) for c in np.unique(y)])
  pred = np.argmin(((x[~train][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  return float((pred == y[~train]).mean())


def test_classes_are_learnable_but_not_trivial():
  thumbs, hues, labels = _features(12)
  train = np.arange(len(labels)) % 12 < 8
  chance = 1 / len(demo_data.SPECIES)
  # Pixels alone (position, background, exposure vary) barely beat chance ...
  assert _nearest_centroid_accuracy(thumbs, labels, train) < 0.3
  # ... while the drawn traits carry class signal (colour alone is not enough: shared palettes).
  hue_accuracy = _nearest_centroid_accuracy(hues, labels, train)
  assert 4 * chance < hue_accuracy < 0.8


def test_serve_directory_serves_files_on_a_free_port(tmp_path):
  (tmp_path / "images").mkdir()
  body = b"\xff\xd8jpeg bytes"
  (tmp_path / "images" / "a.jpg").write_bytes(body)
  with demo_data.serve_directory(tmp_path, port=0) as server:
    assert server.server_port > 0 and server.url == f"http://127.0.0.1:{server.server_port}"
    with urllib.request.urlopen(f"{server.url}/images/a.jpg") as resp:
      assert resp.read() == body
    head = urllib.request.Request(f"{server.url}/images/a.jpg", method="HEAD")
    with urllib.request.urlopen(head) as resp:
      assert resp.status == 200 and resp.headers["Content-Length"] == str(len(body))
    with pytest.raises(urllib.error.HTTPError) as err:
      urllib.request.urlopen(f"{server.url}/images/missing.jpg")
    assert err.value.code == 404
    url = server.url
  with pytest.raises(urllib.error.URLError):
    urllib.request.urlopen(f"{url}/images/a.jpg", timeout=2)


def test_serve_directory_busy_port_is_a_clear_error(tmp_path):
  with demo_data.serve_directory(tmp_path) as server:
    with pytest.raises(OSError, match="APLANTIDA_DEMO_PORT"):
      with demo_data.serve_directory(tmp_path, port=server.server_port):
        pass
