"""Export stage: catalog → licensed, validated, deduplicated, split ArrayRecord shards.

  records (sources) → license policy → download/read → normalise (imaging) →
  content cache → dedupe by sha256 → stratified split → shards + manifest

Resumable by construction: every normalised image lands in a content cache
(`dataset/cache/<params>/`, atomic per file, indexed by an append-only log), and
everything after the cache is a pure function of it. A killed run, rerun,
downloads only what is missing and writes byte-identical shards. The manifest
is written last and atomically: a complete manifest means a complete export.
"""

import collections
import concurrent.futures as cf
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os

import tqdm
from absl import logging

from aplantida_jax import fileio
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.data import fetch
from aplantida_jax.data import imaging
from aplantida_jax.data import licenses
from aplantida_jax.data import shards
from aplantida_jax.data import sources
from aplantida_jax.data import split as split_lib

# Failures worth remembering across runs: the file is gone, the server answers with a page,
# the URL or its redirects can never lead to an image. Timeouts, 5xx, 429, opt-outs and too_large
# are retried next run; delete dataset/cache/ to retry everything.
_PERMANENT = ("http_404", "http_410", "not_image", "invalid_url", "too_many_redirects")


def _location_key(location: str) -> str:
  return hashlib.sha256(location.encode()).hexdigest()


