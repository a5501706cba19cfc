"""Config pieces shared by every stage: seed, catalog source, license policy.

Stage configs call these so a field means the same thing everywhere and one
`--config.catalog.kind=mongo` style override works on any stage that reads it.
"""

import os

import ml_collections

# The demo catalog (tools/make_demo_data.py) is served by run.sh on this port.
DEMO_PORT = int(os.environ.get("APLANTIDA_DEMO_PORT", "8765"))
DEMO_DATA_DIR = "runs/demo_data"


def parse_arg(arg, config_file, *, variants=("demo",), keys=None):
  """`configs/x.py:demo,key=value` → (set of variants, {key: value}), strictly.

  `variants` are the bare words the file knows, `keys` {key: allowed values, or None for
  any}; anything else is an error naming it and what the file knows (as big_vision's
  parse_arg: a mistyped variant must not silently train something else).
  """
  keys = keys or {}
  words, kv = set(), {}
  for part in (arg or "").split(","):
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      if k not in keys:
        raise ValueError(
          f"{config_file}: unknown argument {k}={v!r}; it takes "
          f"{_known(variants, keys)}. Set other fields with --config.KEY=VALUE."
        )
      if keys[k] is not None and v not in keys[k]:
        raise ValueError(f"{config_file}: {k}={v!r} is not one of {tuple(keys[k])}.")
      kv[k] = v
    elif part in variants:
      words.add(part)
    else:
      raise ValueError(
        f"{config_file}: unknown variant {part!r}; it takes "
        f"{_known(variants, keys)}. Set other fields with --config.KEY=VALUE."
      )
  return words, kv


def _known(variants, keys):
  known = [f"':{v}'" for v in variants] + [f"'{k}='" for k in keys]
  return ", ".join(known) if known else "no argument"


def demo_only(arg, config_file):
  """True for `:demo`, False for no argument; anything else is an error naming the argument."""
  return "demo" in parse_arg(arg, config_file)[0]


def catalog_config(demo: bool = False) -> ml_collections.ConfigDict:
  """Where image records come from and how document fields map onto them."""
  c = ml_collections.ConfigDict()
  c.kind = "jsonl"  # "mongo" | "jsonl" | "folder"
  c.path = os.path.join(DEMO_DATA_DIR, "catalog.jsonl")  # JSONL file or folder of species folders
  # mongo
  c.mongo_uri = os.environ.get("APLANTIDA_MONGO_URI", "mongodb://localhost:27017")
  c.db = "aplantida"
  c.collection = "Plant"
  c.query = "{}"  # JSON filter
  c.projection = ""  # JSON projection; empty = the mapped fields only
  c.batch_size = 1000  # cursor batch size (documents are streamed)
  c.limit = 0  # 0 = all documents
  # folder
  c.default_license = "unknown"
  c.default_author = ""
  c.sidecar_csv = ""  # optional CSV: path,license,author,source,country
  # field mapping (dotted paths; image fields are relative to one image entry)
  f = c.fields = ml_collections.ConfigDict()
  f.species = "scientificName"
  f.family = "family"
  f.common_names = "commonNames"
  f.regions = "regions"
  f.images = "images"
  f.url = "url"
  f.license = "license"
  f.author = "author"
  f.source = "source"
  f.country = "country"
  if demo:
    c.path = os.path.join(DEMO_DATA_DIR, "catalog.jsonl")
  return c


def licenses_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.policy = (
    "commercial"  # "commercial" (shippable) | "research" (admits NC/ND/unknown; not shippable)
  )
  return c


def regions_config() -> ml_collections.ConfigDict:
  """Regions the app cares about: Spain and Europe (a country list)."""
  c = ml_collections.ConfigDict()
  c.spain = ["ES"]
  c.europe = [
    "ES",
    "PT",
    "FR",
    "IT",
    "DE",
    "GB",
    "IE",
    "NL",
    "BE",
    "LU",
    "CH",
    "AT",
    "DK",
    "SE",
    "NO",
    "FI",
    "IS",
    "PL",
    "CZ",
    "SK",
    "HU",
    "SI",
    "HR",
    "BA",
    "RS",
    "ME",
    "MK",
    "AL",
    "GR",
    "BG",
    "RO",
    "MD",
    "UA",
    "BY",
    "LT",
    "LV",
    "EE",
    "MT",
    "CY",
    "AD",
    "MC",
    "SM",
    "LI",
    "VA",
  ]
  return c


def http_config() -> ml_collections.ConfigDict:
  """The async HTTP client used by the audit URL check and the export download."""
  c = ml_collections.ConfigDict()
  c.concurrency = 64  # total requests in flight
  c.per_host = 16  # requests in flight per host
  c.timeout_s = 20.0  # per request (connect + read)
  c.retries = 3  # on connection errors, timeouts, 429 and 5xx
  c.backoff_s = 0.5  # base of the exponential backoff; Retry-After wins when given
  c.max_retry_after_s = 60.0  # cap on an honoured Retry-After
  # Opt-outs honoured (data/fetch.py): X-Robots-Tag directives ([] = none), and the W3C
  # TDM Reservation Protocol's `tdm-reservation: 1` (the EU DSM directive's machine-readable
  # reservation). A skipped image counts as opt_out:<directive>.
  c.opt_out_directives = ["noai", "noimageai", "noml", "noindex", "noimageindex"]
  c.respect_tdm_reservation = True
  c.user_agent = "aplantida-jax/0.1 (+dataset export)"
  return c
