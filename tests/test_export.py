"""Export stage: image normalisation, split, end-to-end over a faulty CDN, kill-and-resume."""

import csv
import hashlib
import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from aplantida_jax.data import export
from aplantida_jax.data import imaging
from aplantida_jax.data import shards
from aplantida_jax.data import split as split_lib
from configs import export as export_config
from tests import cdn_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOWERS = pathlib.Path(__file__).resolve().parents[2] / "shared/data/flowers12/train"


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _photo(width, height, seed=0):
  """Smooth random colour field: compresses like a photo, unlike white noise."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


NORM = dict(image_size=32, min_size=16, max_pixels=10_000_000)

# ---------------------------------------------------------------- imaging


@pytest.mark.parametrize(
  "mode,fmt",
  [
    ("RGB", "JPEG"),
    ("CMYK", "JPEG"),
    ("L", "JPEG"),
    ("L", "PNG"),
    ("RGBA", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("I;16", "PNG"),
    ("RGB", "WEBP"),
    ("P", "GIF"),
  ],
)
def test_normalise_converts_to_rgb_jpeg(mode, fmt):
  data = _encode(_photo(90, 60).convert(mode), fmt)
  jpeg, info = imaging.normalise(data, **NORM)
  out = Image.open(io.BytesIO(jpeg))
  assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (48, 32))
  assert (info.format, info.mode, info.source_size) == (fmt, mode, (90, 60))
  expected = np.asarray(_photo(90, 60).convert("L").resize((48, 32))).mean()
  assert abs(np.asarray(out.convert("L")).mean() - expected) < 12, "brightness survives conversion"


def test_normalise_is_deterministic_and_flattens_alpha_on_white():
  clear = Image.new("RGBA", (40, 60), (255, 0, 0, 0))
  jpeg, _ = imaging.normalise(_encode(clear, "PNG"), **NORM)
  assert jpeg == imaging.normalise(_encode(clear, "PNG"), **NORM)[0]
  assert Image.open(io.BytesIO(jpeg)).size == (32, 48)
  assert min(Image.open(io.BytesIO(jpeg)).getpixel((10, 10))) > 245


def test_normalise_large_jpeg_uses_dct_scaling():
  big = _encode(_photo(1600, 1200), "JPEG", quality=90)
  jpeg, info = imaging.normalise(big, image_size=100, min_size=16, max_pixels=50_000_000)
  assert info.decoded_size == (200, 150), "decoded at 1/8 scale, not 1600x1200"
  assert info.size == (133, 100) and Image.open(io.BytesIO(jpeg)).size == (133, 100)
  _, info = imaging.normalise(big, image_size=700, min_size=16, max_pixels=50_000_000)
  assert info.decoded_size == (1600, 1200), "1/2 scale would fall below 700"
  png = _encode(_photo(1600, 1200), "PNG", compress_level=1)
  assert imaging.normalise(png, image_size=100, min_size=16, max_pixels=50_000_000)[
    1
  ].decoded_size == (1600, 1200)


@pytest.mark.parametrize(
  "data,reason",
  [
    (b"", "empty"),
    (b"<html><body>404</body></html>", "not_image"),
    (_encode(_photo(60, 40), "JPEG")[:300], "truncated"),
    (_encode(_photo(60, 10), "JPEG"), "too_small"),
    (_encode(_photo(4000, 3000), "PNG", compress_level=1), "decompression_bomb"),
    (cdn_server.huge_png(), "decompression_bomb"),
  ],
  ids=["empty", "html", "truncated", "small", "over_max_pixels", "pillow_bomb"],
)
def test_normalise_rejects(data, reason):
  with pytest.raises(imaging.ImageError) as e:
    imaging.normalise(data, **NORM)
  assert e.value.reason == reason


@pytest.mark.parametrize("action", ["error", "ignore"])  # as imaging sets it / as a caller may
def test_pillow_bomb_warning_becomes_a_reason(monkeypatch, action):
  monkeypatch.setattr(warnings, "filters", list(warnings.filters))
  warnings.simplefilter(action, Image.DecompressionBombWarning)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 60x60 = 3600: Pillow only warns
  with pytest.raises(imaging.ImageError) as e:
    imaging.normalise(_encode(_photo(60, 60), "PNG"), **NORM)
  assert e.value.reason == "decompression_bomb"


# ---------------------------------------------------------------- split

RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _items(counts):
  return [
    split_lib.Item(hashlib.sha256(f"{sp}/{i}".encode()).hexdigest(), sp, f"u/{sp}/{i}")
    for sp, n in counts.items()
    for i in range(n)
  ]


def test_split_deterministic_stratified_and_order_free():
  items = _items({"a": 50, "b": 20, "c": 10, "d": 3})
  result = split_lib.split(items, ratios=RATIOS, min_per_class=3, small_class_policy="drop", seed=7)
  shuffled = list(items)
  random.Random(1).shuffle(shuffled)
  assert result == split_lib.split(
    shuffled, ratios=RATIOS, min_per_class=3, small_class_policy="drop", seed=7
  )
  other_seed = split_lib.split(
    items, ratios=RATIOS, min_per_class=3, small_class_policy="drop", seed=8
  )
  assert other_seed.splits != result.splits
  per = {
    s: {sp: sum(1 for i in v if i.species == sp) for sp in "abcd"} for s, v in result.splits.items()
  }
  assert per["val"] == {"a": 5, "b": 2, "c": 1, "d": 1} == per["test"]
  assert per["train"] == {"a": 40, "b": 16, "c": 8, "d": 1}
  assert sorted(i for v in result.splits.values() for i in v) == sorted(items)


def test_split_of_one_species_ignores_the_others():
  a = split_lib.split(
    _items({"a": 30, "b": 30}), ratios=RATIOS, min_per_class=3, small_class_policy="drop", seed=0
  )
  b = split_lib.split(
    _items({"a": 30, "z": 12}), ratios=RATIOS, min_per_class=3, small_class_policy="drop", seed=0
  )
  for name in split_lib.SPLITS:
    assert [i for i in a.splits[name] if i.species == "a"] == [
      i for i in b.splits[name] if i.species == "a"
    ]


def test_small_classes_dropped_or_train_only():
  items = _items({"big": 20, "tiny": 4})
  dropped = split_lib.split(
    items, ratios=RATIOS, min_per_class=5, small_class_policy="drop", seed=0
  )
  assert dropped.species == ("big",) and dropped.small_species == {"tiny": 4}
  assert all(i.species == "big" for v in dropped.splits.values() for i in v)
  kept = split_lib.split(
    items, ratios=RATIOS, min_per_class=5, small_class_policy="train_only", seed=0
  )
  assert kept.species == ("big", "tiny")
  assert sum(i.species == "tiny" for i in kept.splits["train"]) == 4
  assert not any(i.species == "tiny" for s in ("val", "test") for i in kept.splits[s])


def test_duplicates_never_straddle_splits():
  items = _items({"a": 40, "b": 40})
  copies = [
    split_lib.Item(i.sha256, sp, f"mirror/{sp}/{i.location}") for i in items[::3] for sp in "ab"
  ]
  unique = split_lib.dedupe(items + copies)
  assert unique.duplicates == len(copies) and len(unique.items) == len(items)
  # The kept copy is the smallest (species, location): "a"'s mirror, so every "b" original and
  # "b" mirror of a duplicated hash conflicts, and the "b" mirror of an "a" original too.
  originals = items[::3]
  assert unique.conflicting == sum(2 if i.species == "b" else 1 for i in originals)
  assert {i.species for i in unique.items if i.sha256 in {o.sha256 for o in originals}} == {"a"}
  result = split_lib.split(
    unique.items, ratios=RATIOS, min_per_class=3, small_class_policy="drop", seed=0
  )
  hashes = [{i.sha256 for i in v} for v in result.splits.values()]
  assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])
  with pytest.raises(ValueError, match="dedupe"):
    split_lib.split(
      items + copies, ratios=RATIOS, min_per_class=3, small_class_policy="drop", seed=0
    )


@pytest.mark.parametrize(
  "ratios",
  [
    {"train": 0.8, "val": 0.3, "test": 0.1},
    {"train": 0.9, "val": 0.1},
    {"train": 0.0, "val": 0.5, "test": 0.5},
  ],
)
def test_bad_ratios_are_named(ratios):
  with pytest.raises(ValueError, match="export.splits"):
    split_lib.split(
      _items({"a": 10}), ratios=ratios, min_per_class=3, small_class_policy="drop", seed=0
    )


def test_bad_options_fail_before_any_download(tmp_path, cdn):
  _catalog(tmp_path / "catalog.jsonl", _serve_images(cdn, ["Alpha alba"], 4))
  with pytest.raises(ValueError, match="export.small_class_policy"):
    export.run(_config(tmp_path / "catalog.jsonl", small_class_policy="keep"), str(tmp_path / "w"))
  assert not cdn.requests


@pytest.mark.parametrize(
  "field,value,must",
  [
    ("concurrency", 0, "an integer >= 1"),
    ("per_host", -1, "an integer >= 1"),
    ("timeout_s", 0.0, "> 0 seconds"),
  ],
)
def test_http_settings_that_cannot_work_fail_before_any_download(tmp_path, cdn, field, value, must):
  _catalog(tmp_path / "catalog.jsonl", _serve_images(cdn, ["Alpha alba"], 4))
  config = _config(tmp_path / "catalog.jsonl")
  config.http[field] = value
  with pytest.raises(ValueError) as e:
    export.run(config, str(tmp_path / "w"))
  assert str(e.value) == f"--config.http.{field}={value!r} must be {must}."
  assert not cdn.requests


# ---------------------------------------------------------------- export over a faulty CDN


def _catalog(path, species_urls, license_for=lambda i: "CC-BY-4.0"):
  with open(path, "w", encoding="utf-8") as f:
    for species, urls in species_urls.items():
      doc = {
        "scientificName": species,
        "family": "Testaceae",
        "commonNames": {"es": species.lower()},
        "regions": ["ES", "PT"],
        "images": [
          {
            "url": u,
            "license": license_for(i),
            "author": f"author {i}",
            "source": "test",
            "country": "ES" if i % 2 else None,
          }
          for i, u in enumerate(urls)
        ],
      }
      f.write(json.dumps(doc) + "\n")


def _serve_images(cdn, species, count, size=(64, 48), delay_s=0.0):
  urls = {}
  for s, name in enumerate(species):
    urls[name] = [
      cdn.route(
        f"/{s}/{i}.jpg",
        cdn_server.Response(
          200,
          _encode(_photo(*size, seed=1000 * s + i), "JPEG"),
          {"Content-Type": "image/jpeg"},
          delay_s=delay_s,
        ),
      )
      for i in range(count)
    ]
  return urls


def _config(catalog_path, **export_overrides):
  config = export_config.get_config("demo")
  config.catalog.path = str(catalog_path)
  config.catalog.mongo_uri = "mongodb://reader:s3cr3t@db.example:27017/plants"
  config.http.update(dict(timeout_s=0.5, retries=1, backoff_s=0.05, concurrency=8, per_host=8))
  config.export.update(dict(image_size=32, min_size=16, min_per_class=3, records_per_shard=7))
  config.export.update(export_overrides)
  return config


# The last one: an SPDX expression whose commercial alternative is the older CC-BY-SA.
LICENSES = ["CC-BY-4.0", "CC0", "cc-by-nc 4.0", "CC BY-SA 4.0", "", "CC-BY-NC-4.0 OR CC-BY-SA-3.0"]


def test_export_over_faulty_cdn(cdn, tmp_path):
  faults = cdn_server.install_faults(cdn, slow_s=1.5)
  urls = _serve_images(cdn, ["Alpha alba", "Beta bella", "Gamma nana"], 12)
  urls["Gamma nana"] = urls["Gamma nana"][:2]  # below min_per_class: dropped
  urls["Alpha alba"] += list(faults.values())
  _catalog(
    tmp_path / "catalog.jsonl",
    urls,
    license_for=lambda i: LICENSES[i % len(LICENSES)],
  )
  summary = export.run(_config(tmp_path / "catalog.jsonl"), str(tmp_path / "w"))

  dataset = tmp_path / "w" / "dataset"
  manifest = json.loads((dataset / "manifest.json").read_text())
  fault_reasons = {
    "http_404",
    "timeout",
    "not_image",
    "truncated",
    "decompression_bomb",
    "opt_out:noai",
  }
  # Which faults got past the license filter depends on their position; all of those must fail right.
  assert set(manifest["downloads"]["failures"]) <= fault_reasons
  positions = [i % len(LICENSES) for u in urls.values() for i in range(len(u))]
  assert manifest["licenses"]["rejected"] == {
    "non-commercial (NC) clause forbids commercial use": positions.count(2),
    "unknown license: no usable license recorded": positions.count(4),
  }
  assert manifest["small_classes"]["species"] == {"Gamma nana": 2}
  assert manifest["classes"] == ["Alpha alba", "Beta bella"]
  assert manifest["shippable"] is True and summary["num_classes"] == 2
  assert "s3cr3t" not in (dataset / "manifest.json").read_text()

  records = {
    name: [r for path in shards.shard_paths(str(dataset), name) for r in shards.read_shard(path)]
    for name in split_lib.SPLITS
  }
  assert {k: len(v) for k, v in records.items()} == manifest["counts"]
  for name, info in manifest["shards"].items():
    assert len(info) == -(-manifest["counts"][name] // 7)
    for shard in info:
      assert hashlib.sha256((dataset / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
  all_records = [r for v in records.values() for r in v]
  assert len({r["sha256"] for r in all_records}) == len(all_records)
  for r in all_records:
    assert hashlib.sha256(r["jpeg"]).hexdigest() == r["sha256"]
    assert min(Image.open(io.BytesIO(r["jpeg"])).size) == 32
    assert manifest["classes"][r["label"]] == r["species"]
    assert r["license"] in ("CC-BY-4.0", "CC0-1.0", "CC-BY-SA-4.0", "CC-BY-SA-3.0")
    assert r["regions"] == ([r["country"]] if r["country"] else ["ES", "PT"])

  classes = json.loads((dataset / "classes.json").read_text())
  assert classes[0] == {
    "index": 0,
    "species": "Alpha alba",
    "common_names": {"es": ["alpha alba"]},
    "regions": ["ES", "PT"],
    "family": "Testaceae",
  }
  with open(dataset / "attributions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["sha256"] for r in rows) == sorted(r["sha256"] for r in all_records)
  # The OR's alternative the policy admits is what shards and attributions record.
  chosen = {r["sha256"] for r in all_records if r["license"] == "CC-BY-SA-3.0"}
  assert chosen and {row["sha256"] for row in rows if row["license"] == "CC-BY-SA-3.0"} == chosen
  assert all(row["author"].startswith("author ") and row["url"].startswith("http") for row in rows)


def test_export_reports_every_fault_reason(cdn, tmp_path):
  faults = cdn_server.install_faults(cdn, slow_s=1.5)
  urls = _serve_images(cdn, ["Alpha alba"], 6)
  urls["Alpha alba"] += list(faults.values())
  _catalog(tmp_path / "catalog.jsonl", urls)
  export.run(_config(tmp_path / "catalog.jsonl"), str(tmp_path / "w"))
  manifest = json.loads((tmp_path / "w/dataset/manifest.json").read_text())
  assert manifest["downloads"]["failures"] == {
    "http_404": 1,
    "timeout": 1,
    "not_image": 1,
    "truncated": 1,
    "decompression_bomb": 1,
    "opt_out:noai": 1,
  }
  # ok, redirect, 500-then-200, 429-then-200 and HEAD-less all serve the same bytes: one is kept.
  assert manifest["dedupe"]["duplicate_content"] == 4
  assert sum(manifest["counts"].values()) == 6 + 1


def test_permanent_failures_are_remembered_and_transient_ones_retried(cdn, tmp_path):
  """Gone (404/410), HTML, redirect loops and redirects off HTTP fail the same way next time."""
  redirect = lambda to: cdn_server.Response(302, b"", {"Location": to})  # noqa: E731
  routes = {
    "/gone.jpg": cdn_server.Response(410, b"gone"),
    "/page.jpg": cdn_server.Response(200, b"<p>hi</p>", {"Content-Type": "text/html"}),
    "/loop.jpg": redirect("/loop.jpg"),
    "/to_file.jpg": redirect("file:///etc/passwd"),
    "/to_data.jpg": redirect("data:image/jpeg;base64,/9j/"),
    "/down.jpg": cdn_server.Response(503, b"later"),
  }
  urls = _serve_images(cdn, ["Alpha alba"], 6)
  urls["Alpha alba"] += [cdn.route(path, response) for path, response in routes.items()]
  _catalog(tmp_path / "catalog.jsonl", urls)
  workdir = str(tmp_path / "w")
  export.run(_config(tmp_path / "catalog.jsonl"), workdir)
  manifest = tmp_path / "w/dataset/manifest.json"
  failures = json.loads(manifest.read_text())["downloads"]["failures"]
  assert failures == {
    "http_410": 1,
    "not_image": 1,
    "too_many_redirects": 1,
    "invalid_url": 2,  # file: and data: targets
    "http_503": 1,
  }
  asked = {path: cdn.count(path) for path in routes}
  export.run(_config(tmp_path / "catalog.jsonl"), workdir)
  again = {path: cdn.count(path) - asked[path] for path in routes}
  # Only the 503 is asked again; the remembered failures still count in the new manifest.
  assert {path for path, n in again.items() if n} == {"/down.jpg"}
  assert json.loads(manifest.read_text())["downloads"]["failures"] == failures


def test_export_needs_some_image(tmp_path, cdn):
  _catalog(
    tmp_path / "catalog.jsonl",
    _serve_images(cdn, ["Alpha alba"], 4),
    license_for=lambda i: "CC-BY-NC-4.0",
  )
  with pytest.raises(ValueError, match="licenses.policy"):
    export.run(_config(tmp_path / "catalog.jsonl"), str(tmp_path / "w"))
  assert not (tmp_path / "w/dataset/manifest.json").exists()


@pytest.mark.parametrize(
  "change",
  [
    {"export.splits.train": 1.5},
    {"catalog.kind": "nosql"},
    {"licenses.policy": "comercial"},
    {"catalog.path": "missing.jsonl"},
    {"licenses.policy": "commercial", "catalog.path": "nc.jsonl"},
  ],
)
def test_a_bad_rerun_leaves_the_finished_export_whole(tmp_path, cdn, change):
  """Config, catalog and policy are checked before the old dataset stops being complete."""
  urls = _serve_images(cdn, ["Alpha alba", "Beta bella"], 5)
  _catalog(tmp_path / "catalog.jsonl", urls)
  _catalog(tmp_path / "nc.jsonl", urls, license_for=lambda i: "CC-BY-NC-4.0")
  workdir = str(tmp_path / "w")
  export.run(_config(tmp_path / "catalog.jsonl"), workdir)
  dataset = tmp_path / "w" / "dataset"
  before = {
    p: p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file() and "cache" not in p.parts
  }
  assert dataset / "manifest.json" in before
  config = _config(tmp_path / "catalog.jsonl")
  for key, value in change.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = str(tmp_path / value) if field == "path" else value
  with pytest.raises((ValueError, FileNotFoundError)):
    export.run(config, workdir)
  after = {
    p: p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file() and "cache" not in p.parts
  }
  assert after == before


# ---------------------------------------------------------------- kill and resume


def _main(workdir, catalog, *extra):
  return [
    sys.executable,
    "-m",
    "aplantida_jax.main",
    "--config=configs/export.py:demo",
    f"--workdir={workdir}",
    "--config.catalog.kind=jsonl",
    f"--config.catalog.path={catalog}",
    "--config.http.concurrency=2",
    "--config.http.per_host=2",
    "--config.export.image_size=32",
    "--config.export.min_size=16",
    "--config.export.records_per_shard=10",
    *extra,
  ]


def _env():
  return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _outputs(dataset):
  names = ["manifest.json", "classes.json", "attributions.csv"] + [
    f"splits/{p.name}" for p in sorted((dataset / "splits").iterdir())
  ]
  return {n: hashlib.sha256((dataset / n).read_bytes()).hexdigest() for n in names}


def test_kill_and_resume_gives_identical_shards(cdn, tmp_path):
  urls = _serve_images(cdn, ["Alpha alba", "Beta bella", "Delta dura"], 20, delay_s=0.05)
  catalog = tmp_path / "catalog.jsonl"
  _catalog(catalog, urls)
  subprocess.run(
    _main(tmp_path / "full", catalog),
    cwd=ROOT,
    env=_env(),
    check=True,
    capture_output=True,
    timeout=120,
  )
  full_requests = len(cdn.requests)
  assert full_requests == 60

  index = tmp_path / "resumed/dataset/cache"
  proc = subprocess.Popen(
    _main(tmp_path / "resumed", catalog),
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    lines = sum(len(p.read_text().splitlines()) for p in index.glob("*/index.jsonl"))
    if lines >= 15:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  time.sleep(0.3)  # requests already sent before the kill still reach the server's log
  assert not (tmp_path / "resumed/dataset/manifest.json").exists()
  cached = {
    json.loads(line)["key"]
    for p in index.glob("*/index.jsonl")
    for line in p.read_text().splitlines()
    if line.endswith("}")
  }
  assert 15 <= len(cached) < 60, "the kill must land mid-download"

  before = len(cdn.requests)
  subprocess.run(
    _main(tmp_path / "resumed", catalog),
    cwd=ROOT,
    env=_env(),
    check=True,
    capture_output=True,
    timeout=120,
  )
  assert len(cdn.requests) - before == 60 - len(cached), "only what was missing is downloaded"
  assert _outputs(tmp_path / "resumed/dataset") == _outputs(tmp_path / "full/dataset")


# ---------------------------------------------------------------- real photos


@pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"{FLOWERS} absent")
def test_export_flowers12_folder_source(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "aplantida_jax.main",
      "--config=configs/export.py:demo",
      f"--workdir={tmp_path}",
      "--config.catalog.kind=folder",
      f"--config.catalog.path={FLOWERS}",
      "--config.licenses.policy=research",
      "--config.export.image_size=64",
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=170,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  manifest = json.loads((tmp_path / "dataset/manifest.json").read_text())
  species = sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())
  files = sum(1 for p in FLOWERS.glob("*/*") if p.is_file())
  assert manifest["classes"] == species and manifest["shippable"] is False
  assert (
    sum(manifest["counts"].values())
    + manifest["dedupe"]["duplicate_content"]
    + manifest["downloads"]["failed"]
  ) == files
  for name in split_lib.SPLITS:
    assert set(manifest["counts_per_class"][name]) == set(species)
  first = next(shards.read_shard(shards.shard_paths(str(tmp_path / "dataset"), "val")[0]))
  assert min(Image.open(io.BytesIO(first["jpeg"])).size) == 64 and first["license"] == "unknown"


def test_bench_export_mode_reports_json(tmp_path):
  out = tmp_path / "export.json"
  subprocess.run(
    [
      sys.executable,
      "tools/bench.py",
      "export",
      "--images",
      "12",
      "--species",
      "2",
      "--repeats",
      "1",
      "--image_size",
      "48",
      "--out",
      str(out),
    ],
    cwd=ROOT,
    env=_env(),
    check=True,
    capture_output=True,
    timeout=120,
  )
  result = json.loads(out.read_text())
  assert result["mode"] == "export" and result["images"] == 12
  assert result["machine"]["cpu_count"] == os.cpu_count()
  for key in ("images_per_s", "mb_per_s", "images_per_s_per_core"):
    assert 0 < result[key]["min"] <= result[key]["median"] <= result[key]["max"]


def test_metadata_sidecars_stand_in_for_the_shards_and_a_changed_one_is_refused(
  cdn, tmp_path, monkeypatch
):
  from aplantida_jax.repro import license_check  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top

  _catalog(tmp_path / "catalog.jsonl", _serve_images(cdn, ["Alpha alba", "Beta bella"], 8))
  workdir = tmp_path / "w"
  export.run(_config(tmp_path / "catalog.jsonl"), str(workdir))
  dataset = workdir / "dataset"
  manifest = json.loads((dataset / "manifest.json").read_text())
  for split in split_lib.SPLITS:
    sidecar = dataset / manifest["metadata"][split]["file"]
    assert hashlib.sha256(sidecar.read_bytes()).hexdigest() == manifest["metadata"][split]["sha256"]
    decoded = [r for p in shards.shard_paths(str(dataset), split) for r in shards.read_shard(p)]
    lines = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert lines == [{k: r[k] for k in shards.METADATA_FIELDS} for r in decoded]
  expected = input_pipeline.read_metadata(str(dataset), "train")

  # Metadata readers and the license check decode no shard when the sidecars exist.
  def no_decoding(path):
    raise AssertionError(f"decoded {path}")

  monkeypatch.setattr(shards, "read_shard", no_decoding)
  got = input_pipeline.read_metadata(str(dataset), "train")
  assert got["sha256"] == expected["sha256"] and got["regions"] == expected["regions"]
  np.testing.assert_array_equal(got["labels"], expected["labels"])
  assert license_check.check(str(workdir))["checks"]["dataset_licenses"]["status"] == "pass"

  # A sidecar edited after the export is refused, naming it; so is a changed shard.
  sidecar = dataset / manifest["metadata"]["train"]["file"]
  original = sidecar.read_text()
  sidecar.write_text(original.replace('"CC-BY-4.0"', '"CC-BY-NC-4.0"', 1))
  with pytest.raises(shards.CorruptShardError, match=f"metadata sidecar {sidecar} differs"):
    input_pipeline.read_metadata(str(dataset), "train")
  sidecar.write_text(original)
  shard = dataset / manifest["shards"]["val"][0]["file"]
  shard.write_bytes(shard.read_bytes() + b"\0")
  report = license_check.check(str(workdir))
  assert any(
    v["file"] == os.path.relpath(shard, workdir) and "differs from the sha256" in v["problem"]
    for v in report["violations"]
  )
