"""Catalog sources: Mongo (mongomock, or a real server via APLANTIDA_TEST_MONGO_URI), JSONL, folder."""

import collections
import csv
import json
import os
import uuid
from pathlib import Path

import mongomock
import pymongo
import pytest
from PIL import Image
from pymongo import monitoring

from aplantida_jax.data import licenses
from aplantida_jax.data import sources
from aplantida_jax.data.records import ImageRecord
from configs import common

REAL_MONGO_URI = os.environ.get("APLANTIDA_TEST_MONGO_URI")
FLOWERS12 = Path(__file__).resolve().parents[2] / "shared/data/flowers12/train"

# Realistic documents in the default (DESIGN.md) shape, with noise fields a projection should drop.
LAVANDULA = {
  "scientificName": "Lavandula stoechas",
  "family": "Lamiaceae",
  "commonNames": {"es": ["cantueso", "tomillo borriquero"], "en": "French lavender"},
  "regions": ["ES", "PT", "fr"],
  "description": "x" * 1000,
  "images": [
    {
      "url": "https://cdn.example/p/1.jpg",
      "license": "CC BY-SA 4.0",
      "author": "Ana",
      "source": "inaturalist",
      "country": "ES",
      "exif": {"camera": "X100"},
    },
    {
      "url": "https://cdn.example/p/2.jpg",
      "license": "https://creativecommons.org/licenses/by-nc/4.0/",
      "author": "Jordi",
      "source": "flickr",
    },
  ],
}
CISTUS = {
  "scientificName": "Cistus albidus",
  "family": "Cistaceae",
  "regions": ["ES", "FR"],
  "images": [
    {
      "url": "https://cdn.example/c/1.jpg",
      "license": "CC0",
      "author": "Marta",
      "source": "wikimedia",
      "country": "fr",
    }
  ],
}

EXPECTED = [
  ImageRecord(
    species="Lavandula stoechas",
    url="https://cdn.example/p/1.jpg",
    license="CC-BY-SA-4.0",
    license_raw="CC BY-SA 4.0",
    author="Ana",
    source="inaturalist",
    country="ES",
    species_regions=("ES", "FR", "PT"),
    family="Lamiaceae",
    common_names=(("en", "French lavender"), ("es", "cantueso"), ("es", "tomillo borriquero")),
  ),
  ImageRecord(
    species="Lavandula stoechas",
    url="https://cdn.example/p/2.jpg",
    license="CC-BY-NC-4.0",
    license_raw="https://creativecommons.org/licenses/by-nc/4.0/",
    author="Jordi",
    source="flickr",
    country=None,
    species_regions=("ES", "FR", "PT"),
    family="Lamiaceae",
    common_names=(("en", "French lavender"), ("es", "cantueso"), ("es", "tomillo borriquero")),
  ),
  ImageRecord(
    species="Cistus albidus",
    url="https://cdn.example/c/1.jpg",
    license="CC0-1.0",
    license_raw="CC0",
    author="Marta",
    source="wikimedia",
    country="FR",
    species_regions=("ES", "FR"),
    family="Cistaceae",
  ),
]


class _CommandLog(monitoring.CommandListener):
  """Records the commands a real server received (find/getMore and their batchSize)."""

  def __init__(self):
    self.commands = []

  def started(self, event):
    self.commands.append((event.command_name, dict(event.command)))

  def succeeded(self, event):
    pass

  def failed(self, event):
    pass


@pytest.fixture
def mongo():
  """(client, db name, command log or None): mongomock, or the real server when configured."""
  if REAL_MONGO_URI:
    log = _CommandLog()
    client = pymongo.MongoClient(REAL_MONGO_URI, event_listeners=[log])
    db = f"aplantida_test_{uuid.uuid4().hex[:8]}"
    yield client, db, log
    client.drop_database(db)
    client.close()
  else:
    yield mongomock.MongoClient(), "aplantida_test", None


def _catalog(**overrides):
  cfg = common.catalog_config()
  for key, value in overrides.items():
    target = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return cfg


def _mongo_cfg(db, **overrides):
  return _catalog(
    kind="mongo",
    db=db,
    collection="Plant",
    mongo_uri=REAL_MONGO_URI or "mongodb://mock",
    **overrides,
  )


