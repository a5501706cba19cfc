"""Catalog sources (mongo | jsonl | folder) → a stream of `ImageRecord`s.

The three sources only differ in where documents come from. Every document,
whatever its origin, goes through one function (`document_records`) that maps
fields (`catalog.fields.*`, dotted paths), validates them, normalises the
license, and counts what it had to skip, so the sources cannot drift apart.

Nothing here holds the catalog in memory: Mongo documents are streamed from a
cursor in `catalog.batch_size` batches, JSONL is read line by line. Bad
documents and images are counted per reason in the caller's `stats` Counter
(keys start with "document: " or "image: ") and never stop the run.

Mongo URIs carry credentials: anything logged or written goes through
`redact_uri`.
"""

import collections
import csv
import json
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator

from absl import logging

from aplantida_jax.data import licenses
from aplantida_jax.data.records import ImageRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_SECRET_PARAMS = re.compile(r"(pass|pwd|secret|token|key|credential|sig)", re.IGNORECASE)
_FIELD_NAMES = (
  "species",
  "family",
  "common_names",
  "regions",
  "images",
  "url",
  "license",
  "author",
  "source",
  "country",
)


def redact_uri(uri: str) -> str:
  """Removes credentials: `scheme://user:pw@host/?password=x` → `scheme://***@host/?password=***`.

  Everything up to the last "@" is treated as user info, so a password with an
  unescaped "@", "/" or "?" is hidden too (an "@" in the query hides the host as well:
  too much hidden, never too little).
  """
  if not uri:
    return uri
  uri = str(uri)
  scheme_end = uri.find("://")
  start = scheme_end + 3 if scheme_end >= 0 else 0
  at = uri.rfind("@")
  if at >= start:
    uri = uri[:start] + "***" + uri[at:]
  head, sep, query = uri.partition("?")
  if sep:
    params = []
    for part in query.split("&"):
      name, eq, value = part.partition("=")
      secret = eq and (_SECRET_PARAMS.search(name) or _SECRET_PARAMS.search(value))
      params.append(f"{name}=***" if secret else part)
    query = "&".join(params)
  return head + sep + query


def get_path(doc, path: str):
  """Value at a dotted path ("meta.license.name", "images.0.url"), or None."""
  value = doc
  for key in path.split("."):
    if isinstance(value, dict):
      value = value.get(key)
    elif isinstance(value, (list, tuple)) and key.isdigit() and int(key) < len(value):
      value = value[int(key)]
    else:
      return None
  return value


def _field_map(fields) -> dict:
  return {name: fields[name] for name in _FIELD_NAMES}


def _text(value) -> str:
  if isinstance(value, (str, int, float)) and not isinstance(value, bool):
    return " ".join(str(value).split())
  return ""


def species_name(value) -> tuple:
  """(class name, the catalog's spelling): Unicode NFC with whitespace collapsed, so that
  "Rosa\u00a0canina", "Rosa  canina" and a decomposed "é" name one class (the audit lists them)."""
  raw = str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
  return " ".join(unicodedata.normalize("NFC", raw).split()), raw


def _regions(value, stats) -> tuple:
  """Species regions: a list of ISO codes (or one "ES,PT" string) → sorted unique upper-case codes."""
  if value is None:
    return ()
  items = value.split(",") if isinstance(value, str) else value
  if not isinstance(items, (list, tuple)):
    stats["document: regions is not a list (ignored)"] += 1
    return ()
  codes = {_text(v).upper() for v in items}
  valid = {c for c in codes if _COUNTRY.match(c)}
  if valid != codes:
    stats["document: invalid region codes (dropped)"] += 1
  return tuple(sorted(valid))


def _common_names(value) -> tuple:
  """{"es": "cantueso"} / {"es": ["a", "b"]} / [{"lang", "name"}] / "name" → ((lang, name), ...)."""
  pairs = []
  if isinstance(value, dict):
    for lang, names in value.items():
      for name in names if isinstance(names, list) else [names]:
        pairs.append((str(lang), _text(name)))
  elif isinstance(value, list):
    for item in value:
      if isinstance(item, dict):
        pairs.append((_text(item.get("lang", item.get("language", ""))), _text(item.get("name"))))
  elif _text(value):
    pairs.append(("", _text(value)))
  return tuple(sorted({p for p in pairs if p[1]}))


def _valid_url(url: str) -> bool:
  try:
    parts = urllib.parse.urlsplit(url)
    _ = parts.port  # raises on a malformed port
  except ValueError:  # "http://[::1/x.jpg": an unclosed IPv6 bracket
    return False
  return parts.scheme in ("http", "https") and bool(parts.netloc)


