r"""Screenshots of the PWA (online, unsure, offline) and what each shows, as JSON.

  python tools/screenshot_pwa.py --model runs/demo/tfjs \
    --photo runs/demo_data/images/artificalotus_indicus/000.jpg \
    --unsure-photo ../shared/data/flowers12/train/daisy/image_0801.jpg --out runs/demo/screens

Chromium with the page's language set by --locale (es-ES: Spanish common names, region Spain).
The README's picture is the "online" shot.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aplantida_jax.export import pwa_screens  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--model", default="runs/demo/tfjs", help="TF.js export folder")
  parser.add_argument("--photo", required=True, help="a photo the model should know")
  parser.add_argument("--unsure-photo", help="a photo it should be unsure about")
  parser.add_argument("--out", default="runs/demo/screens", help="folder for the PNGs")
  parser.add_argument("--locale", default="es-ES")
  args = parser.parse_args()
  photos = {"online": args.photo, **({"unsure": args.unsure_photo} if args.unsure_photo else {})}
  shots = pwa_screens.capture(args.model, photos, args.out, locale=args.locale)
  print(json.dumps(shots, indent=2, ensure_ascii=False))


if __name__ == "__main__":
  main()