def _insert(client, db, docs):
  client[db]["Plant"].insert_many(
    [json.loads(json.dumps(d)) for d in docs]
  )  # copies: insert adds _id


def _records(cfg, client=None):
  stats = collections.Counter()
  return list(sources.iter_records(cfg, stats, mongo_client=client)), stats


def test_mongo_default_mapping(mongo):
  client, db, _ = mongo
  _insert(client, db, [LAVANDULA, CISTUS])
  records, stats = _records(_mongo_cfg(db), client)
  assert records == EXPECTED
  assert not stats
  assert records[0].regions == ("ES",) and records[1].regions == ("ES", "FR", "PT")


def test_mongo_field_mapping_override(mongo):
  client, db, _ = mongo
  nested = {
    "taxon": {"name": "Lavandula stoechas", "family": "Lamiaceae"},
    "vernacular": {"es": ["cantueso", "tomillo borriquero"], "en": "French lavender"},
    "distribution": {"countries": ["ES", "PT", "FR"]},
    "media": {
      "images": [
        {
          "src": {"href": "https://cdn.example/p/1.jpg"},
          "meta": {"license": {"name": "CC BY-SA 4.0"}},
          "credit": {"author": "Ana", "site": "inaturalist"},
          "where": {"cc": "ES"},
        },
        {
          "src": {"href": "https://cdn.example/p/2.jpg"},
          "meta": {"license": {"name": "https://creativecommons.org/licenses/by-nc/4.0/"}},
          "credit": {"author": "Jordi", "site": "flickr"},
        },
      ]
    },
  }
  _insert(client, db, [nested])
  cfg = _mongo_cfg(
    db,
    **{
      "fields.species": "taxon.name",
      "fields.family": "taxon.family",
      "fields.common_names": "vernacular",
      "fields.regions": "distribution.countries",
      "fields.images": "media.images",
      "fields.url": "src.href",
      "fields.license": "meta.license.name",
      "fields.author": "credit.author",
      "fields.source": "credit.site",
      "fields.country": "where.cc",
    },
  )
  records, stats = _records(cfg, client)
  assert records == EXPECTED[:2]
  assert not stats


BROKEN_DOCS = [
  {"family": "Lamiaceae", "images": [{"url": "https://cdn.example/a.jpg"}]},  # no species
  {"scientificName": "  ", "images": [{"url": "https://cdn.example/b.jpg"}]},  # blank species
  {"scientificName": "Ruta montana"},  # no images
  {"scientificName": "Ruta angustifolia", "images": []},  # empty images
  {
    "scientificName": "Ruta chalepensis",
    "images": {"url": "https://cdn.example/c.jpg"},
  },  # not a list
  {
    "scientificName": "Thymus vulgaris",
    "regions": ["ES", "Spain", 7],
    "images": [
      {
        "url": "https://cdn.example/t/1.jpg",
        "license": "CC-BY-4.0",
        "country": "España",
        "author": {"x": 1},
      },
      {"license": "CC-BY-4.0"},  # no url
      {"url": "ftp://cdn.example/t/3.jpg"},  # not http(s)
      {"url": "https://cdn.example/t/5.jpg", "country": "pt"},
    ],
  },
]


def test_missing_and_invalid_fields_are_counted_not_fatal(mongo):
  client, db, _ = mongo
  _insert(client, db, BROKEN_DOCS)
  records, stats = _records(_mongo_cfg(db), client)
  assert [
    (r.species, r.url, r.country, r.species_regions, r.author, r.license) for r in records
  ] == [
    ("Thymus vulgaris", "https://cdn.example/t/1.jpg", None, ("ES",), "", "CC-BY-4.0"),
    ("Thymus vulgaris", "https://cdn.example/t/5.jpg", "PT", ("ES",), "", "unknown"),
  ]
  assert stats == {
    "document: missing species (field 'scientificName')": 2,
    "document: images missing or empty (field 'images')": 2,
    "document: images not a list (field 'images')": 1,
    "document: invalid region codes (dropped)": 1,
    "image: invalid country code ignored (field 'country')": 1,
    "image: missing url (field 'url')": 1,
    "image: invalid url, not http(s) (field 'url')": 1,
  }


