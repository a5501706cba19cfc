r"""Gives a folder catalog made-up regions: one country per image, species ranges drawn by seed.

  python tools/synthetic_regions.py ../shared/data/flowers12/train runs/flowers/regions.csv
  python -m aplantida_jax.main --config=configs/export.py:demo --workdir=runs/flowers \
    --config.catalog.kind=folder --config.catalog.path=../shared/data/flowers12/train \
    --config.catalog.sidecar_csv=runs/flowers/regions.csv ...

The regions are synthetic (aplantida_jax/data/synthetic_regions.py): they measure what the
region prior does, nothing about where the plants grow. Same --seed, same file.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aplantida_jax.data import synthetic_regions  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("folder", help="catalog folder: one subfolder of images per species")
  parser.add_argument("out", help="CSV to write (path,country), for catalog.sidecar_csv")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  ranges = synthetic_regions.write_sidecar(args.folder, args.out, args.seed)
  print(json.dumps(ranges, indent=2))


if __name__ == "__main__":
  main()
