r"""Writes the built-in demo catalog: procedurally drawn plants + catalog.jsonl.

  python tools/make_demo_data.py --out runs/demo_data --base-url http://127.0.0.1:8765

Same --seed, same bytes. Serve --out at --base-url (./run.sh does) so the
pipeline downloads the images over HTTP like a real CDN. The drawing code is in
aplantida_jax/data/demo_data.py.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aplantida_jax.data import demo_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default=common.DEMO_DATA_DIR, help="output folder")
  parser.add_argument(
    "--base-url",
    default=f"http://127.0.0.1:{common.DEMO_PORT}",
    help="URL at which --out will be served",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--species",
    type=int,
    default=len(demo_data.SPECIES),
    help=f"number of species (1..{len(demo_data.SPECIES)})",
  )
  parser.add_argument(
    "--images",
    type=int,
    nargs=2,
    default=(30, 40),
    metavar=("MIN", "MAX"),
    help="images per species, drawn uniformly in [MIN, MAX]",
  )
  parser.add_argument("--size", type=int, default=160, help="image side in pixels")
  args = parser.parse_args()
  summary = demo_data.make_demo_data(
    args.out,
    args.base_url,
    seed=args.seed,
    num_species=args.species,
    images_per_species=tuple(args.images),
    image_size=args.size,
    progress=True,
  )
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