def test_mongo_query_limit_and_default_projection(mongo):
  client, db, log = mongo
  _insert(client, db, [LAVANDULA, CISTUS])
  records, _ = _records(_mongo_cfg(db, query='{"family": "Cistaceae"}'), client)
  assert [r.species for r in records] == ["Cistus albidus"]
  records, _ = _records(_mongo_cfg(db, limit=1), client)
  assert len({r.species for r in records}) == 1
  # Only mapped fields travel: the projection drops description and exif.
  projection = sources.default_projection(sources._field_map(common.catalog_config().fields))
  assert "images.url" in projection and "description" not in projection
  if log:  # what the server was asked for
    find = [c for name, c in log.commands if name == "find"][-1]
    assert find["projection"] == projection and find["limit"] == 1
  doc = client[db]["Plant"].find_one({"family": "Lamiaceae"}, projection)
  assert "description" not in doc and "exif" not in doc["images"][0] and doc["images"][0]["url"]


class _SpyClient:
  """Passes through to a real/mongomock client; records find() arguments and documents pulled."""

  def __init__(self, target, log=None):
    self._target, self.log = target, log if log is not None else {"pulled": 0}

  def __getitem__(self, name):
    return _SpyClient(self._target[name], self.log)

  def find(self, *args, **kwargs):
    self.log["find"] = kwargs
    cursor = self._target.find(*args, **kwargs)

    def pull():
      for doc in cursor:
        self.log["pulled"] += 1
        yield doc

    return pull()


def test_mongo_streams_documents_in_batches(mongo):
  client, db, log = mongo
  docs = [
    {"scientificName": f"Species {i:02d}", "images": [{"url": f"https://cdn.example/{i}.jpg"}]}
    for i in range(25)
  ]
  _insert(client, db, docs)
  spy = _SpyClient(client)
  stream = sources.iter_records(
    _mongo_cfg(db, batch_size=10), collections.Counter(), mongo_client=spy
  )
  first = next(stream)
  assert first.species == "Species 00"
  assert spy.log["find"]["batch_size"] == 10
  assert spy.log["pulled"] == 1  # lazy: one document read for one record
  assert len(list(stream)) == 24
  if log:  # the server really was asked for batches of 10
    assert [c["batchSize"] for name, c in log.commands if name == "getMore"] == [10, 10]


def test_mongo_bad_query_is_a_clear_error(mongo):
  client, db, _ = mongo
  with pytest.raises(ValueError, match=r"catalog.query is not valid JSON"):
    _records(_mongo_cfg(db, query="{family: Lamiaceae}"), client)


def test_mongo_connection_error_never_shows_the_password():
  uri = "mongodb://botanist:s3cr3t@127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
  with pytest.raises(RuntimeError) as err:
    _records(_catalog(kind="mongo", mongo_uri=uri))
  message = str(err.value)
  assert "s3cr3t" not in message and "botanist" not in message
  assert "mongodb://***@127.0.0.1:1" in message and "catalog.mongo_uri" in message
  assert "s3cr3t" not in json.dumps(sources.describe(_catalog(kind="mongo", mongo_uri=uri)))


@pytest.mark.parametrize(
  "uri,redacted",
  [
    (
      "mongodb://user:pass@host:27017/db?authSource=admin",
      "mongodb://***@host:27017/db?authSource=admin",
    ),
    (
      "mongodb+srv://u:p%40ss@c0.x.mongodb.net/?retryWrites=true",
      "mongodb+srv://***@c0.x.mongodb.net/?retryWrites=true",
    ),
    (
      "mongodb://u:p@ss/w@h1:1,h2:2/db",
      "mongodb://***@h1:1,h2:2/db",
    ),  # unescaped @ and / in password
    ("mongodb://alice:Qx?zPW77@host/db?authSource=admin", "mongodb://***@host/db?authSource=admin"),
    ("mongodb://alice:Qx#zP/W?7@host/db", "mongodb://***@host/db"),  # unescaped # / ?
    ("mongodb://alice:Qx%23z%2FW%3F7%40@host/db", "mongodb://***@host/db"),  # escaped
    (
      "mongodb+srv://alice:p@ss@cluster.example.net/?tls=true",
      "mongodb+srv://***@cluster.example.net/?tls=true",
    ),
    ("mongodb://h/?authSource=x&password=hunter2", "mongodb://h/?authSource=x&password=***"),
    (
      "mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN:abc",
      "mongodb://h/?authMechanismProperties=***",
    ),
    (
      "https://cdn.example/a.jpg?X-Amz-Signature=abc&w=3",
      "https://cdn.example/a.jpg?X-Amz-Signature=***&w=3",
    ),
    ("mongodb://localhost:27017", "mongodb://localhost:27017"),
    ("", ""),
  ],
)
def test_redact_uri(uri, redacted):
  assert sources.redact_uri(uri) == redacted