def document_records(
  doc, fields: dict, stats: collections.Counter, location: str = "url"
) -> Iterator[ImageRecord]:
  """One catalog document → its valid image records; skips are counted in `stats`.

  `fields` maps record field names to dotted paths (image fields relative to one
  entry of the images array). `location` says whether images carry a "url"
  (mongo, jsonl) or a local "path" (folder).
  """
  if not isinstance(doc, dict):
    stats["document: not an object"] += 1
    return
  species, species_raw = species_name(get_path(doc, fields["species"]))
  if not species:
    stats[f"document: missing species (field '{fields['species']}')"] += 1
    return
  images = get_path(doc, fields["images"])
  if not isinstance(images, list) or not images:
    what = (
      "not a list" if images is not None and not isinstance(images, list) else "missing or empty"
    )
    stats[f"document: images {what} (field '{fields['images']}')"] += 1
    return
  shared = dict(
    species=species,
    species_raw=species_raw if species_raw != species else "",
    species_regions=_regions(get_path(doc, fields["regions"]), stats),
    family=_text(get_path(doc, fields["family"])),
    common_names=_common_names(get_path(doc, fields["common_names"])),
  )
  location_field = fields["url"] if location == "url" else "path"
  for image in images:
    if not isinstance(image, dict):
      stats["image: entry is not an object"] += 1
      continue
    where = get_path(image, location_field)
    where = where.strip() if isinstance(where, str) else ""  # exact: paths may hold double spaces
    if not where:
      stats[f"image: missing {location} (field '{location_field}')"] += 1
      continue
    if location == "url" and not _valid_url(where):
      stats[f"image: invalid url, not http(s) (field '{location_field}')"] += 1
      continue
    country = _text(get_path(image, fields["country"])).upper() or None
    if country and not _COUNTRY.match(country):
      stats[f"image: invalid country code ignored (field '{fields['country']}')"] += 1
      country = None
    license_raw = _text(get_path(image, fields["license"]))
    yield ImageRecord(
      **shared,
      **{location: where},
      license=licenses.normalize(license_raw),
      license_raw=license_raw,
      author=_text(get_path(image, fields["author"])),
      source=_text(get_path(image, fields["source"])),
      country=country,
    )


def _json_setting(text: str, name: str) -> dict | None:
  if not text or not text.strip():
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{name} is not valid JSON ({e}): {text!r}. "
      f"Example: --config.{name}='{{\"family\": \"Lamiaceae\"}}'"
    ) from None
  if not isinstance(value, dict):
    raise ValueError(f"{name} must be a JSON object, got {text!r}.")
  return value


def default_projection(fields: dict) -> dict:
  """Only the mapped fields (image fields under the images path); no path inside another."""
  paths = {fields[k] for k in ("species", "family", "common_names", "regions")}
  paths |= {
    f"{fields['images']}.{fields[k]}" for k in ("url", "license", "author", "source", "country")
  }
  kept = {p for p in paths if not any(p.startswith(q + ".") for q in paths)}
  return {p: 1 for p in sorted(kept)}


def _mongo_documents(cfg, fields: dict, client) -> Iterator[dict]:
  """Streams the collection in cursor batches of `catalog.batch_size` documents."""
  import pymongo  # pylint: disable=g-import-not-at-top  (only the mongo source needs it)

  query = _json_setting(cfg.query, "catalog.query") or {}
  projection = _json_setting(cfg.projection, "catalog.projection") or default_projection(fields)
  where = f"{redact_uri(cfg.mongo_uri)} db={cfg.db} collection={cfg.collection}"
  logging.info("reading catalog from %s query=%s", where, json.dumps(query))
  own_client = client is None
  try:
    if own_client:
      client = pymongo.MongoClient(cfg.mongo_uri)  # timeouts etc.: URI options
    cursor = client[cfg.db][cfg.collection].find(
      query, projection, batch_size=cfg.batch_size, limit=cfg.limit
    )
    try:
      yield from cursor
    finally:
      cursor.close()
  except pymongo.errors.PyMongoError as e:
    message = str(e).replace(cfg.mongo_uri, redact_uri(cfg.mongo_uri))
    raise RuntimeError(
      f"Cannot read the Mongo catalog at {where}: {type(e).__name__}: "
      f"{message}. Check --config.catalog.mongo_uri/db/collection."
    ) from None
  finally:
    if own_client and client is not None:
      client.close()


