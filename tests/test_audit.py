"""Audit stage end to end: a tiny demo catalog served from 127.0.0.1, broken URLs, Mongo, main.py."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import mongomock
import pytest
from PIL import Image

from aplantida_jax.data import audit
from aplantida_jax.data import demo_data
from aplantida_jax.data import licenses
from aplantida_jax.data import sources
from configs import audit as audit_config

ROOT = Path(__file__).resolve().parents[1]
FLOWERS12 = Path(__file__).resolve().parents[2] / "shared/data/flowers12/train"
PLOTS = ("images_per_species.png", "licenses.png", "regions.png", "url_check.png")


@pytest.fixture(scope="module")
def served_demo(tmp_path_factory):
  """A 6-species demo catalog served on a free port, and a copy with 4 broken URLs (one with credentials)."""
  root = tmp_path_factory.mktemp("demo")
  with demo_data.serve_directory(root) as server:
    demo_data.make_demo_data(
      str(root), server.url, seed=0, num_species=6, images_per_species=(4, 6), image_size=32
    )
    good = root / "catalog.jsonl"
    host = server.url.split("//")[1]
    broken = [f"{server.url}/missing/{i}.jpg" for i in range(3)] + [
      f"http://botanist:s3cr3t@{host}/private/x.jpg"
    ]
    stolen = json.loads(good.read_text(encoding="utf-8").splitlines()[0])["images"][0]["url"]
    extra = {
      "scientificName": "Ghost species",
      "regions": ["ES"],  # 4 broken URLs, 1 from another species
      "images": [{"url": u, "license": "CC0"} for u in broken + [stolen]],
    }
    bad = root / "catalog_broken.jsonl"
    bad.write_text(good.read_text(encoding="utf-8") + json.dumps(extra) + "\n", encoding="utf-8")
    yield good, bad


def _config(catalog_path, **audit_overrides):
  config = audit_config.get_config("demo")
  config.catalog.path = str(catalog_path)
  config.http.retries = 0
  config.http.timeout_s = 10.0
  for key, value in audit_overrides.items():
    config.audit[key] = value
  return config


def _expected(catalog_cfg):
  """What the report must say, computed straight from the source records."""
  stats = collections.Counter()
  records = list(sources.iter_records(catalog_cfg, stats))
  policy = licenses.get_policy("commercial")
  decisions = [policy.check(r.license) for r in records]
  return records, stats, decisions


def test_audit_demo_catalog_end_to_end(served_demo, tmp_path):
  good, _ = served_demo
  config = _config(good)
  summary = audit.run(config, str(tmp_path))
  report = json.loads((tmp_path / "audit" / "report.json").read_text())
  records, stats, decisions = _expected(config.catalog)

  assert report["species"]["count"] == len({r.species for r in records}) == 6
  assert report["images"] == {
    "total": len(records),
    "allowed": sum(ok for ok, _ in decisions),
    "rejected": sum(not ok for ok, _ in decisions),
  }
  assert report["licenses"]["rejected_by_reason"] == dict(
    collections.Counter(reason for ok, reason in decisions if not ok)
  )
  assert sum(v["images"] for v in report["licenses"]["by_license"].values()) == len(records)
  per_species = collections.Counter(r.species for r in records)
  spread = report["species"]["images_per_species"]
  assert (spread["min"], spread["max"]) == (min(per_species.values()), max(per_species.values()))
  regions = report["regions"]["images"]
  assert sum(v["images"] for v in regions.values()) == len(records)
  assert regions["Spain (ES)"]["images"] > 0 and regions["elsewhere"]["images"] > 0
  assert report["duplicates"]["locations_listed_more_than_once"] == 1  # the demo's duplicated URL
  assert report["invalid"] == dict(stats) and stats
  url_check = report["url_check"]
  assert url_check["mode"] == "all"
  assert url_check["checked"] == len({r.url for r in records}) and url_check["failed"] == 0
  assert (
    report["passed"] and summary["url_failure_rate"] == 0.0 and "6 species" in summary["metric"]
  )
  assert "PASS" in (tmp_path / "audit" / "report.md").read_text()
  for name in PLOTS:
    assert (tmp_path / "audit" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(tmp_path)) == ["audit"]  # the stage writes only its own folder


def test_sample_mode_checks_a_seeded_sample(served_demo, tmp_path):
  good, _ = served_demo
  report_checked = audit.run(_config(good, url_check="sample", sample_size=5), str(tmp_path))
  assert json.loads((tmp_path / "audit" / "report.json").read_text())["url_check"]["checked"] == 5
  assert report_checked["url_failure_rate"] == 0.0
  urls = [f"https://cdn.example/{i}.jpg" for i in range(50)]
  cfg = _config(good, url_check="sample", sample_size=10).audit
  sample = audit._urls_to_check(urls, cfg, seed=3)
  assert len(sample) == 10 and set(sample) <= set(urls)
  assert audit._urls_to_check(urls[::-1], cfg, seed=3) == sample  # catalog order does not matter
  assert audit._urls_to_check(urls, cfg, seed=4) != sample


def _main(*flags):
  env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(
    [sys.executable, "-m", "aplantida_jax.main", *flags],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_too_many_broken_urls_fail_the_stage_after_writing_the_report(served_demo, tmp_path):
  _, bad = served_demo
  result = _main(
    "--config=configs/audit.py:demo",
    f"--workdir={tmp_path}",
    f"--config.catalog.path={bad}",
    "--config.http.retries=0",
  )
  assert result.returncode != 0
  report = json.loads((tmp_path / "audit" / "report.json").read_text())
  url_check = report["url_check"]
  assert not report["passed"] and url_check["failed"] == 4
  assert url_check["failures_by_reason"] == {"http_404": 4}
  assert report["duplicates"]["urls_in_several_species"] == 1
  assert report["duplicates"]["locations_listed_more_than_once"] == 2  # + the demo's own duplicate
  rate = f"{url_check['failure_rate']:.1%}"
  assert url_check["failure_rate"] > 0.05
  assert f"URL check failed: {rate}" in result.stderr and "http_404" in result.stderr
  written = "".join((tmp_path / "audit" / n).read_text() for n in ("report.json", "report.md"))
  assert "s3cr3t" not in written and "s3cr3t" not in result.stderr + result.stdout
  assert "http://***@127.0.0.1" in written


def test_mongo_catalog_report_matches_jsonl_and_hides_credentials(served_demo, tmp_path):
  good, _ = served_demo
  client = mongomock.MongoClient()
  client["aplantida"]["Plant"].insert_many(
    [json.loads(line) for line in good.read_text(encoding="utf-8").splitlines()]
  )
  config = _config(good, url_check="none")
  jsonl_summary = audit.run(config, str(tmp_path / "jsonl"))
  config.catalog.kind = "mongo"
  config.catalog.mongo_uri = "mongodb://botanist:s3cr3t@db.example:27017/?authSource=admin"
  mongo_summary = audit.run(config, str(tmp_path / "mongo"), mongo_client=client)
  assert mongo_summary == jsonl_summary
  reports = {
    k: json.loads((tmp_path / k / "audit" / "report.json").read_text()) for k in ("jsonl", "mongo")
  }
  for key in ("species", "images", "licenses", "regions", "duplicates", "invalid", "url_check"):
    assert reports["mongo"][key] == reports["jsonl"][key], key
  assert reports["mongo"]["catalog"]["uri"] == "mongodb://***@db.example:27017/?authSource=admin"
  for name in ("report.json", "report.md"):
    assert "s3cr3t" not in (tmp_path / "mongo" / "audit" / name).read_text()


def test_main_folder_source_via_overrides(tmp_path):
  photos = tmp_path / "photos"
  for species in ("Cistus albidus", "Lavandula stoechas"):
    (photos / species).mkdir(parents=True)
    for i in range(2):
      Image.new("RGB", (16, 16), (40 * i, 120, 60)).save(photos / species / f"{i}.jpg")
  result = _main(
    "--config=configs/audit.py:demo",
    f"--workdir={tmp_path / 'w'}",
    "--config.catalog.kind=folder",
    f"--config.catalog.path={photos}",
    "--config.catalog.default_license=CC-BY-4.0",
    "--config.catalog.default_author=Ana",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "w" / "audit" / "report.json").read_text())
  assert report["species"]["count"] == 2 and report["images"] == {
    "total": 4,
    "allowed": 4,
    "rejected": 0,
  }
  assert report["url_check"]["checked"] == 0 and report["passed"]
  assert json.loads(result.stdout.strip().splitlines()[-1])["stage"] == "audit"


@pytest.mark.skipif(not FLOWERS12.is_dir(), reason=f"{FLOWERS12} not present")
def test_main_folder_source_over_flowers12_research_policy(tmp_path):
  result = _main(
    "--config=configs/audit.py:demo",
    f"--workdir={tmp_path}",
    "--config.catalog.kind=folder",
    f"--config.catalog.path={FLOWERS12}",
    "--config.licenses.policy=research",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "audit" / "report.json").read_text())
  assert report["species"]["count"] == 12 and report["policy"] == {
    "name": "research",
    "shippable": False,
  }
  assert report["images"]["allowed"] == report["images"]["total"] == 720
  assert list(report["licenses"]["by_license"]) == ["unknown"]


@pytest.mark.parametrize(
  "lines,fields,skipped",
  [
    ([], {}, "the catalog is empty"),
    (["{not json", "[1, 2]"], {}, "document: invalid JSON line ×1, document: not an object ×1"),
    (
      [
        json.dumps(
          {"scientificName": "Ruta montana", "images": [{"url": "https://x.example/a.jpg"}]}
        )
      ],
      {"species": "taxon.name"},
      "document: missing species (field 'taxon.name') ×1",
    ),
  ],
)
def test_a_catalog_without_species_fails_the_audit(tmp_path, lines, fields, skipped):
  catalog = tmp_path / "catalog.jsonl"
  catalog.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  config = audit_config.get_config("demo")
  config.catalog.path = str(catalog)
  config.catalog.fields.update(fields)
  with pytest.raises(audit.AuditFailed) as e:
    audit.run(config, str(tmp_path / "w"))
  assert str(e.value).startswith(
    "the catalog ("
  ) and f"yielded no species with an image ({skipped})" in str(e.value)
  assert "--config.catalog.fields" in str(e.value)
  report = json.loads((tmp_path / "w" / "audit" / "report.json").read_text())
  assert report["passed"] is False and report["species"]["count"] == 0


def test_mistyped_override_names_the_key(tmp_path):
  result = _main(
    "--config=configs/audit.py:demo", f"--workdir={tmp_path}", "--config.catalog.kindd=folder"
  )
  assert result.returncode != 0
  assert "kindd" in result.stderr and not (tmp_path / "audit").exists()


def test_config_rejects_unknown_variant():
  with pytest.raises(ValueError, match="demox"):
    audit_config.get_config("demox")


def test_species_spelled_several_ways_form_one_class_and_are_listed(tmp_path):
  decomposed = "Nerium olea\u0301ndrum"  # "á" as a + combining accent (NFD)
  names = ["Rosa canina", "Rosa\ncanina", "Rosa\u00a0 canina ", "Nerium oleándrum", decomposed]
  catalog = tmp_path / "catalog.jsonl"
  catalog.write_text(
    "".join(
      json.dumps({"scientificName": n, "images": [{"url": f"https://x.example/{i}.jpg"}]}) + "\n"
      for i, n in enumerate(names)
    ),
    encoding="utf-8",
  )
  config = _config(catalog, url_check="none")
  audit.run(config, str(tmp_path / "w"))
  report = json.loads((tmp_path / "w" / "audit" / "report.json").read_text())
  assert report["species"]["count"] == 2
  assert report["species"]["merged_spellings"] == {
    "Nerium oleándrum": sorted(["Nerium oleándrum", decomposed]),
    "Rosa canina": sorted(["Rosa canina", "Rosa\ncanina", "Rosa\u00a0 canina "]),
  }
  markdown = (tmp_path / "w" / "audit" / "report.md").read_text()
  assert "Species spelled several ways in the catalog" in markdown and '"Rosa\\ncanina"' in markdown