def test_jsonl_source_shares_the_mongo_normalisation(tmp_path):
  path = tmp_path / "catalog.jsonl"
  odd_image = {"scientificName": "Ruta montana", "images": ["https://cdn.example/r.jpg"]}
  lines = [
    json.dumps(LAVANDULA),
    "",
    "{not json",
    json.dumps(CISTUS),
    json.dumps(["a list"]),
    json.dumps(odd_image),
  ]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  records, stats = _records(_catalog(kind="jsonl", path=str(path)))
  assert records == EXPECTED
  assert stats == {
    "document: invalid JSON line": 1,
    "document: not an object": 1,
    "image: entry is not an object": 1,
  }


def test_jsonl_lines_not_utf8_and_malformed_urls_are_counted_not_fatal(tmp_path):
  path = tmp_path / "catalog.jsonl"
  broken = {
    "scientificName": "Ruta montana",
    "images": [
      {"url": "http://[::1/x.jpg"},
      {"url": "http://cdn.example:99999/y.jpg"},
      {"url": "https://cdn.example/ok.jpg"},
    ],
  }
  path.write_bytes(
    b"\n".join(
      [
        json.dumps(LAVANDULA).encode(),
        '{"scientificName": "Cistus \xe9"}'.encode("latin-1"),
        json.dumps(broken).encode(),
        json.dumps(CISTUS).encode(),
      ]
    )
    + b"\n"
  )
  records, stats = _records(_catalog(kind="jsonl", path=str(path)))
  assert [r for r in records if r.species != "Ruta montana"] == EXPECTED
  assert [r.url for r in records if r.species == "Ruta montana"] == ["https://cdn.example/ok.jpg"]
  assert stats == {
    "document: line not UTF-8": 1,
    "image: invalid url, not http(s) (field 'url')": 2,
  }


def test_jsonl_missing_file_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"catalog.path=.*make_demo_data"):
    _records(_catalog(kind="jsonl", path=str(tmp_path / "nope.jsonl")))


def test_unknown_kind_is_a_clear_error():
  with pytest.raises(ValueError, match=r"catalog.kind='csv'.*mongo.*jsonl.*folder"):
    _records(_catalog(kind="csv"))


def test_folder_source_with_sidecar_csv(tmp_path):
  root = tmp_path / "photos"
  for species, names in {
    "Cistus albidus": ["a.jpg", "b.png"],
    "Lavandula stoechas": ["c.jpg"],
  }.items():
    (root / species).mkdir(parents=True)
    for name in names:
      Image.new("RGB", (8, 8), "green").save(root / species / name)
  (root / "Lavandula stoechas" / "notes.txt").write_text("not an image")
  (root / "stray.jpg").write_bytes(b"")
  sidecar = tmp_path / "sidecar.csv"
  with open(sidecar, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "license", "author", "source", "country"])
    w.writerow([os.path.join("Cistus albidus", "a.jpg"), "CC BY 4.0", "Ana", "inaturalist", "es"])
    w.writerow(
      [str(root / "Lavandula stoechas" / "c.jpg"), "cc-by-nd", "", "", ""]
    )  # absolute path
    w.writerow([os.path.join("Gone", "x.jpg"), "CC0", "Bob", "", ""])
  cfg = _catalog(
    kind="folder",
    path=str(root),
    sidecar_csv=str(sidecar),
    default_license="CC0",
    default_author="Team",
  )
  records, stats = _records(cfg)
  got = [
    (r.species, os.path.relpath(r.path, root), r.license, r.author, r.source, r.country)
    for r in records
  ]
  assert got == [
    (
      "Cistus albidus",
      os.path.join("Cistus albidus", "a.jpg"),
      "CC-BY-4.0",
      "Ana",
      "inaturalist",
      "ES",
    ),
    ("Cistus albidus", os.path.join("Cistus albidus", "b.png"), "CC0-1.0", "Team", "local", None),
    (
      "Lavandula stoechas",
      os.path.join("Lavandula stoechas", "c.jpg"),
      "CC-BY-ND-4.0",
      "Team",
      "local",
      None,
    ),
  ]
  assert all(r.url is None and os.path.isfile(r.path) for r in records)
  assert stats == {
    "image: not an image file extension": 1,
    "image: file outside a species folder": 1,
    "sidecar: row for a file that is not in the folder": 1,
  }