def _jsonl_documents(cfg, stats) -> Iterator:
  """One document per line; unparsable lines (bad JSON, not UTF-8) are counted, not fatal."""
  if not os.path.isfile(cfg.path):
    raise FileNotFoundError(
      f"catalog.path={cfg.path!r} is not a file (catalog.kind=jsonl). Create the demo "
      "catalog with `python tools/make_demo_data.py` or point --config.catalog.path at a JSONL file."
    )
  with open(cfg.path, "rb") as f:
    for line_number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        stats["document: line not UTF-8"] += 1
        logging.warning(
          "%s:%d: not UTF-8 (byte %#x at column %d; save the file as UTF-8), skipped",
          cfg.path,
          line_number,
          raw[e.start],
          e.start + 1,
        )
        continue
      if not line.strip():
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        stats["document: invalid JSON line"] += 1
        logging.warning("%s:%d: invalid JSON (%s), skipped", cfg.path, line_number, e.msg)


_FOLDER_FIELDS = {name: name for name in _FIELD_NAMES}


def _read_sidecar(path: str, root: str) -> dict:
  """CSV with columns path,license,author,source,country → {path relative to root: row}."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or "path" not in reader.fieldnames:
      raise ValueError(
        f"catalog.sidecar_csv={path!r} needs a header with a 'path' column "
        "(path,license,author,source,country; path relative to catalog.path)."
      )
    rows = {}
    for row in reader:
      if row.get("path"):
        p = row.pop("path")
        rows[os.path.normpath(os.path.relpath(p, root) if os.path.isabs(p) else p)] = row
    return rows


def _folder_documents(cfg, stats) -> Iterator[dict]:
  """One document per species subfolder, shaped like a catalog document."""
  root = cfg.path
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"catalog.path={root!r} is not a folder (catalog.kind=folder): "
      "it must hold one subfolder of images per species."
    )
  sidecar = _read_sidecar(cfg.sidecar_csv, root) if cfg.sidecar_csv else {}
  defaults = dict(license=cfg.default_license, author=cfg.default_author, source="local")
  unmatched = set(sidecar)
  for entry in sorted(os.scandir(root), key=lambda e: e.name):
    if not entry.is_dir():
      stats["image: file outside a species folder"] += 1
      continue
    images = []
    for name in sorted(os.listdir(entry.path)):
      if not name.lower().endswith(IMAGE_EXTENSIONS):
        stats["image: not an image file extension"] += 1
        continue
      relative = os.path.join(entry.name, name)
      unmatched.discard(relative)
      row = {k: v for k, v in sidecar.get(relative, {}).items() if v}
      images.append({**defaults, **row, "path": os.path.join(root, relative)})
    yield {"species": entry.name, "images": images}
  if unmatched:
    stats["sidecar: row for a file that is not in the folder"] += len(unmatched)


def iter_records(
  catalog_cfg, stats: collections.Counter, mongo_client=None
) -> Iterator[ImageRecord]:
  """Streams the catalog named by `catalog_cfg` (config `catalog`) as `ImageRecord`s.

  `mongo_client` lets tests pass a mongomock (or instrumented) client; by default
  a pymongo client is opened on `catalog.mongo_uri` and closed at the end.
  """
  kind = catalog_cfg.kind
  fields = _field_map(catalog_cfg.fields)
  if kind == "mongo":
    documents, location = _mongo_documents(catalog_cfg, fields, mongo_client), "url"
  elif kind == "jsonl":
    documents, location = _jsonl_documents(catalog_cfg, stats), "url"
  elif kind == "folder":
    documents, location, fields = _folder_documents(catalog_cfg, stats), "path", _FOLDER_FIELDS
  else:
    raise ValueError(f"Unknown catalog.kind={kind!r}; use 'mongo', 'jsonl' or 'folder'.")
  for doc in documents:
    yield from document_records(doc, fields, stats, location)


def describe(catalog_cfg) -> dict:
  """Where the catalog comes from, safe to log and store (no credentials)."""
  c = catalog_cfg
  if c.kind == "folder":
    return dict(
      kind="folder",
      path=c.path,
      sidecar_csv=c.sidecar_csv,
      default_license=c.default_license,
      default_author=c.default_author,
    )
  where = (
    dict(
      uri=redact_uri(c.mongo_uri),
      db=c.db,
      collection=c.collection,
      query=c.query,
      projection=c.projection,
      limit=c.limit,
    )
    if c.kind == "mongo"
    else dict(path=c.path)
  )
  return dict(kind=c.kind, **where, fields=_field_map(c.fields))
