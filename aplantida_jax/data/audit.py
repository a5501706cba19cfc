"""Audit stage: what is in the catalog, what the license policy keeps, whether URLs work.

Run before the (long) export so that a bad field mapping, a license surprise or
a broken CDN shows up in minutes. Writes <workdir>/audit/report.json, report.md
and PNG plots; the catalog is streamed, so only per-species/per-license counters
and the set of URLs are held in memory. When more than
`audit.max_failure_rate` of the checked URLs fail, the report is written first
and then `AuditFailed` is raised (main.py exits non-zero) with the rate and the
top failure reasons.
"""

import collections
import json
import os
import random
import statistics

from absl import logging
from tqdm import tqdm

from aplantida_jax import errors
from aplantida_jax import fileio
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.data import fetch
from aplantida_jax.data import licenses
from aplantida_jax.data import sources
from aplantida_jax.data.records import in_region

REGION_BUCKETS = ("Spain (ES)", "Europe (not ES)", "elsewhere", "unknown")
_TOP = 20  # rows in "top N" lists of the report


class AuditFailed(errors.StageError):
  """The catalog is not fit for export (no species, too many broken URLs); the report says why."""


def region_bucket(regions, regions_cfg) -> str:
  """Spain / rest of Europe / elsewhere / unknown, for an image's or a species' regions."""
  if not regions:
    return "unknown"
  if in_region(regions, regions_cfg.spain):
    return "Spain (ES)"
  if in_region(regions, regions_cfg.europe):
    return "Europe (not ES)"
  return "elsewhere"


class _Tally:
  """Streaming counters over image records."""

  def __init__(self, policy, regions_cfg):
    self.policy = policy
    self.regions_cfg = regions_cfg
    self.images = collections.Counter()  # species → images
    self.allowed = collections.Counter()  # species → allowed images
    self.species_regions = {}  # species → its regions (first document wins)
    self.by_license = collections.Counter()  # SPDX id → images
    self.decisions = {}  # SPDX id → (allowed, reason)
    self.unrecognised = collections.Counter()  # raw strings that normalised to "unknown"
    self.regions = collections.Counter()  # (bucket, allowed) → images
    self.first_species = {}  # url or path → first species that listed it
    self.repeats = collections.Counter()  # url or path → extra listings
    self.cross_species = set()  # URLs listed under several species
    self.spellings = collections.defaultdict(set)  # species → the catalog's spellings of it

  def add(self, record):
    if record.license not in self.decisions:
      self.decisions[record.license] = self.policy.check(record.license)
    allowed = self.decisions[record.license][0]
    self.images[record.species] += 1
    self.allowed[record.species] += allowed
    self.species_regions.setdefault(record.species, record.species_regions)
    self.spellings[record.species].add(record.species_raw or record.species)
    self.by_license[record.license] += 1
    if record.license == licenses.UNKNOWN and licenses.unrecognised(record.license_raw):
      self.unrecognised[record.license_raw] += 1
    self.regions[(region_bucket(record.regions, self.regions_cfg), allowed)] += 1
    first = self.first_species.get(record.location)
    if first is None:
      self.first_species[record.location] = record.species
    else:
      self.repeats[record.location] += 1
      if first != record.species:
        self.cross_species.add(record.location)

  @property
  def urls(self):
    return [loc for loc in self.first_species if loc.startswith(("http://", "https://"))]


def _spread(counts) -> dict:
  values = sorted(counts)
  if not values:
    return dict(min=0, median=0, max=0, mean=0.0)
  return dict(
    min=values[0],
    median=statistics.median(values),
    max=values[-1],
    mean=round(statistics.fmean(values), 2),
  )


def _urls_to_check(urls, audit_cfg, seed: int) -> list:
  """All unique URLs, or a sample drawn with `seed` from the sorted set (catalog order does not matter)."""
  mode = audit_cfg.url_check
  if mode not in ("all", "sample", "none"):
    raise ValueError(f"audit.url_check={mode!r}; use 'all', 'sample' or 'none'.")
  if mode == "none":
    return []
  urls = sorted(urls)
  if mode == "sample" and len(urls) > audit_cfg.sample_size:
    urls = sorted(random.Random(seed).sample(urls, audit_cfg.sample_size))
  return urls


