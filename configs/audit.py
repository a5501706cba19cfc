r"""Audit the catalog before spending hours downloading it.

  python -m aplantida_jax.main --config=configs/audit.py --workdir=runs/prod \
      --config.catalog.kind=mongo --config.catalog.mongo_uri="$APLANTIDA_MONGO_URI"
  python -m aplantida_jax.main --config=configs/audit.py:demo --workdir=runs/demo

Writes <workdir>/audit/report.json, report.md and plots: species and images per
species, license breakdown (allowed vs rejected, with reasons), regions,
duplicate URLs, invalid documents, and a URL health check (concurrent HEAD with
GET fallback) over all URLs or a seeded sample. Fails (non-zero exit, after
writing the report) when more than `audit.max_failure_rate` of checked URLs fail.
The `:demo` variant reads the built-in demo catalog (served by ./run.sh on
127.0.0.1) and checks every URL.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  demo = common.demo_only(arg, "configs/audit.py")
  config = ml_collections.ConfigDict()
  config.stage = "audit"
  config.seed = 0
  config.catalog = common.catalog_config(demo)
  config.licenses = common.licenses_config()
  config.regions = common.regions_config()
  config.http = common.http_config()
  config.audit = ml_collections.ConfigDict()
  config.audit.url_check = "all" if demo else "sample"  # "all" | "sample" | "none"
  config.audit.sample_size = 2000  # URLs checked in "sample" mode (seeded by config.seed)
  config.audit.max_failure_rate = 0.05  # fail the stage above this fraction of broken URLs
  return config
