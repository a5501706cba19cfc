r"""Export the catalog's licensed images to ArrayRecord shards for Grain.

  python -m aplantida_jax.main --config=configs/export.py --workdir=runs/plants

Variants (`configs/export.py:demo`):
  demo   the demo catalog (tools/make_demo_data.py, served by run.sh on 127.0.0.1), 96 px images
Writes <workdir>/dataset/{manifest.json, classes.json, attributions.csv, splits/*, cache/}.
Other catalogs: --config.catalog.kind=mongo|jsonl|folder --config.catalog.path=... (configs/common.py).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  demo = common.demo_only(arg, "configs/export.py")
  config = ml_collections.ConfigDict()
  config.stage = "export"
  config.seed = 0  # drives the split

  config.catalog = common.catalog_config(demo)
  config.licenses = common.licenses_config()
  config.http = common.http_config()

  e = config.export = ml_collections.ConfigDict()
  e.image_size = 320  # shorter side of every stored JPEG
  e.min_size = 128  # shorter side below this → rejected "too_small"
  e.max_pixels = 80_000_000  # width x height above this → rejected "decompression_bomb"
  e.max_bytes = 32 * 1024 * 1024  # larger downloads are cut off → "too_large"
  e.jpeg_quality = 90
  e.splits = ml_collections.ConfigDict({"train": 0.8, "val": 0.1, "test": 0.1})
  e.min_per_class = 10  # species with fewer kept images are "small" (at least 3)
  e.small_class_policy = "drop"  # "drop" | "train_only"
  e.records_per_shard = 2000
  e.workers = 0  # threads decoding/resizing; 0 = one per CPU core

  if demo:
    e.image_size = 96
    e.min_size = 32
    e.min_per_class = 5
    e.records_per_shard = 200
    config.http.concurrency = 16
  return config