def _url_report(checks, mode: str, max_rate: float) -> dict:
  failed = [c for c in checks if not c.ok]
  rate = len(failed) / len(checks) if checks else 0.0
  return dict(
    mode=mode,
    checked=len(checks),
    ok=len(checks) - len(failed),
    failed=len(failed),
    failure_rate=round(rate, 4),
    max_failure_rate=max_rate,
    passed=rate <= max_rate,
    failures_by_reason=dict(collections.Counter(c.reason for c in failed).most_common()),
    failed_examples=[
      dict(url=sources.redact_uri(c.url), status=c.status, reason=c.reason) for c in failed[:_TOP]
    ],
  )


def build_report(tally: _Tally, stats, url_check: dict, config) -> dict:
  """The audit report as a JSON-able dict (no credentials: catalog is described redacted)."""
  per_species = tally.images
  total = sum(per_species.values())
  allowed = sum(tally.allowed.values())
  rejected_by_reason = collections.Counter()
  for spdx, count in tally.by_license.items():
    ok, reason = tally.decisions[spdx]
    if not ok:
      rejected_by_reason[reason] += count
  species_by_bucket = collections.Counter(
    region_bucket(r, config.regions) for r in tally.species_regions.values()
  )
  ranked = per_species.most_common()
  return {
    "catalog": sources.describe(config.catalog),
    "policy": {"name": tally.policy.name, "shippable": tally.policy.shippable},
    "species": {
      "count": len(per_species),
      "images_per_species": _spread(per_species.values()),
      "allowed_images_per_species": _spread(tally.allowed[s] for s in per_species),
      "without_allowed_images": sorted(s for s in per_species if not tally.allowed[s]),
      "most_images": ranked[:_TOP],
      "fewest_images": ranked[::-1][:_TOP],
      # Spellings that differ only in whitespace or Unicode form, merged into one class.
      "merged_spellings": {s: sorted(v) for s, v in sorted(tally.spellings.items()) if len(v) > 1},
    },
    "images": {"total": total, "allowed": allowed, "rejected": total - allowed},
    "licenses": {
      "by_license": {
        spdx: {"images": n, "allowed": tally.decisions[spdx][0], "reason": tally.decisions[spdx][1]}
        for spdx, n in tally.by_license.most_common()
      },
      "rejected_by_reason": dict(rejected_by_reason.most_common()),
      "unrecognised_strings": dict(tally.unrecognised.most_common(_TOP)),
    },
    "regions": {
      "images": {
        b: {
          "images": tally.regions[(b, True)] + tally.regions[(b, False)],
          "allowed": tally.regions[(b, True)],
        }
        for b in REGION_BUCKETS
      },
      "species": {b: species_by_bucket[b] for b in REGION_BUCKETS},
    },
    "duplicates": {
      "locations_listed_more_than_once": len(tally.repeats),
      "extra_listings": sum(tally.repeats.values()),
      "urls_in_several_species": len(tally.cross_species),
      "examples": [sources.redact_uri(loc) for loc in sorted(tally.repeats)[:_TOP]],
    },
    "invalid": dict(stats.most_common()),
    "url_check": url_check,
    "passed": url_check.get("passed", True) and bool(per_species),
  }