@pytest.mark.skipif(not FLOWERS12.is_dir(), reason=f"{FLOWERS12} not present")
def test_folder_source_over_flowers12():
  records, stats = _records(_catalog(kind="folder", path=str(FLOWERS12)))
  by_species = collections.Counter(r.species for r in records)
  folders = sorted(p.name for p in FLOWERS12.iterdir() if p.is_dir())
  assert sorted(by_species) == folders
  assert sum(by_species.values()) == sum(len(list((FLOWERS12 / f).glob("*.jpg"))) for f in folders)
  assert {r.license for r in records} == {"unknown"}
  commercial, research = licenses.get_policy("commercial"), licenses.get_policy("research")
  assert not any(commercial.check(r.license)[0] for r in records)
  assert all(research.check(r.license)[0] for r in records)
  assert not stats


@pytest.mark.parametrize(
  "url,kept",
  [
    ("https://cdn.example/a.jpg", True),
    ("HTTP://CDN.example/a.jpg", True),  # schemes and hosts are case-insensitive
    ("ftp://cdn.example/a.jpg", False),
    ("file:///etc/passwd", False),
    ("data:image/jpeg;base64,/9j/4AAQ", False),
    ("javascript:alert(1)", False),
    ("http://[::1/a.jpg", False),  # unclosed IPv6 bracket
    ("http://cdn.example:99999/a.jpg", False),  # port out of range
    ("//cdn.example/a.jpg", False),  # no scheme
  ],
)
def test_only_http_urls_become_records_and_the_rest_are_counted(url, kept):
  stats = collections.Counter()
  doc = {"scientificName": "Thymus vulgaris", "images": [{"url": url, "license": "CC0"}]}
  records = list(sources.document_records(doc, dict(common.catalog_config().fields), stats))
  assert [r.url for r in records] == ([url] if kept else [])
  assert sum(stats.values()) == (0 if kept else 1), stats


def test_synthetic_regions_give_every_photo_a_country_of_its_species_range(tmp_path):
  from aplantida_jax.data import synthetic_regions  # pylint: disable=g-import-not-at-top

  root = tmp_path / "photos"
  for i in range(6):
    (root / f"species{i}").mkdir(parents=True)
    for j in range(4):
      Image.new("RGB", (8, 8), "green").save(root / f"species{i}" / f"{j}.jpg")
  ranges = synthetic_regions.write_sidecar(str(root), str(tmp_path / "a.csv"), seed=3)
  synthetic_regions.write_sidecar(str(root), str(tmp_path / "b.csv"), seed=3)
  assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()  # same seed
  assert sorted(ranges.values()) == sorted(list(synthetic_regions.RANGES) * 2)
  records, _ = _records(
    _catalog(kind="folder", path=str(root), sidecar_csv=str(tmp_path / "a.csv"))
  )
  assert len(records) == 24
  for r in records:
    assert r.country in synthetic_regions.RANGES[ranges[r.species]], (r.species, r.country)
  with pytest.raises(FileNotFoundError, match="no species subfolders"):
    synthetic_regions.write_sidecar(str(tmp_path / "a.csv.d"), str(tmp_path / "c.csv"), 0)