class Cache:
  """Normalised JPEGs keyed by sha256(location), plus an append-only index.

  The index (`index.jsonl`) is the source of truth: a line is appended only
  after its JPEG was renamed into place, so a kill can at worst lose the last
  lines (those images are fetched again), never vouch for a missing file.
  The folder name carries the normalisation parameters, so changing
  image_size, quality or the validity limits starts a fresh cache.
  """

  def __init__(self, root: str, export_cfg):
    e = export_cfg
    tag = f"{e.image_size}px-q{e.jpeg_quality}-min{e.min_size}-max{e.max_pixels}"
    self.dir = os.path.join(root, tag)
    os.makedirs(self.dir, exist_ok=True)
    self._index_path = os.path.join(self.dir, "index.jsonl")
    self.entries = self._read_index()
    self._index = open(self._index_path, "a", encoding="utf-8", buffering=1)
    if self._index.tell() and not self._ends_with_newline():
      self._index.write("\n")  # a kill cut the last line; start a fresh one

  def _ends_with_newline(self) -> bool:
    with open(self._index_path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      return f.read(1) == b"\n"

  def _read_index(self) -> dict:
    entries = {}
    if os.path.exists(self._index_path):
      with open(self._index_path, encoding="utf-8") as f:
        for line in f:
          try:
            entry = json.loads(line)
            entries[entry["key"]] = entry
          except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill: that image is fetched again
    return entries

  def path(self, key: str) -> str:
    return os.path.join(self.dir, key[:2], key + ".jpg")

  def put_image(self, key: str, jpeg: bytes) -> str:
    """Writes the JPEG atomically (any thread); returns its sha256. Call record() after."""
    path = self.path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fileio.write_bytes(path, jpeg)
    return hashlib.sha256(jpeg).hexdigest()

  def record(self, entry: dict) -> None:
    """Appends {"key", "sha256"} or {"key", "reason"} to the index (main thread only)."""
    self.entries[entry["key"]] = entry
    self._index.write(json.dumps(entry, sort_keys=True) + "\n")

  def read(self, key: str) -> bytes:
    with open(self.path(key), "rb") as f:
      return f.read()

  def close(self):
    self._index.close()


def _licensed_records(config, stats, policy):
  """Streams the catalog; returns (allowed records, Counter of rejection reasons).

  A record's license becomes the one the policy uses (`Policy.choose`: one alternative
  of an `OR`), which shards and attributions then carry; license_raw keeps the catalog's.
  """
  allowed, rejected = [], collections.Counter()
  for record in sources.iter_records(config.catalog, stats):
    chosen, ok, reason = policy.choose(record.license)
    if ok:
      allowed.append(dataclasses.replace(record, license=chosen))
    else:
      rejected[reason] += 1
  return allowed, rejected


def _normalise_to_cache(cache, key, data, path, export_cfg):
  """Worker: bytes (or a local file) → normalised JPEG in the cache → index entry."""
  try:
    if path is not None:
      with open(path, "rb") as f:
        data = f.read()
    jpeg, _ = imaging.normalise(
      data,
      image_size=export_cfg.image_size,
      min_size=export_cfg.min_size,
      max_pixels=export_cfg.max_pixels,
      quality=export_cfg.jpeg_quality,
    )
  except imaging.ImageError as e:
    return {"key": key, "reason": e.reason}
  except OSError:
    return {"key": key, "reason": "unreadable_file", "transient": True}
  return {"key": key, "sha256": cache.put_image(key, jpeg)}


def _fill_cache(todo: dict, cache: Cache, config, total: int) -> collections.Counter:
  """Fetches (URL) or reads (path) and normalises every `todo` record (key → ImageRecord).

  Returns reasons of the failures this run will not remember (retried next run).
  """
  transient = collections.Counter()
  workers = config.export.workers or os.cpu_count() or 1
  urls = [(k, r.url) for k, r in todo.items() if r.url]
  paths = [(k, r.path) for k, r in todo.items() if not r.url]
  downloads = fetch.download(urls, config.http, max_bytes=config.export.max_bytes)
  bar = tqdm.tqdm(total=total, initial=total - len(todo), unit="img", desc="export", smoothing=0.05)

  def finish(entry):
    if entry.pop("transient", False):
      transient[entry["reason"]] += 1
      logging.log_first_n(
        logging.WARNING,
        "export: %s (%s); retried on the next run",
        10,
        todo[entry["key"]].location,
        entry["reason"],
      )
    else:
      cache.record(entry)
    bar.update(1)

  with (
    contextlib.closing(downloads),
    cf.ThreadPoolExecutor(workers, thread_name_prefix="normalise") as pool,
  ):
    pending = set()

    def submit(key, data, path):
      nonlocal pending
      pending.add(pool.submit(_normalise_to_cache, cache, key, data, path, config.export))
      if len(pending) >= 4 * workers:  # bound decoded-but-unwritten work
        done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for future in done:
          finish(future.result())

    for key, path in paths:
      submit(key, None, path)
    for result in downloads:
      if result.ok:
        submit(result.key, result.data, None)
      else:
        finish(
          {
            "key": result.key,
            "reason": result.reason,
            "transient": result.reason not in _PERMANENT,
          }
        )
    for future in cf.as_completed(pending):
      finish(future.result())
  bar.close()
  return transient


def _classes(species_names, records_by_species) -> list:
  out = []
  for index, species in enumerate(species_names):
    first = min(records_by_species[species], key=lambda r: r.location)
    names = collections.defaultdict(list)
    for lang, name in first.common_names:
      names[lang].append(name)
    out.append(
      dict(
        index=index,
        species=species,
        common_names=dict(names),
        regions=list(first.species_regions),
        family=first.family,
      )
    )
  return out


def _shard_record(record, label, sha, jpeg) -> dict:
  return dict(
    jpeg=jpeg,
    label=label,
    species=record.species,
    regions=list(record.regions),
    country=record.country,
    license=record.license,
    author=record.author,
    url=record.location,
    sha256=sha,
  )


def _write_split(splits_dir, name, items, records, labels, cache, records_per_shard) -> tuple:
  """Writes one split's shards and metadata sidecar (items in their final order).

  Returns (shard info, sidecar info) for the manifest.
  """
  num_shards = max(1, math.ceil(len(items) / records_per_shard))
  info = []
  for i in range(num_shards):
    chunk = items[i * records_per_shard : (i + 1) * records_per_shard]
    path = shards.shard_path(os.path.dirname(splits_dir), name, i, num_shards)
    shards.write_shard(
      path,
      (
        shards.encode(
          _shard_record(
            records[(item.species, item.location)],
            labels[item.species],
            item.sha256,
            cache.read(_location_key(item.location)),
          )
        )
        for item in chunk
      ),
    )
    with open(path, "rb") as f:
      digest = hashlib.file_digest(f, "sha256").hexdigest()
    info.append(
      dict(
        file=os.path.relpath(path, os.path.dirname(splits_dir)), records=len(chunk), sha256=digest
      )
    )
  # The sidecar from the same fields (labels, regions, licenses, ...), without the JPEGs.
  sidecar = shards.write_metadata(
    os.path.dirname(splits_dir),
    name,
    (
      _shard_record(records[(item.species, item.location)], labels[item.species], item.sha256, b"")
      for item in items
    ),
  )
  return info, sidecar


def _remove_stale_shards(splits_dir, keep):
  for name in os.listdir(splits_dir):
    if ".array_record-" in name and os.path.join(splits_dir, name) not in keep:
      os.remove(os.path.join(splits_dir, name))


def _write_attributions(path, splits, records):
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(
    ["sha256", "species", "author", "license", "source", "url", "attribution_required"]
  )
  for item in sorted((i for items in splits.values() for i in items), key=lambda i: i.sha256):
    r = records[(item.species, item.location)]
    writer.writerow(
      [
        item.sha256,
        r.species,
        r.author,
        r.license,
        r.source,
        r.location,
        licenses.requires_attribution(r.license),
      ]
    )
  fileio.write_text(path, buf.getvalue())


def _resolved_config(config) -> dict:
  resolved = config.to_dict()
  resolved["catalog"]["mongo_uri"] = sources.redact_uri(resolved["catalog"]["mongo_uri"])
  return resolved


def run(config, workdir: str) -> dict:
  """Runs the export into `<workdir>/dataset/`; returns a summary for the run table."""
  out_dir = workdir_lib.Workdir(workdir).dataset
  splits_dir = os.path.join(out_dir, "splits")
  os.makedirs(splits_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, "manifest.json")
  policy = licenses.get_policy(config.licenses.policy)
  fetch.check_config(config.http)
  split_lib.check_options(dict(config.export.splits), config.export.small_class_policy)

  source_stats = collections.Counter()
  records, license_rejections = _licensed_records(config, source_stats, policy)
  logging.info(
    "export: %d records allowed by policy %r, %d rejected",
    len(records),
    policy.name,
    sum(license_rejections.values()),
  )
  locations = {_location_key(r.location): r for r in records}  # one fetch per URL or path

  cache = Cache(os.path.join(out_dir, "cache"), config.export)
  try:
    todo = {k: r for k, r in locations.items() if k not in cache.entries}
    logging.info(
      "export: %d unique images, %d cached, %d to fetch",
      len(locations),
      len(locations) - len(todo),
      len(todo),
    )
    transient = _fill_cache(todo, cache, config, total=len(locations))
    entries = {k: cache.entries.get(k, {}) for k in locations}

    failures = collections.Counter(transient)
    failures.update(e["reason"] for e in entries.values() if "reason" in e)
    by_location = {}
    for r in records:  # one record per (species, location): the metadata shards carry
      by_location.setdefault((r.species, r.location), r)
    items = [
      split_lib.Item(entries[_location_key(loc)]["sha256"], species, loc)
      for (species, loc) in sorted(by_location)
      if "sha256" in entries[_location_key(loc)]
    ]
    unique = split_lib.dedupe(items)
    result = split_lib.split(
      unique.items,
      ratios=dict(config.export.splits),
      min_per_class=config.export.min_per_class,
      small_class_policy=config.export.small_class_policy,
      seed=config.seed,
    )
    if not result.species:
      raise ValueError(
        f"export: no image survived (catalog {sources.describe(config.catalog)}; "
        f"license rejections {dict(license_rejections)}; failures {dict(failures)}; "
        f"species below export.min_per_class={config.export.min_per_class}: "
        f"{len(result.small_species)}). Check the catalog, licenses.policy and export.min_per_class."
      )
    labels = {species: i for i, species in enumerate(result.species)}

    # Config, catalog and downloads are good: only now does the old export stop being
    # complete (until the new manifest is written last). A bad rerun leaves it whole.
    if os.path.exists(manifest_path):
      os.remove(manifest_path)
    written = {
      name: _write_split(
        splits_dir, name, list(items), by_location, labels, cache, config.export.records_per_shard
      )
      for name, items in result.splits.items()
    }
    shard_info = {name: info for name, (info, _) in written.items()}
    metadata_info = {name: sidecar for name, (_, sidecar) in written.items()}
  finally:
    cache.close()
  _remove_stale_shards(
    splits_dir, {os.path.join(out_dir, s["file"]) for info in shard_info.values() for s in info}
  )

  records_by_species = collections.defaultdict(list)
  for r in by_location.values():
    records_by_species[r.species].append(r)
  classes = _classes(result.species, records_by_species)
  fileio.write_json(os.path.join(out_dir, "classes.json"), classes)
  _write_attributions(os.path.join(out_dir, "attributions.csv"), result.splits, by_location)

  counts = {name: len(items) for name, items in result.splits.items()}
  manifest = dict(
    num_classes=len(result.species),
    image_size=config.export.image_size,
    license_policy=policy.name,
    shippable=policy.shippable,
    counts=counts,
    counts_per_class={
      name: dict(sorted(collections.Counter(i.species for i in items).items()))
      for name, items in result.splits.items()
    },
    classes=list(result.species),
    shards=shard_info,
    metadata=metadata_info,
    catalog=dict(
      source=sources.describe(config.catalog),
      image_records=len(records) + sum(license_rejections.values()),
      skipped=dict(sorted(source_stats.items())),
    ),
    licenses=dict(
      allowed=len(records),
      rejected=dict(sorted(license_rejections.items())),
      kept_by_license=dict(
        sorted(
          collections.Counter(
            by_location[(i.species, i.location)].license
            for items in result.splits.values()
            for i in items
          ).items()
        )
      ),
    ),
    downloads=dict(
      unique_locations=len(locations),
      failed=sum(failures.values()),
      failures=dict(sorted(failures.items())),
    ),
    dedupe=dict(
      duplicate_records=len(records) - len(by_location),  # same URL, same species
      duplicate_content=unique.duplicates,
      conflicting_species=unique.conflicting,
    ),
    small_classes=dict(
      policy=result.small_class_policy,
      min_per_class=config.export.min_per_class,
      species=dict(sorted(result.small_species.items())),
    ),
    config=_resolved_config(config),
  )
  fileio.write_json(manifest_path, manifest)
  logging.info("export: wrote %s", manifest_path)
  total_failed = sum(failures.values())
  return dict(
    metric=(
      f"{counts['train']}/{counts['val']}/{counts['test']} train/val/test images, "
      f"{len(result.species)} classes, {total_failed} failed downloads"
    ),
    counts=counts,
    num_classes=len(result.species),
    failures=dict(failures),
    license_rejected=sum(license_rejections.values()),
  )