def _markdown(report: dict) -> str:
  sp, im, lic, uc = report["species"], report["images"], report["licenses"], report["url_check"]
  spread = sp["images_per_species"]
  lines = [
    "# Catalog audit",
    "",
    f"Catalog: `{json.dumps(report['catalog'], ensure_ascii=False)}`",
    "",
    f"License policy: **{report['policy']['name']}** "
    f"({'shippable' if report['policy']['shippable'] else 'NOT shippable: research only'})",
    "",
    f"- Species: **{sp['count']}**; images per species min {spread['min']}, "
    f"median {spread['median']}, max {spread['max']}",
    f"- Images: **{im['total']}**, allowed **{im['allowed']}**, rejected {im['rejected']}",
    f"- Species without any allowed image: {len(sp['without_allowed_images'])}",
    f"- Species spelled several ways in the catalog (whitespace or Unicode form; merged into "
    f"one class each): {len(sp['merged_spellings'])}",
    *[
      f"  - `{name}` ← {', '.join(json.dumps(v, ensure_ascii=False) for v in spellings)}"
      for name, spellings in list(sp["merged_spellings"].items())[:_TOP]
    ],
    f"- URL check ({uc['mode']}): {uc.get('checked', 0)} checked, {uc.get('failed', 0)} failed "
    f"({uc.get('failure_rate', 0):.1%}, max {uc.get('max_failure_rate', 0):.1%}) → "
    f"**{'PASS' if report['passed'] else 'FAIL'}**",
    "",
    "## Licenses",
    "",
    "| license | images | allowed | reason |",
    "|---|---:|---|---|",
  ]
  lines += [
    f"| {k} | {v['images']} | {'yes' if v['allowed'] else 'no'} | {v['reason']} |"
    for k, v in lic["by_license"].items()
  ]
  lines += ["", "Rejected by reason:", ""]
  lines += [f"- {reason}: {n}" for reason, n in lic["rejected_by_reason"].items()] or ["- none"]
  if lic["unrecognised_strings"]:
    lines += ["", "License strings not recognised (treated as unknown):", ""]
    lines += [f"- `{raw}`: {n}" for raw, n in lic["unrecognised_strings"].items()]
  lines += [
    "",
    "## Regions",
    "",
    "An image counts for Spain when its own country is ES or, without a country, its species "
    "occurs in ES; likewise for Europe (configs/common.py regions_config).",
    "",
    "| region | species | images | allowed images |",
    "|---|---:|---:|---:|",
  ]
  lines += [
    f"| {b} | {report['regions']['species'][b]} | {v['images']} | {v['allowed']} |"
    for b, v in report["regions"]["images"].items()
  ]
  dup = report["duplicates"]
  lines += [
    "",
    "## Duplicates",
    "",
    f"{dup['locations_listed_more_than_once']} URLs/paths listed more than once "
    f"({dup['extra_listings']} extra listings; {dup['urls_in_several_species']} in several species).",
  ]
  lines += ["", "## Invalid documents and images (skipped)", ""]
  lines += [f"- {reason}: {n}" for reason, n in report["invalid"].items()] or ["- none"]
  lines += ["", "## URL check", ""]
  if uc["mode"] == "none" or not uc.get("checked"):
    lines.append(f"Not run ({uc.get('note', 'audit.url_check=none')}).")
  else:
    lines += [f"- {reason}: {n}" for reason, n in uc["failures_by_reason"].items()] or [
      "- no failures"
    ]
  lines += [
    "",
    "## Species",
    "",
    "Fewest images: " + ", ".join(f"{s} ({n})" for s, n in sp["fewest_images"]),
    "",
    "Plots: images_per_species.png, licenses.png, regions.png, url_check.png",
    "",
  ]
  return "\n".join(lines)


def _save(fig, path: str):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)


def _barh(ax, labels, values, colors, title, xlabel):
  y = range(len(labels))
  ax.barh(y, values, color=colors)
  ax.set_yticks(list(y), labels)
  ax.invert_yaxis()
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  for i, v in enumerate(values):
    ax.annotate(str(v), (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)


def write_plots(report: dict, tally: _Tally, out_dir: str):
  """Four PNGs: long tail of images per species, licenses, regions, URL failures."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  ranked = tally.images.most_common()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  ax1.bar(
    range(len(ranked)), [n for _, n in ranked], color="#9ecae1", label="all images", width=1.0
  )
  ax1.bar(
    range(len(ranked)),
    [tally.allowed[s] for s, _ in ranked],
    color="#3182bd",
    label="allowed by license policy",
    width=1.0,
  )
  if ranked and ranked[0][1] > 50 * max(1, ranked[-1][1]):
    ax1.set_yscale("log")
  ax1.set(
    title="Images per species (long tail)",
    xlabel="species rank (most images first)",
    ylabel="images",
  )
  ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax1.legend()
  ax2.hist(
    [tally.allowed[s] for s in tally.images],
    bins=min(30, max(5, len(ranked) // 2)),
    color="#3182bd",
  )
  ax2.set(
    title="Species by number of allowed images",
    xlabel="allowed images per species",
    ylabel="species",
  )
  ax2.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  _save(fig, os.path.join(out_dir, "images_per_species.png"))

  by_license = report["licenses"]["by_license"]
  rejected = report["licenses"]["rejected_by_reason"]
  fig, (ax1, ax2) = plt.subplots(
    1, 2, figsize=(13, 0.6 + 0.45 * max(len(by_license), len(rejected), 3))
  )
  _barh(
    ax1,
    list(by_license),
    [v["images"] for v in by_license.values()],
    ["#31a354" if v["allowed"] else "#de2d26" for v in by_license.values()],
    f"Images per license (green: allowed by '{report['policy']['name']}')",
    "images",
  )
  _barh(
    ax2,
    list(rejected) or ["(none)"],
    list(rejected.values()) or [0],
    "#de2d26",
    "Rejected images by reason",
    "images",
  )
  _save(fig, os.path.join(out_dir, "licenses.png"))

  regions = report["regions"]["images"]
  fig, ax = plt.subplots(figsize=(7, 4))
  x = range(len(REGION_BUCKETS))
  ax.bar(
    [i - 0.2 for i in x], [regions[b]["images"] for b in REGION_BUCKETS], 0.4, label="all images"
  )
  ax.bar(
    [i + 0.2 for i in x], [regions[b]["allowed"] for b in REGION_BUCKETS], 0.4, label="allowed"
  )
  ax.set_xticks(list(x), REGION_BUCKETS)
  ax.set(title="Images by region (photo country, else species range)", ylabel="images")
  ax.legend()
  _save(fig, os.path.join(out_dir, "regions.png"))

  failures = report["url_check"].get("failures_by_reason", {})
  fig, ax = plt.subplots(figsize=(7, 0.8 + 0.45 * max(len(failures), 2)))
  _barh(
    ax,
    list(failures) or ["(no failures)"],
    list(failures.values()) or [0],
    "#de2d26",
    f"URL check: {report['url_check'].get('failed', 0)} of {report['url_check'].get('checked', 0)} "
    "failed",
    "URLs",
  )
  _save(fig, os.path.join(out_dir, "url_check.png"))


def run(config, workdir: str, mongo_client=None) -> dict:
  """Audits `config.catalog`; writes <workdir>/audit/; raises AuditFailed on too many broken URLs.

  `mongo_client` is for tests (mongomock); normally the source opens its own.
  """
  fetch.check_config(config.http)
  out_dir = workdir_lib.Workdir(workdir).audit
  os.makedirs(out_dir, exist_ok=True)
  policy = licenses.get_policy(config.licenses.policy)
  tally, stats = _Tally(policy, config.regions), collections.Counter()
  for record in tqdm(
    sources.iter_records(config.catalog, stats, mongo_client),
    desc="audit: reading catalog",
    unit="img",
    mininterval=2,
  ):
    tally.add(record)

  urls = _urls_to_check(tally.urls, config.audit, config.seed)
  checks = fetch.check_urls(urls, config.http) if urls else []
  url_check = _url_report(checks, config.audit.url_check, config.audit.max_failure_rate)
  if not urls:
    url_check["note"] = (
      "audit.url_check=none"
      if config.audit.url_check == "none"
      else "no URLs in the catalog (local files)"
    )
  report = build_report(tally, stats, url_check, config)
  fileio.write_text(
    os.path.join(out_dir, "report.json"), json.dumps(report, indent=2, ensure_ascii=False)
  )
  fileio.write_text(os.path.join(out_dir, "report.md"), _markdown(report))
  write_plots(report, tally, out_dir)

  images = report["images"]
  metric = (
    f"{report['species']['count']} species, {images['allowed']}/{images['total']} images "
    f"allowed ({policy.name}), URL failures {url_check['failure_rate']:.1%} "
    f"of {url_check['checked']}"
  )
  logging.info("audit: %s", metric)
  if not report["species"]["count"]:
    skipped = ", ".join(f"{r} ×{n}" for r, n in stats.most_common(3)) or "the catalog is empty"
    raise AuditFailed(
      f"the catalog ({sources.describe(config.catalog)}) yielded no species with an image "
      f"({skipped}). Check --config.catalog.path and --config.catalog.fields.* (the field "
      f"names of your documents). Details: {os.path.join(out_dir, 'report.md')}"
    )
  if not url_check["passed"]:
    top = ", ".join(f"{r} ×{n}" for r, n in list(url_check["failures_by_reason"].items())[:5])
    raise AuditFailed(
      f"URL check failed: {url_check['failure_rate']:.1%} of {url_check['checked']} checked URLs "
      f"are broken (audit.max_failure_rate={url_check['max_failure_rate']:.1%}); top reasons: {top}. "
      f"Details: {os.path.join(out_dir, 'report.md')}"
    )
  return {
    "metric": metric,
    "species": report["species"]["count"],
    "images": images["total"],
    "allowed": images["allowed"],
    "url_failure_rate": url_check["failure_rate"],
  }
